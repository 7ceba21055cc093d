"""The official iBOT step against ours, side by side in one process, at the CPU benchmark shape of docs/performance.md.

    git clone https://github.com/bytedance/ibot /tmp/ibot && pip install timm
    python scripts/bench_official.py /tmp/ibot [--rounds 10]

Shape: vit_tiny/4, 2 global crops of 32 px + 6 local crops of 16 px, batch 64, K = 4096 prototypes for [CLS]
and patches, official defaults otherwise (head 2048/256, drop path 0.1, norm_last_layer off, 30% of patches
masked). The official step is its train_one_epoch body (main_ibot.py): teacher on the global crops, masked
student on them, student on the local crops, iBOTLoss, backward, clip_gradients, cancel_gradients_last_layer,
AdamW, EMA, built from its own modules (models.vit_tiny, models.head.iBOTHead, utils.MultiCropWrapper). Its
autocast is CUDA-only, so on a CPU it runs in fp32; `official-bf16` wraps the same step in a CPU bf16 autocast
for comparison. Ours is train.py's step (train.setup, train.train_step, as bench.py times it) with `--device-augment`:
like the official step on its ready tensors, ours runs on a batch drawn before the clock starts (loader processes
preparing the next batch would share the 2 cores with the timed step). Each round times one step of every variant
in turn, so that all four see the same machine even when its speed drifts within minutes; each figure is the
median over rounds. One JSON line per round (img/s of each variant), one line of our step's matrix products timed
alone at their own shapes (bench.py --matmuls), then a summary line with the ratios, the smallest and largest
round-by-round ratio of ours (bf16) to the official fp32 step, and that floor over the official fp32 step: the
ceiling of any step that does our step's matrix products.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import train  # noqa: E402

B, K, G, L, WARMUP = 64, 4096, 2, 6, 3
OURS = ["--preset", "cifar10", "--dataset", "synthetic", "--arch", "vit_tiny", "--patch-size", "4", "--global-size",
        "32", "--local-size", "16", "--local-crops", "6", "--batch-size", "64", "--out-dim", "4096", "--device", "cpu",
        "--device-augment"]  # views drawn between the timed steps, not by loader processes that share the 2 cores


def official_step(repo: Path, bf16: bool):
    """The official code's training step on random images, as a function of no arguments (one step per call)."""
    sys.path.insert(0, str(repo))
    for unused in ("tensorboardX", "evaluation.unsupervised.unsup_cls"):  # imported by main_ibot, unused here
        sys.modules.setdefault(unused, types.SimpleNamespace(SummaryWriter=None, eval_pred=None))
    import main_ibot
    import models
    import utils
    from models.head import iBOTHead

    if not torch.distributed.is_initialized():  # its loss all-reduces the centres: a group of one process
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    torch.manual_seed(0)
    vit = lambda **kw: models.vit_tiny(patch_size=4, img_size=[32], return_all_tokens=True, **kw)  # noqa: E731
    student = utils.MultiCropWrapper(vit(drop_path_rate=0.1, masked_im_modeling=True), iBOTHead(
        192, K, patch_out_dim=K, norm=None, act="gelu", norm_last_layer=False, shared_head=False))
    teacher = utils.MultiCropWrapper(vit(), iBOTHead(192, K, patch_out_dim=K, norm=None, act="gelu",
                                                     shared_head=True))
    teacher.load_state_dict(student.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = main_ibot.iBOTLoss(K, K, G, L, 0.04, 0.07, 0.04, 0.07, 30, 100)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=1e-4)
    teacher_params = dict(teacher.named_parameters())
    pairs = [(q, teacher_params[n]) for n, q in student.named_parameters() if n in teacher_params]
    images = [torch.randn(B, 3, 32, 32) for _ in range(G)] + [torch.randn(B, 3, 16, 16) for _ in range(L)]
    masks = [torch.rand(B, 8, 8) < 0.3 for _ in range(G)]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            teacher_output = teacher(images[:G])
            student_output = student(images[:G], mask=masks[:G])
            student.backbone.masked_im_modeling = False
            student_local_cls = student(images[G:])[0]
            student.backbone.masked_im_modeling = True
            loss = loss_fn(student_output, teacher_output, student_local_cls, masks, 0).pop("loss")
        if not torch.isfinite(loss):
            raise RuntimeError("the official step gave a non-finite loss")
        optimizer.zero_grad()
        loss.backward()
        utils.clip_gradients(student, 3.0)
        utils.cancel_gradients_last_layer(0, student, 1)
        optimizer.step()
        with torch.no_grad():
            for q, k in pairs:
                k.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)
    return step


def our_step(precision: str, n_batches: int = 4):
    """Our training step (train.setup and train.train_step, as bench.py times it) on batches drawn beforehand, in
    turn (the number of masked patches, and so the work, varies a little from batch to batch)."""
    args = train.parse_args(OURS + ["--precision", precision])
    torch.manual_seed(0)
    run = train.setup(args)
    schedules = train.Schedules(args, 1, run.steps_per_epoch, run.global_batch)
    batches = list(itertools.islice(run.epoch_batches(0, 0), n_batches))
    calls = itertools.count()
    return lambda: float(train.train_step(run, batches[next(calls) % n_batches], schedules.at(0), False)["loss"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", type=Path, help="a clone of github.com/bytedance/ibot")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds, each one step of every variant, after "
                   f"{WARMUP} warm-up rounds")
    args = p.parse_args()
    if not (args.official / "main_ibot.py").is_file():
        p.error(f"{args.official} has no main_ibot.py: expected a clone of github.com/bytedance/ibot")
    steps = {"official-fp32": official_step(args.official, bf16=False),
             "official-bf16": official_step(args.official, bf16=True),
             "ours-bf16": our_step("bf16"), "ours-fp32": our_step("fp32")}
    seconds = {name: [] for name in steps}
    for r in range(WARMUP + args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= WARMUP:
                seconds[name].append(time.perf_counter() - t0)
        if r >= WARMUP:
            img_per_s = {k: round(B / v[-1], 2) for k, v in seconds.items()}
            print(json.dumps(dict(round=r - WARMUP, **img_per_s)), flush=True)
    img_per_s = {name: B / statistics.median(v) for name, v in seconds.items()}
    per_round = [o / b for o, b in zip(seconds["official-fp32"], seconds["ours-bf16"])]  # the ratio round by round
    # ours' matrix products alone at their shapes (bench.matmul_floor): no step that computes them can be faster
    floor = bench.matmul_floor(train.parse_args(OURS + ["--precision", "bf16"]), B / img_per_s["ours-bf16"])
    print(json.dumps(dict(img_per_s={k: round(v, 2) for k, v in img_per_s.items()},
                          ours_bf16_over_official_fp32=round(img_per_s["ours-bf16"] / img_per_s["official-fp32"], 2),
                          ours_bf16_over_official_bf16=round(img_per_s["ours-bf16"] / img_per_s["official-bf16"], 2),
                          ours_fp32_over_official_fp32=round(img_per_s["ours-fp32"] / img_per_s["official-fp32"], 2),
                          ours_bf16_over_official_fp32_by_round=dict(min=round(min(per_round), 2),
                                                                     max=round(max(per_round), 2)),
                          matmul_floor_bf16_over_official_fp32=round(floor["floor_img_per_s"]
                                                                     / img_per_s["official-fp32"], 2),
                          **bench.cpu_bf16_units(), threads=torch.get_num_threads(),
                          torch=torch.__version__, rounds=args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
