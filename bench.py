"""Time the training step of train.py: images/s, FLOPs, the hardware's roofline, and where the time goes; and
the PIL loader's images/s per CPU core, the figure that says how many cores feed one accelerator.

Builds the run exactly as train.py does (train.parse_args, train.setup) and times train.train_step on its
batches, so the training loop carries no benchmarking. Every train.py flag sets up the run; bench.py's own are
--steps, --profile, --attention, --matmuls and --loader (python bench.py --help). The clock runs only around the step; on a CPU, `--device-augment` keeps loader processes (which build
the next batches while a step runs) off the cores being timed. Prints one JSON line.

    python bench.py --preset cifar10 --dataset synthetic --arch vit_tiny --patch-size 4 --global-size 32 --local-size 16 \\
        --local-crops 6 --batch-size 64 --out-dim 4096 --device cpu --device-augment --steps 5   # docs/performance.md's CPU shape
    python bench.py [same flags] --profile     # + a torch.profiler table of one step, operators by self time
    python bench.py [same flags] --attention   # + SDPA against matmul + softmax at the step's shapes
    python bench.py [same flags] --matmuls     # + the step's matrix products timed alone: the step's floor
    python bench.py --preset imagenet-vit-s16 --loader [--data-path /data/imagenet]   # the loader, one core

JSON fields of the step: img_per_s and step_s (median of the timed steps, after 3 warm-up steps), gflop_per_img
and tflop_per_s (FlopCounterMode on one eager step); on CUDA the card's name, peak memory and MFU against its
dense bf16 peak; on a CPU `amx` and `avx512_bf16` (its bf16 matrix instructions), and the rate of one large matmul in the run's
precision (matmul_tflop_per_s) with the step's share of it (of_matmul).
`--loader` times no step: one process on one thread makes the run's PIL views (ibot_min.MultiCropAugmentation:
decode, crops, jitter, blur, masks, collation) of --steps batches after one warm-up batch, on the run's images, or,
with the imagefolder dataset and no --data-path, on synthesised 500x375 JPEGs (ImageNet's typical size);
loader_img_per_s_per_core is the median batch's rate in this process's CPU time (a core shared with other
processes does not lower it; wall_img_per_s is the wall clock's). A run needs about
img_per_s / loader_img_per_s_per_core loader processes (--workers) per accelerator, each on a core of its own.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import data as D
import ibot_min as M
import train
from runtime import cpu_bf16_units, pick_device, pick_precision, print0

WARMUP_STEPS = 3
# dense bf16 peak of the cards we quote MFU against (vendor figures)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def benchmark(args, steps: int, profile_step: bool = False) -> dict:
    """Time `steps` steps after WARMUP_STEPS; the first warm-up step also counts the FLOPs."""
    run = train.setup(args)
    schedules = train.Schedules(args, steps + WARMUP_STEPS + profile_step, run.steps_per_epoch,
                                run.global_batch)
    times, flops, step = [], 0, 0
    while step < schedules.total:
        for batch in run.epoch_batches(step // run.steps_per_epoch, step % run.steps_per_epoch):
            counting, profiling = step == 0, profile_step and step == WARMUP_STEPS
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            t0 = time.perf_counter()
            with torch.compiler.set_stance("force_eager") if counting else nullcontext(), \
                    FlopCounterMode(display=False) if counting else nullcontext() as counter, \
                    profile(activities=activities) if profiling else nullcontext() as prof:
                out = train.train_step(run, batch, schedules.at(step), step < schedules.freeze_last_layer_steps)
                float(out["loss"])  # waits for the device
            times.append(time.perf_counter() - t0)
            if counting:
                flops = counter.get_total_flops()
            if profiling:
                sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=25))
            step += 1
            if step >= schedules.total:
                break
    timed = [t for i, t in enumerate(times) if i >= WARMUP_STEPS and not (profile_step and i == WARMUP_STEPS)]
    return summary(args, timed, run.global_batch, run.device, flops)


def summary(args, times, global_batch, device, step_flops) -> dict:
    step_s = statistics.median(times)
    out = dict(img_per_s=global_batch / step_s, step_s=step_s, device="cpu", precision=args.precision,
               arch=args.arch, batch_size=global_batch, steps=len(times), compile=args.compile,
               gflop_per_img=step_flops / global_batch / 1e9, tflop_per_s=step_flops / step_s / 1e12,
               torch=torch.__version__)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        out.update(device=name, peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        if peak:
            out["mfu"] = step_flops / step_s / peak
    else:  # a CPU's roofline: what one large matmul reaches here, in the run's precision
        out.update(cpu_bf16_units())  # amx, avx512_bf16
        out["matmul_tflop_per_s"] = matmul_rate(torch.bfloat16 if args.precision == "bf16" else torch.float32)
        out["of_matmul"] = out["tflop_per_s"] / out["matmul_tflop_per_s"]
    print0(json.dumps(out))
    return out


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """TFLOP/s of an (n, n) @ (n, n) CPU matmul, median of `repeats` after one warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e12


def attention_paths(args, repeats: int = 5) -> list[dict]:
    """Forward + backward of attention alone at the step's two lengths (global and local crops), in the run's
    precision: SDPA against the plain matmul + softmax that ibot_min.Attention uses for bf16 on a CPU."""
    arch = M.ARCHS[args.arch]
    heads, d = arch["num_heads"], arch["embed_dim"] // arch["num_heads"]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = []
    for n, size in ((args.global_crops * args.batch_size, args.global_size),
                    (args.local_crops * args.batch_size, args.local_size)):
        shape = (n, heads, 1 + (size // args.patch_size) ** 2, d)  # (B, h, T, d)
        row = dict(shape=list(shape), dtype=str(dtype).removeprefix("torch."))
        for name, fn in (("sdpa_ms", torch.nn.functional.scaled_dot_product_attention),
                         ("plain_ms", lambda q, k, v: M.Attention.attention_weights(q, k).to(v.dtype) @ v)):
            q, k, v = (torch.randn(shape, dtype=dtype, device=args.device, requires_grad=True) for _ in range(3))
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                fn(q, k, v).float().sum().backward()
                times.append(time.perf_counter() - t0)
            row[name] = 1000 * statistics.median(times[1:])
        rows.append(row)
        print0(json.dumps(row))
    return rows


class MatmulCalls(TorchDispatchMode):
    """Counts the matrix products a step runs (forward and backward, after autocast's casts) by operator,
    operand shapes, strides (transposed operands run different kernels) and dtype."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.calls[(func, tuple((tuple(a.shape), a.stride(), a.dtype) for a in args))] += 1
        return func(*args, **(kwargs or {}))


def matmul_floor(args, step_s: float, repeats: int = 3) -> dict:
    """The step's matrix products, each timed alone at its own shapes (median of `repeats`) and summed: the
    time the step would take if everything else were free. Its share of the measured step says how far the rest
    (casts, norms, GELU, softmax, the optimiser) leaves the step from what the matrix unit allows at these shapes."""
    run = train.setup(args)
    schedules = train.Schedules(args, 1, run.steps_per_epoch, run.global_batch)
    recorder = MatmulCalls()
    with recorder:
        train.train_step(run, next(iter(run.epoch_batches(0, 0))), schedules.at(0), False)
    floor_s, flop = 0.0, 0
    for (func, operands), count in recorder.calls.items():
        tensors = [torch.empty_strided(shape, stride, dtype=dtype, device=run.device).normal_()
                   for shape, stride, dtype in operands]
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            func(*tensors)
            times.append(time.perf_counter() - t0)
        floor_s += count * statistics.median(times[1:])
        (m, k), n = operands[-2][0][-2:], operands[-1][0][-1]
        flop += count * 2 * m * k * n * (operands[-1][0][0] if func is torch.ops.aten.bmm.default else 1)
    out = dict(matmul_calls=sum(recorder.calls.values()), matmul_shapes=len(recorder.calls),
               matmul_gflop_per_img=flop / run.global_batch / 1e9, matmul_floor_s=floor_s,
               matmul_floor_tflop_per_s=flop / floor_s / 1e12, floor_img_per_s=run.global_batch / floor_s,
               step_over_floor=step_s / floor_s)
    print0(json.dumps(out))
    return out


# ---- the loader: PIL views on one core ----

SYNTHETIC_SIZE = (500, 375)  # ImageNet's typical image (width, height)


def synthesise_jpegs(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs (quality 90) of SYNTHETIC_SIZE in one class folder: smooth colour fields with grain, so they
    decode and compress about as photographs do, not as flat colour or pure noise."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    (root / "synthetic").mkdir(parents=True)
    w, h = SYNTHETIC_SIZE
    for i in range(n):
        coarse = torch.rand(1, 3, 12, 16, generator=gen)  # (1, C, h', w'): the image's large shapes
        img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        img = img + 0.05 * torch.randn(img.shape, generator=gen)  # (C, H, W) + grain
        pixels = (img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
        Image.fromarray(pixels).save(root / "synthetic" / f"{i:05d}.jpg", quality=90)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loader_rate(args, batches: int) -> dict:
    """Images/s of the PIL multi-crop views on one core: `batches` batches of --batch-size images, after one."""
    aug = train.build(M.MultiCropAugmentation, args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader process: PIL is single-threaded, torch's collation made so
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = args.data_path
            if args.dataset == "imagefolder" and not source:
                source = tmp
                synthesise_jpegs(Path(tmp), min(args.batch_size * (batches + 1), 256), args.seed)
            images = D.build_dataset(args.dataset, source, "train", args.holdout_per_class, args.limit_per_class,
                                     args.download, synthetic_size=args.global_size)
            files = [Path(path) for path, _ in getattr(images, "samples", [])[:256]]
            dataset = D.MultiCropDataset(images, aug, args.seed, args.pred_start_epoch)
            times, cpu_times = [], []  # wall clock; this process's CPU time, which other processes on the core
            for b in range(batches + 1):  # do not inflate
                t0, c0 = time.perf_counter(), time.process_time()
                D.collate_crops([dataset[(b * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)])
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            mean_kib = statistics.mean(f.stat().st_size for f in files) / 1024 if files else None
    finally:
        torch.set_num_threads(threads)
    batch_cpu_s, batch_s = statistics.median(cpu_times[1:]), statistics.median(times[1:])
    out = dict(loader_img_per_s_per_core=args.batch_size / batch_cpu_s, batch_cpu_s=batch_cpu_s,
               wall_img_per_s=args.batch_size / batch_s, batch_s=batch_s, batch_size=args.batch_size, batches=batches,
               views=f"{aug.global_crops}x{aug.global_size} + {aug.local_crops}x{aug.local_size}", blur=aug.blur,
               images="synthesised 500x375 JPEG" if source == tmp else f"{args.dataset} {source or ''}".strip(),
               mean_file_kib=mean_kib, cpu=cpu_name(), cores=os.cpu_count(),
               torch=torch.__version__, pillow=__import__("PIL").__version__)
    print0(json.dumps(out))
    return out


# ---- the command ----


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", add_help=False, allow_abbrev=False,
                                description="bench.py's own flags; every other flag is train.py's and sets up "
                                            "the run (python train.py --help)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (--loader: timed batches), after the warm-up")
    p.add_argument("--profile", action="store_true", help="a torch.profiler table of one step")
    p.add_argument("--attention", action="store_true", help="SDPA against matmul + softmax at the step's shapes")
    p.add_argument("--matmuls", action="store_true", help="the step's matrix products timed alone")
    p.add_argument("--loader", action="store_true", help="the PIL loader's images/s on one core; no step")
    p.add_argument("-h", "--help", action="store_true", help="this help, then train.py's")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench_parser()
    own, run_flags = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print()
        train.parse_args(run_flags + ["--help"])  # prints train.py's flags and exits
    try:
        if own.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {own.steps}")
        args = train.parse_args(run_flags)
        if own.loader:
            loader_rate(args, own.steps)
            return 0
        if own.attention:
            args.device = pick_device(args.device)
            args.precision = pick_precision(args.precision, args.device)
            attention_paths(args)
        result = benchmark(args, own.steps, own.profile)
        if own.matmuls:
            matmul_floor(args, result["step_s"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
