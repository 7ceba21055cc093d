"""Train iBOT, from a CPU CIFAR smoke run to multi-GPU ImageNet. Built on ibot_min.py.

The main job: CIFAR-10 with the recipe made for the device (cifar10 on CUDA, cifar10-cpu otherwise), on
../shared's PNGs when they are there, else on torchvision's CIFAR-10 (downloaded into data/):
    python train.py --budget 5m        # everything, kNN scores and the final checkpoint included, in 5 minutes
CPU or GPU, explicitly:
    python train.py --preset cifar10-cpu --budget 10m
    python train.py --preset cifar10 --budget 5m --device-augment
    python train.py --preset imagenet-vit-s16 --data-path /data/imagenet
One node, 8 GPUs (--batch-size is per GPU, the lr scales with the global batch):
    torchrun --standalone --nproc_per_node 8 train.py --preset imagenet-vit-s16 --data-path /data/imagenet
Several nodes (run on each; --max-restarts recovers through the automatic resume):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --max-restarts 3 \\
        train.py --preset imagenet-vit-s16 --data-path /data/imagenet --output-dir runs/vits16
Benchmark (prints one JSON line; bench.py does the same, and --profile there adds an operator table):
    python train.py --preset cifar10 --dataset synthetic --arch vit_tiny --patch-size 4 --global-size 32 --local-size 16 \\
        --local-crops 6 --batch-size 64 --out-dim 4096 --benchmark 5 --device cpu

A run writes <output-dir>/checkpoint.pth (atomically, every epoch and on Ctrl-C), log.jsonl and curves.png
(plot_run.py), and resumes from them when started again with the same output folder. Every flag sets the
field of the same name in ibot_min.IBOTConfig, ibot_min.MultiCropAugmentation or TrainConfig below.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import traceback

T_IMPORT = time.perf_counter()  # a budget counts from the command's start, torch's import included
import typing  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import batched_views as BV  # noqa: E402
import data as D  # noqa: E402
import ibot_min as M  # noqa: E402
from runtime import pick_device, pick_precision, print0, setup_distributed  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# ---- configuration: three dataclasses, one flag per field, presets over their defaults ----


@dataclass
class TrainConfig:
    """The run around the method: data, optimisation and schedules (SPEC.md "Optimisation"), output.
    The networks and the loss are ibot_min.IBOTConfig, the views ibot_min.MultiCropAugmentation."""

    dataset: str = "imagefolder"  # cifar10 | cifar100 | imagefolder | synthetic
    data_path: str | None = None
    download: bool = False  # let torchvision download CIFAR
    holdout_per_class: int = 0  # one folder of class folders: its last N images per class are the val split
    limit_per_class: int | None = None  # train on the first N images of each class
    batch_size: int = 64  # per process
    epochs: int = 100
    lr: float = 5e-4  # peak, per 256 images of the global batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04  # cosine to weight_decay_end
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996  # m, cosine to 1
    teacher_temp: float = 0.07  # tau_t and tau_t' after their warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    freeze_last_layer: float = 1  # epochs without updates of the prototypes
    clip_grad: float = 3.0  # per parameter; 0 = off
    pred_start_epoch: int = 0  # no masking (and no MIM term) before this epoch
    seed: int = 0
    output_dir: str = "runs/ibot"
    resume: bool = True  # resume from output_dir/checkpoint.pth when it is there
    ckpt_every: int = 1  # epochs
    knn_every: int = 0  # epochs; 0 = never
    knn_every_steps: int = 0  # also on the log rows of these steps; 0 = never
    log_every: int = 100  # steps: a row of log.jsonl (means since the last row, diagnostics), and at each epoch end
    knn_bank_per_class: int | None = 1000  # the kNN monitor's bank: at most this many training images per class
    budget: str | None = None  # wall-clock budget such as 90s, 5m, 1.5h; schedules end with it
    max_steps: int | None = None
    workers: int | None = None  # loader processes (default: up to 8)
    device: str | None = None  # cuda | mps | cpu (default: the best there is)
    precision: str | None = None  # fp32 | bf16 | fp16 (default: bf16 where it pays)
    compile: bool = False  # torch.compile both backbones
    device_augment: bool = False  # decode once, make crops and masks on the device (batched_views.py)
    benchmark: int = 0  # time N steps and print one JSON line instead of training (bench.py)

    def __post_init__(self):
        for name in ("batch_size", "epochs", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("log_every", "knn_every", "knn_every_steps", "benchmark"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


SHARED_CIFAR10 = Path(__file__).resolve().parent.parent / "shared" / "data" / "cifar10" / "train"
PRESETS = {
    # A short CIFAR-10 run: the official recipe scaled to 32 px images (ViT-Tiny/4, 32 + 16 px crops, no blur),
    # plus DINOv2's KoLeo term (--koleo 1), the one change that paid in the README's ablations (measured on
    # the CPU preset; not yet confirmed on a GPU). Warm-ups keep their fraction of the run under --budget.
    "cifar10": dict(dataset="imagefolder", data_path=str(SHARED_CIFAR10), holdout_per_class=500,
                    arch="vit_tiny", patch_size=4, global_size=32, local_size=16, local_crops=6,
                    global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), blur=False, out_dim=4096,
                    batch_size=256, epochs=100, lr=1e-3, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04,
                    weight_decay_end=0.4, momentum_teacher=0.99, teacher_temp=0.07, warmup_teacher_temp=0.04,
                    warmup_teacher_temp_epochs=30, drop_path=0.1, norm_last_layer=False, freeze_last_layer=1,
                    clip_grad=3.0, koleo=1.0, knn_every=10),
    # The official ViT-S/16 ImageNet-1K recipe (800 epochs, 16 GPUs x 64 in the paper's README).
    "imagenet-vit-s16": dict(dataset="imagefolder", data_path=None, holdout_per_class=0, arch="vit_small",
                             patch_size=16, global_size=224, local_size=96, local_crops=10, global_scale=(0.14, 1.0),
                             local_scale=(0.05, 0.4), blur=True, out_dim=8192, batch_size=64, epochs=800, lr=5e-4,
                             min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                             momentum_teacher=0.996, teacher_temp=0.07, warmup_teacher_temp=0.04,
                             warmup_teacher_temp_epochs=30, drop_path=0.1, norm_last_layer=False,
                             freeze_last_layer=1, clip_grad=3.0, knn_every=0),
}
# The cifar10 recipe sized for a 2-core CPU (README "Results": the ablations behind each change). Batched
# augmentation beats two PIL loader workers there: 42 vs 18 img/s on the project's 2-core machine. A cold
# teacher held at tau_t = tau_t' = 0.04 (no ramp to 0.07, which flattens the targets to ln K on short runs), a
# 4x higher peak lr for runs of a few hundred steps, and KoLeo at DINOv2's 0.1.
PRESETS["cifar10-cpu"] = {**PRESETS["cifar10"], "arch": "vit_nano", "out_dim": 1024, "head_hidden_dim": 512,
                          "batch_size": 64, "device_augment": True, "knn_every_steps": 250,
                          "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "lr": 4e-3, "koleo": 0.1}
PRESETS["cifar100"] = {**PRESETS["cifar10"], "dataset": "cifar100", "data_path": "data/"}
CONFIGS = (M.IBOTConfig, M.MultiCropAugmentation, TrainConfig)
CHOICES = dict(arch=sorted(M.ARCHS), centering=["center", "sinkhorn"], mask_shape=["block", "rand"],
               precision=["fp32", "bf16", "fp16"], device=["cuda", "mps", "cpu"])
NOT_FLAGS = {"mean", "std"}  # the views' normalisation follows the data (ImageNet statistics)


def build(cls, args: argparse.Namespace):
    """One of CONFIGS from the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def parse_args(argv=None) -> argparse.Namespace:
    """Flags -> one namespace: each config field's default, then the preset's values, then the flags given.
    Every field of CONFIGS is a flag of the same name (--global-size sets global_size)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay unset, so the preset decides
    p.add_argument("--preset", default=S, help=f"one of {sorted(PRESETS)} (default: cifar10 on CUDA, else cifar10-cpu)")
    defaults, seen = {}, set()
    for cls in CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or f.name in NOT_FLAGS:
                continue
            seen.add(f.name)
            defaults[f.name] = f.default
            hint = hints[f.name]
            if type(None) in typing.get_args(hint):  # X | None -> X (tuple[float, ...] stays a tuple)
                hint = next(t for t in typing.get_args(hint) if t is not type(None))
            flag, typ = "--" + f.name.replace("_", "-"), typing.get_origin(hint) or hint
            if typ is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=S)
            elif typ is tuple:  # tuple[float, float]: exactly two numbers; tuple[float, ...]: one or more
                items = typing.get_args(hint)
                p.add_argument(flag, type=float, nargs="+" if Ellipsis in items else len(items), default=S)
            else:
                p.add_argument(flag, type=typ, choices=CHOICES.get(f.name), default=S,
                               help=f"default {f.default} (see {cls.__name__})")
    given = vars(p.parse_args(argv))
    notes = []  # what was chosen for the user, and why: the first lines a run prints
    if "preset" in given:
        preset = given["preset"]
    else:  # the recipe made for the device at hand
        device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        preset = "cifar10" if device == "cuda" else "cifar10-cpu"
        other = "cifar10-cpu" if preset == "cifar10" else "cifar10"
        notes.append(f"preset {preset}: the {'GPU' if device == 'cuda' else 'CPU'} recipe, since "
                     f"{'a CUDA device is' if device == 'cuda' else 'no CUDA device is'} in use "
                     f"(--preset {other} for the other one)")
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    args = argparse.Namespace(**{**defaults, **PRESETS[preset], **given})
    if args.data_path == str(SHARED_CIFAR10) and not {"dataset", "data_path"} & set(given):
        if SHARED_CIFAR10.is_dir():
            notes.append(f"data: CIFAR-10 PNGs in {SHARED_CIFAR10}, the last {args.holdout_per_class} of each "
                         f"class held out for kNN")
        else:  # a user's own clone: torchvision's CIFAR-10, its test set for kNN
            args.dataset, args.data_path, args.download, args.holdout_per_class = "cifar10", "data/", True, 0
            notes.append(f"data: torchvision's CIFAR-10 in data/ (downloaded if missing; {SHARED_CIFAR10} is not "
                         f"there), its test set for kNN")
    args.notes = notes
    args.budget_s = parse_duration(args.budget) if args.budget else None
    return args


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", str(text))
    if not m:
        raise ValueError(f"budget must look like 90s, 5m or 1.5h, got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


# ---------------------------------------------------------------------------------------------------
# ---- optimisation pieces: schedules, clipping, checkpoints ----


class Schedules:
    """Per-iteration lr, weight decay, teacher momentum and both teacher temperatures for a run of `total`
    steps. Warm-ups are given in epochs and keep their fraction of the preset's epochs when a budget sets
    the length. Named deviation: temperatures ramp per iteration, not per epoch, so a budget can size them."""

    def __init__(self, args, total: int, steps_per_epoch: int, global_batch: int):
        self.args, self.total, self.steps_per_epoch, self.global_batch = args, total, steps_per_epoch, global_batch
        frac = total / (args.epochs * steps_per_epoch)  # 1.0 unless a budget or --max-steps changed the length
        per_epoch = steps_per_epoch * frac

        def steps(epochs):
            return round(epochs * per_epoch)

        self.lr = M.cosine_schedule(args.lr * global_batch / 256, args.min_lr, total, steps(args.warmup_epochs))
        self.wd = M.cosine_schedule(args.weight_decay, args.weight_decay_end, total)
        self.momentum = M.cosine_schedule(args.momentum_teacher, 1.0, total)
        self.teacher_temp = M.linear_warmup(args.warmup_teacher_temp, args.teacher_temp,
                                            steps(args.warmup_teacher_temp_epochs), total)
        self.teacher_patch_temp = M.linear_warmup(args.warmup_teacher_temp, args.teacher_temp,
                                                  steps(args.warmup_teacher_temp_epochs), total,
                                                  hold_steps=steps(args.pred_start_epoch))
        self.freeze_last_layer_steps = steps(args.freeze_last_layer)

    def within_budget(self, step: int, seconds_left: float, step_s: float, resize: bool) -> "Schedules":
        """The schedules of a run on a wall-clock budget, after `step` steps of step_s seconds each: stretched or
        shrunk to end when seconds_left run out (when `resize`, and at every step in the last 20, so the last step
        runs at the final values), and ended after one more step, at the final values, once no time is left."""
        if seconds_left <= 0:
            total = min(self.total, step + 1)  # out of time: one last step, at the final values
        elif resize or seconds_left < 20 * step_s:
            total = step + max(int(seconds_left / step_s), 1)
        else:
            return self
        return self if total == self.total else Schedules(self.args, total, self.steps_per_epoch, self.global_batch)

    def at(self, step: int) -> dict:
        i = min(step, self.total - 1)
        return dict(lr=float(self.lr[i]), wd=float(self.wd[i]), momentum=float(self.momentum[i]),
                    teacher_temp=float(self.teacher_temp[i]), teacher_patch_temp=float(self.teacher_patch_temp[i]))


@torch.no_grad()
def clip_gradients(params, max_norm: float) -> None:
    """Per-parameter clipping, as the official code: each gradient with norm above max_norm is scaled to it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    coefs = (max_norm / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp(max=1.0)  # a few kernels in all
    torch._foreach_mul_(grads, list(coefs.unbind()))


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted write leaves the previous file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# flags that may differ when a run resumes; a difference in any other (data, networks, schedules) is refused
MAY_CHANGE_ON_RESUME = {"preset", "output_dir", "resume", "ckpt_every", "knn_every", "knn_every_steps",
                        "knn_bank_per_class", "log_every", "download", "workers", "device", "precision", "compile",
                        "benchmark"}


def load_for_resume(path: Path, config: dict) -> dict:
    """The checkpoint to resume from, or one clear ValueError: damaged, or made with other settings."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["train_config"]
    except Exception as e:  # a cut or foreign file: zip, pickle, EOF or key errors, whichever comes first
        raise ValueError(f"cannot resume from {path}: the file is damaged or not a train.py checkpoint "
                         f"({type(e).__name__}); pass --no-resume to start afresh, or another --output-dir") from e
    diff = {k: (saved[k], v) for k, v in config.items()  # fields a checkpoint predates are not compared
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != v}
    if diff:
        listed = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(diff.items()))
        raise ValueError(f"cannot resume {path}: it was made with other settings ({listed}); use the same "
                         f"flags, another --output-dir, or --no-resume")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# ---- the run: setup (shared with bench.py), the step, the loop ----


class NonFiniteLoss(RuntimeError):
    pass


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle drawn from (seed, epoch), split over ranks, that can start at any batch of the epoch, so a
    run interrupted mid-epoch resumes with exactly the batches it had left."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        self.per_rank = n // (batch_size * world) * batch_size  # whole batches only, the same on every rank
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        mine = perm[:self.per_rank * self.world][self.rank::self.world]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self):
        return self.per_rank - self.start_batch * self.batch_size


@dataclass
class Run:
    """What a training step needs, built once by setup(); bench.py times the same step on it."""

    args: argparse.Namespace
    model: M.IBOT
    student: torch.nn.Module  # model.student, or its DistributedDataParallel wrapper on several ranks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: typing.Any
    device: str
    rank: int
    world: int
    images: torch.utils.data.Dataset
    steps_per_epoch: int
    epoch_batches: typing.Callable  # (epoch, start_batch) -> batches (global, local, masks), crop-major

    @property
    def global_batch(self) -> int:
        return self.args.batch_size * self.world


def setup(args) -> Run:
    """Device, processes, data and batches, model, optimiser: everything before the first step."""
    build(TrainConfig, args)  # bad values fail here, before any process group or data
    args.device = pick_device(args.device)
    args.precision = pick_precision(args.precision, args.device)
    rank, world, local_rank = setup_distributed(args)
    for note in getattr(args, "notes", []):  # the first lines: what was chosen for the user, and why
        print0(note)
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cfg, aug = build(M.IBOTConfig, args), build(M.MultiCropAugmentation, args)
    if cfg.koleo and args.batch_size < 2:  # KoLeo's nearest neighbours are taken within each process's batch
        raise ValueError(f"--koleo {cfg.koleo} needs a --batch-size of at least 2 images per process, got "
                         f"{args.batch_size}; pass --koleo 0 to train on one image per step")

    images = D.build_dataset(args.dataset, args.data_path, "train", args.holdout_per_class, args.limit_per_class,
                             args.download, synthetic_size=args.global_size)
    if len(images) < args.batch_size * world:
        raise ValueError(f"the dataset has {len(images)} images, fewer than one global batch "
                         f"({args.batch_size * world})")
    dataset = D.MultiCropDataset(images, aug, args.seed, args.pred_start_epoch)
    sampler = EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=D.collate_crops, drop_last=True, pin_memory=args.device == "cuda",
                                         prefetch_factor=4 if workers else None,
                                         generator=torch.Generator().manual_seed(args.seed))  # spares the global RNG
    if args.device_augment:  # decoded images stay on the device; crops and masks are made there per batch
        pixels = D.decode_all(images, workers).to(device)
        make_views = BV.BatchedMultiCrop(aug)

    def epoch_batches(epoch: int, start_batch: int):
        dataset.epoch = epoch
        sampler.set_epoch(epoch, start_batch)
        if not args.device_augment:
            yield from loader
            return
        order = torch.tensor(list(sampler), dtype=torch.long).view(-1, args.batch_size).to(device)
        for b, idx in enumerate(order, start=start_batch):
            gen = torch.Generator(device=device).manual_seed(hash((args.seed, rank, epoch, b)) & (2**63 - 1))
            yield make_views(pixels[idx], gen, masking=epoch >= args.pred_start_epoch)

    model = M.IBOT(cfg).to(device)
    torch.manual_seed(args.seed + 1 + rank)  # drop path differs per rank; data draws are seeded per sample
    optimizer = torch.optim.AdamW(M.param_groups(model.student), lr=0.0,  # fused: one kernel for all parameters
                                  **({"fused": True} if args.device in ("cuda", "cpu") else {}))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = nullcontext() if dtype is None else torch.autocast(args.device, dtype=dtype)
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    if args.compile:  # the backbones hold nearly all the work; compiled in place (the student's last block
        # selects the rows the loss reads, whose count follows the masks: a data-dependent shape there)
        model.student.backbone.compile()
        model.teacher.backbone.compile()
    student = model.student
    if world > 1:  # torch's DDP averages the gradients, overlapping the all-reduce with the backward pass
        student = torch.nn.parallel.DistributedDataParallel(model.student,
                                                            device_ids=[local_rank] if args.device == "cuda" else None)
    return Run(args, model, student, optimizer, scaler, autocast, device, rank, world, images,
               len(sampler) // args.batch_size, epoch_batches)


def train_step(run: Run, batch, s: dict, freeze_last_layer: bool) -> dict:
    """One step: loss, backward, clipping, AdamW, EMA of the teacher. `s`: this step's schedule values."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    global_crops, local_crops, masks = (None if t is None else t.to(run.device, non_blocking=True) for t in batch)
    for group in optimizer.param_groups:
        group["lr"] = s["lr"]
    optimizer.param_groups[0]["weight_decay"] = s["wd"]  # group 1 (biases, 1-D) is never decayed
    with run.autocast:
        out = model(global_crops, local_crops, masks, s["teacher_temp"], s["teacher_patch_temp"], student=run.student)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.unscale_(optimizer)
    clip_gradients([p for p in model.student.parameters() if p.grad is not None], run.args.clip_grad)
    if freeze_last_layer:
        for n, p in model.student.named_parameters():
            if "last_layer" in n:
                p.grad = None  # the first epoch: no update, and no decay either, of the prototypes
    scaler.step(optimizer)
    scaler.update()
    model.update_teacher(s["momentum"])
    return {k: v.detach() for k, v in out.items()}


def slowest_rank(*seconds: float) -> list[float]:
    """Each clock reading as the slowest rank has it (the same numbers on every rank)."""
    if not dist.is_initialized():
        return list(seconds)
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # gloo, or NCCL's CPU-side copy: a few floats
    return t.tolist()


def all_ranks_finite(values: list[float]) -> bool:
    """Whether every value on every rank is finite: one rank's NaN stops all of them, none waits forever."""
    ok = all(math.isfinite(v) for v in values)
    if dist.is_initialized():
        flag = torch.tensor([float(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def weights_finite(model: M.IBOT) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*model.student.parameters(), *model.teacher.parameters()])


@torch.no_grad()
def diagnostics(model: M.IBOT, global_crops: torch.Tensor, teacher_temp: float) -> dict:
    """Why a run learns or collapses, from the teacher on one batch of global crops (gB images):
    the entropy of its [CLS] targets P_u per image and of their batch mean (uniform collapse: both near ln K;
    one-prototype collapse: both near 0; a healthy run: low per image, high for the mean), the share of the
    K prototypes that are some image's argmax, and the mean cosine between different images' backbone
    [CLS] features (near 1: every image looks alike)."""
    tokens = model.teacher.backbone(global_crops)  # (gB, 1+N, D)
    features = tokens[:, 0].float()  # (gB, D)
    P = model.loss.teacher_targets(model.teacher.head(tokens)[0].float(), model.loss.center, teacher_temp)  # (gB, K)
    entropy = -(P * P.clamp_min(1e-12).log()).sum(-1)  # (gB,)
    mean_P = P.mean(0)
    z = torch.nn.functional.normalize(features, dim=-1)
    n = z.shape[0]
    cosine = (z @ z.T).sum() - n  # off-diagonal sum
    batch_entropy = -(mean_P * mean_P.clamp_min(1e-12).log()).sum()
    return dict(target_entropy=float(entropy.mean()), batch_entropy=float(batch_entropy),
                ln_K=math.log(P.shape[-1]), prototypes_used=P.argmax(-1).unique().numel() / P.shape[-1],
                feature_cosine=float(cosine / max(n * (n - 1), 1)))


def train(args) -> dict:
    """Run (or resume) one training run; returns a summary. Raises ValueError on bad input and NonFiniteLoss.
    With a budget, everything from the call to the final checkpoint fits in it: start-up, the kNN scores at
    the start and the end, checkpoints."""
    t_start = getattr(args, "t_start", None) or time.perf_counter()
    if args.benchmark:
        import bench  # the benchmark times the same step, outside the training loop
        return bench.benchmark(args)
    run = setup(args)
    model, steps_per_epoch, global_batch, rank = run.model, run.steps_per_epoch, run.global_batch, run.rank
    out_dir, ckpt_path = Path(args.output_dir), Path(args.output_dir) / "checkpoint.pth"
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    schedules, step, knn_s = Schedules(args, total, steps_per_epoch, global_batch), 0, 0.0

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("t_start", "notes")}
    if args.resume and ckpt_path.exists():  # resume: automatic when the output folder holds a checkpoint
        ckpt = load_for_resume(ckpt_path, config)
        model.load_checkpoint(ckpt)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        step, knn_s = ckpt["step"], ckpt.get("knn_s", 0.0)
        schedules = Schedules(args, ckpt["total"], steps_per_epoch, global_batch)
        set_rng_state(ckpt["rng"])
        print0(f"resumed from {ckpt_path} at step {step} of {schedules.total}")

    def save() -> bool:
        """Write the checkpoint atomically; never write non-finite weights over a good file."""
        if not weights_finite(model):
            return False
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt = model.checkpoint()
            ckpt.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                        epoch=step // steps_per_epoch, step=step, total=schedules.total, train_config=config,
                        rng=rng_state(), knn_s=knn_s)
            save_atomic(ckpt, ckpt_path)
        return True

    def log(row):
        print0(json.dumps(row))
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def non_finite(where: str) -> NonFiniteLoss:
        kept = (f"the last good checkpoint {ckpt_path} is left as it was" if ckpt_path.exists() else
                "no checkpoint had been written yet")
        return NonFiniteLoss(f"non-finite loss {where}; {kept}. Lower --lr or keep --clip-grad on, and see "
                             f"README 'Results' for what makes a run unstable")

    print0(f"iBOT {args.arch}/{args.patch_size} on {args.dataset} ({len(run.images)} images), {run.world} x "
           f"{args.device}, {args.precision}, batch {global_batch}, {schedules.total} steps")
    scoring = bool(args.knn_every or args.knn_every_steps) and D.has_val_split(args.dataset, args.data_path,
                                                                               args.holdout_per_class)
    if scoring and step == 0:
        t0 = time.perf_counter()
        log(dict(epoch=0, step=0, images_seen=0, knn_top1=knn_monitor(model, args, run.device),  # random init
                 elapsed_s=time.perf_counter() - t_start))
        knn_s = time.perf_counter() - t0  # what one kNN score costs, kept free at the end of a budget
    interrupted, last_row, t_print = False, None, time.perf_counter()
    sums, n, t_row = {}, 0, time.perf_counter()  # the means of the steps since the last row

    def log_row(epoch: float, s: dict, batch, knn: bool) -> dict:
        nonlocal sums, n, t_row
        if not n:
            return {}
        means = {k: float(v) / n for k, v in sums.items()}
        if not all_ranks_finite(list(means.values())):
            raise non_finite(f"in the steps up to {step}")
        row = dict(epoch=epoch, step=step, images_seen=step * global_batch, **means, **s,
                   img_per_s=n * global_batch / (time.perf_counter() - t_row),
                   **diagnostics(model, batch[0].to(run.device), s["teacher_temp"]))
        if knn and scoring:
            row["knn_top1"] = knn_monitor(model, args, run.device)
        row["elapsed_s"] = time.perf_counter() - t_start
        log(row)
        sums, n, t_row = {}, 0, time.perf_counter()
        return row

    t_loop, step_at_loop = time.perf_counter(), step
    reserve = 1.2 * knn_s + 5.0 if scoring else 5.0  # the final score, checkpoint and plot after the last step
    completed = False
    try:
        while step < schedules.total:
            epoch, start_batch = divmod(step, steps_per_epoch)
            t_epoch, n_epoch = time.perf_counter(), 0
            for batch in run.epoch_batches(epoch, start_batch):
                s = schedules.at(step)
                out = train_step(run, batch, s, step < schedules.freeze_last_layer_steps)
                step += 1
                sums = {k: sums.get(k, 0.0) + v for k, v in out.items()}
                n += 1
                n_epoch += 1
                k = step - step_at_loop
                if args.budget_s and k == 2:
                    t_loop = time.perf_counter()  # the rate is measured after the first (compiling) steps
                if args.budget_s and k >= 3:  # the slowest rank's clock, so that every rank decides alike
                    elapsed, loop_s = slowest_rank(time.perf_counter() - t_start, time.perf_counter() - t_loop)
                    schedules = schedules.within_budget(step, args.budget_s - reserve - elapsed, loop_s / (k - 2),
                                                        resize=k == 3 or step % 10 == 0)
                    if k == 3:
                        epochs = schedules.total / steps_per_epoch
                        print0(f"budget {args.budget_s:.0f}s: about {schedules.total} steps ({epochs:.2f} epochs) "
                               f"at {global_batch * (k - 2) / loop_s:.0f} img/s")
                now = time.perf_counter()
                if step % 10 == 0 or step >= schedules.total:  # steps every rank shares: a collective check
                    if not all_ranks_finite([float(out["loss"])]):
                        raise non_finite(f"{float(out['loss'])} at step {step - 1}")
                if step % 10 == 0 or step >= schedules.total or now - t_print > 8:
                    eta = (schedules.total - step) * (now - t_epoch) / n_epoch
                    print0(f"epoch {epoch} step {step}/{schedules.total} loss {float(out['loss']):.3f} (cls "
                           f"{float(out['cls']):.3f} patch {float(out['patch']):.3f}) lr {s['lr']:.2e} "
                           f"{n_epoch * global_batch / (now - t_epoch):.0f} img/s {(now - t_start) / 60:.1f} min, "
                           f"ETA {eta / 60:.1f} min")
                    t_print = now
                if step >= schedules.total:
                    break
                knn = bool(args.knn_every_steps) and step % args.knn_every_steps == 0
                if ((args.log_every and step % args.log_every == 0) or knn) and step % steps_per_epoch:  # mid-epoch
                    last_row = log_row(round(step / steps_per_epoch, 3), s, batch, knn)
            knn = ((args.knn_every and (epoch + 1) % args.knn_every == 0) or step >= schedules.total
                   or (args.knn_every_steps and step % args.knn_every_steps == 0))
            last_row = log_row(epoch + 1 if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 3), s,
                               batch, knn)
            if (epoch + 1) % args.ckpt_every == 0 or step >= schedules.total:
                if not save():
                    raise non_finite(f"weights at step {step}")
        completed = True
    except KeyboardInterrupt:
        interrupted = True
        if save():
            print0(f"interrupted: saved {ckpt_path} at step {step}; run the same command again to resume")
        else:
            print0(f"interrupted at step {step} with non-finite weights: nothing saved"
                   + (f"; {ckpt_path} is the last good checkpoint" if ckpt_path.exists() else ""))
    finally:
        if dist.is_initialized():
            if completed:  # a collective: only when every rank got here the same way
                check_ranks_agree(model)
            dist.destroy_process_group()
    if rank == 0 and (out_dir / "log.jsonl").exists():
        import plot_run
        plot = plot_run.plot(out_dir)
        if plot:
            print0(f"curves: {plot}")
    return dict(steps=step, total=schedules.total, train_s=time.perf_counter() - t_start, interrupted=interrupted,
                last=last_row)


@torch.no_grad()
def check_ranks_agree(model: M.IBOT) -> None:
    """Every rank must end with the same teacher and centres; a silent divergence would poison the run."""
    state = [p.double().sum() for p in model.teacher.parameters()] + [model.loss.center.double().sum(),
                                                                       model.loss.patch_center.double().sum()]
    mine = torch.stack(state).to(model.loss.center.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    gap = max(float((other - mine).abs().max()) for other in gathered)
    if gap > 0:
        raise RuntimeError(f"ranks disagree on the teacher or the centres (max difference {gap})")
    print0(f"{len(gathered)} ranks agree on the teacher weights and loss centres")


@torch.no_grad()
def knn_monitor(model: M.IBOT, args, device) -> float:
    """kNN top-1 (k=20, T=0.07) of the teacher's [CLS] on the held-out split; the bank is the training split,
    at most knn_bank_per_class images of each class (a cheap monitor; eval_linear.py is the full protocol)."""
    t0 = time.perf_counter()
    tf = D.eval_transform(args.global_size)
    bank = min(filter(None, [args.knn_bank_per_class, args.limit_per_class]), default=None)
    splits = [D.build_dataset(args.dataset, args.data_path, "train", args.holdout_per_class, bank,
                              download=args.download),
              D.build_dataset(args.dataset, args.data_path, "val", args.holdout_per_class, download=args.download)]
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    loaders = [torch.utils.data.DataLoader(D.Transformed(images, tf), batch_size=256, num_workers=workers,
                                           generator=torch.Generator())  # spares the global RNG (exact resume)
               for images in splits]
    with torch.autocast(args.device, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext():
        train_f, train_y = M.extract_features(model.teacher.backbone, D.progress(loaders[0], "kNN bank"), device)
        val_f, val_y = M.extract_features(model.teacher.backbone, D.progress(loaders[1], "kNN val"), device)
    top1 = M.knn_classify(train_f, train_y, val_f, val_y, ks=(20,))[min(20, len(train_f))]
    print0(f"kNN top-1 {top1:.2f} (bank {len(train_f)}, {len(val_f)} val images, {time.perf_counter() - t0:.0f}s)")
    return top1


def main(argv=None, t_start: float | None = None) -> int:
    t_start = t_start or time.perf_counter()
    try:
        args = parse_args(argv)
        args.t_start = t_start
        train(args)
    except (ValueError, NonFiniteLoss) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, the ranks' lines do not interleave
        # Free the loader's workers now: torch's re-raise of a worker's error leaves a reference cycle, and a
        # loader collected later as garbage waits 5 s per worker before it kills them.
        traceback.clear_frames(e.__traceback__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(t_start=T_IMPORT))
