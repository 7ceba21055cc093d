"""Train iBOT, from a CPU CIFAR smoke run to multi-GPU ImageNet. Built on ibot_min.py.

The main job: CIFAR-10 with the recipe made for the device (cifar10 on CUDA, cifar10-cpu otherwise), on
torchvision's CIFAR-10 (downloaded into data/), or on a local folder of its class folders named by the
environment variable IBOT_CIFAR10_DIR:
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
Continue pre-training from official iBOT / DINO weights (any resolution; the heads too where they fit):
    python train.py --preset imagenet-vit-s16 --data-path /data/imagenet --load-from ibot_vits16_checkpoint.pth
The training step's speed: bench.py, with the same flags.

A run writes <output-dir>/checkpoint.pth (atomically, every epoch, every --ckpt-every-minutes, and on SIGTERM or
Ctrl-C), log.jsonl and curves.png (plot_run.py), and resumes from them when started again with the same output
folder; a second live run into that folder is refused. Every flag sets the
field of the same name in ibot_min.IBOTConfig, ibot_min.MultiCropAugmentation or TrainConfig below.
"""

import argparse
import dataclasses
import fcntl
import json
import math
import os
import re
import signal
import socket
import sys
import threading
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
import checkpoints as C  # noqa: E402
import data as D  # noqa: E402
import ibot_min as M  # noqa: E402
from runtime import all_gather, all_reduce, pick_device, pick_precision, print0, setup_distributed, world_size  # noqa: E402,E501

# ---------------------------------------------------------------------------------------------------
# ---- configuration: three dataclasses, one flag per field, presets over their defaults ----


@dataclass
class TrainConfig:
    """The run around the method: data, optimisation and schedules (docs/method.md, "Optimisation and schedules"), output.
    The networks and the loss are ibot_min.IBOTConfig, the views ibot_min.MultiCropAugmentation. The defaults
    are the official ViT-S/16 ImageNet recipe's."""

    dataset: str = "imagefolder"  # cifar10 | cifar100 | imagefolder | synthetic
    data_path: str | None = None
    download: bool = False  # let torchvision download CIFAR
    holdout_per_class: int = 0  # a folder of class folders: its last N images per class are the val split
    limit_per_class: int | None = None  # train on the first N images of each class
    batch_size: int = 64  # per process
    epochs: int = 100
    lr: float = 5e-4  # peak, per 256 images of the global batch
    min_lr: float = 1e-6
    lr_schedule: str = "cosine"  # cosine | wsd (warm-up, constant, linear decay over the last 20% of the run)
    optimizer: str = "adamw"  # adamw | muon (torch.optim.Muon on the blocks' and heads' matrices, AdamW elsewhere)
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
    load_from: str | None = None  # start from this checkpoint's weights (ours, official iBOT / DINO, timm)
    ckpt_every: int = 1  # epochs
    ckpt_every_minutes: float = 10.0  # also mid-epoch, at most this long apart; 0 = only at epoch ends
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
    patch_whitening: bool = False  # patch embedding initialised to whiten the training images' patches

    def __post_init__(self):
        for name in ("batch_size", "epochs", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("log_every", "knn_every", "knn_every_steps", "ckpt_every_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.budget is not None:
            parse_duration(self.budget)
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"--lr-schedule must be cosine or wsd, got {self.lr_schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch "
                             f"{torch.__version__}: upgrade torch or pass --optimizer adamw")


# A folder of CIFAR-10 class folders to use instead of torchvision's download (an offline lab, this project's CI).
CIFAR10_DIR_ENV = "IBOT_CIFAR10_DIR"
# Each preset holds only what differs from the dataclasses' defaults (the official ViT-S/16 recipe).
PRESETS = {
    # The official ViT-S/16 ImageNet-1K recipe: the published command (bytedance/ibot README, "iBOT Pre-Training
    # with ViTs": 800 epochs, 16 GPUs x 64) over main_ibot.py's defaults; tests/test_cluster.py holds the table.
    "imagenet-vit-s16": dict(epochs=800),
    # CIFAR-10 on one GPU: the recipe scaled to 32 px images (ViT-Tiny/4, 32 + 16 px crops, no blur, 4,096
    # prototypes), with what the CPU runs taught: a cold teacher held at tau_t = tau_t' = 0.04 (a ramp to 0.07
    # flattens the targets to ln K on short runs) and DINOv2's KoLeo term at 0.1 (docs/cpu_recipe.md).
    "cifar10": dict(dataset="cifar10", data_path="data/", download=True, arch="vit_tiny", patch_size=4,
                    global_size=32, local_size=16, local_crops=6, blur=False, out_dim=4096, batch_size=256,
                    lr=1e-3, momentum_teacher=0.99, teacher_temp=0.04, koleo=0.1, knn_every=10),
}
# The cifar10 recipe sized for a 2-core CPU: vit_nano, 1,024 prototypes, batch 64, crops made in batches on the
# device (faster there than PIL loader processes). Its lr, 1e-3 per 256, beats 4e-3 in ten-minute runs by 1.8
# kNN points over three seeds: the higher rate dips as the [CLS] term starts to learn. Three levers for a short
# run, together worth 2.7 kNN points in ten minutes over three seeds (AMX CPU): the patch embedding starts as a
# whitening of the images' patches, no drop path, and larger crops. A fourth, a faster teacher (m from 0.97 rather
# than 0.99), is worth 0.75 more over three seeds (AVX-512 BF16 CPU): the [CLS] term learns sooner (docs/cpu_recipe.md).
PRESETS["cifar10-cpu"] = {**PRESETS["cifar10"], "arch": "vit_nano", "out_dim": 1024, "head_hidden_dim": 512,
                          "batch_size": 64, "device_augment": True, "knn_every_steps": 250,
                          "patch_whitening": True, "drop_path": 0.0, "global_scale": (0.4, 1.0),
                          "local_scale": (0.1, 0.4), "momentum_teacher": 0.97}
PRESETS["cifar100"] = {**PRESETS["cifar10"], "dataset": "cifar100"}
CONFIGS = (M.IBOTConfig, M.MultiCropAugmentation, TrainConfig)
CHOICES = dict(arch=sorted(M.ARCHS), centering=["center", "sinkhorn"], mask_shape=["block", "rand"],
               lr_schedule=["cosine", "wsd"], optimizer=["adamw", "muon"],
               precision=["fp32", "bf16", "fp16"], device=["cuda", "mps", "cpu"])
NOT_FLAGS = {"mean", "std"}  # the views' normalisation follows the data (ImageNet statistics)


def build(cls, args: argparse.Namespace):
    """One of CONFIGS from the flags of the same names. Its errors speak of fields; here they name the flags."""
    try:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    except ValueError as e:
        message = str(e)
        for f in dataclasses.fields(cls):
            message = re.sub(rf"(?<![-\w]){f.name}\b", "--" + f.name.replace("_", "-"), message)
        raise ValueError(message) from None


def default_preset(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "cifar10" if device == "cuda" else "cifar10-cpu"


def parse_args(argv=None) -> argparse.Namespace:
    """Flags -> one namespace: each config field's default, then the preset's values, then the flags given.
    Every field of CONFIGS is a flag of the same name (--global-size sets global_size); --help shows the value
    the run will use, the chosen preset's where it sets one."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--device")
    chosen, _ = pre.parse_known_args(argv)
    preset = chosen.preset or default_preset(chosen.device)
    preset_values = PRESETS.get(preset, {})

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay unset, so the preset decides
    p.add_argument("--preset", default=S, help=f"one of {sorted(PRESETS)} (default: cifar10 on CUDA, else "
                                               f"cifar10-cpu; this run: {preset})")
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
            value = preset_values.get(f.name, f.default)
            where = f"preset {preset}" if f.name in preset_values else cls.__name__
            help_ = f"{value} ({where})"
            if typ is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=S, help=help_)
            elif typ is tuple:  # tuple[float, float]: exactly two numbers; tuple[float, ...]: one or more
                items = typing.get_args(hint)
                p.add_argument(flag, type=float, nargs="+" if Ellipsis in items else len(items), default=S,
                               help=help_)
            else:
                p.add_argument(flag, type=typ, choices=CHOICES.get(f.name), default=S, help=help_)
    given = vars(p.parse_args(argv))
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    notes = []  # what was chosen for the user, and why: the first lines a run prints
    if "preset" not in given:
        device = "GPU" if preset == "cifar10" else "CPU"
        other = "cifar10-cpu" if preset == "cifar10" else "cifar10"
        notes.append(f"preset {preset}: the {device} recipe, since {'a' if device == 'GPU' else 'no'} CUDA device "
                     f"is in use (--preset {other} for the other one)")
    args = argparse.Namespace(**{**defaults, **preset_values, **given})
    if "data_path" in given and "dataset" not in given and args.dataset in ("cifar10", "cifar100"):
        args.dataset, args.download = "imagefolder", given.get("download", False)  # a folder of the user's images
        notes.append(f"data: the images under {args.data_path} (--dataset imagefolder; --dataset "
                     f"{preset_values.get('dataset')} for torchvision's files there)")
    local_cifar = os.environ.get(CIFAR10_DIR_ENV)
    if args.dataset == "cifar10" and local_cifar and not {"dataset", "data_path", "download"} & set(given):
        if not Path(local_cifar).is_dir():
            p.error(f"{CIFAR10_DIR_ENV}={local_cifar} is not a folder; point it at CIFAR-10's class folders or unset it")
        holdout = given.get("holdout_per_class", 500)
        args.dataset, args.data_path, args.download, args.holdout_per_class = "imagefolder", local_cifar, False, holdout
        notes.append(f"data: CIFAR-10 images in {local_cifar} (from {CIFAR10_DIR_ENV}), the last {holdout} of each "
                     f"class held out for kNN")
    elif args.dataset in ("cifar10", "cifar100") and args.download and not {"dataset", "data_path"} & set(given):
        notes.append(f"data: torchvision's {args.dataset.upper()} in {args.data_path} (downloaded if missing), its "
                     f"test set for kNN; set {CIFAR10_DIR_ENV} to a folder of class folders to use a local copy")
    args.notes = notes
    args.budget_s = parse_duration(args.budget) if args.budget is not None else None
    return args


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h' or '300' (seconds) -> seconds; a positive duration only."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--budget must be a positive duration such as 90s, 5m, 1.5h or 300 (seconds), "
                         f"got {text!r}")
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

        lr_schedule = M.wsd_schedule if args.lr_schedule == "wsd" else M.cosine_schedule
        self.lr = lr_schedule(args.lr * global_batch / 256, args.min_lr, total, steps(args.warmup_epochs))
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


class MuonWithAdamW:
    """--optimizer muon: torch.optim.Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") on the
    2-D weights of the transformer blocks and of the head's MLP, with the update scaled to AdamW's RMS (Liu et
    al. 2025, "Muon is scalable for LLM training"), so that the lr and weight-decay schedules carry over
    unchanged; AdamW, as the official code, on the rest (patch embedding, tokens, norms, biases, prototypes).
    One optimiser to the loop: param_groups are AdamW's two (decayed, not) then Muon's one."""

    def __init__(self, model: torch.nn.Module, adamw_kwargs: dict):
        matrices = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2
                    and (".blocks." in n or ".mlp." in n) and "last_layer" not in n]
        chosen = {id(p) for p in matrices}
        rest = torch.nn.ParameterList([p for p in model.parameters() if p.requires_grad and id(p) not in chosen])
        self.adamw = torch.optim.AdamW(M.param_groups(rest), lr=0.0, **adamw_kwargs)
        self.muon = torch.optim.Muon(matrices, lr=0.0, adjust_lr_fn="match_rms_adamw")
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict):
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = self.adamw.param_groups + self.muon.param_groups


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
MAY_CHANGE_ON_RESUME = {"preset", "output_dir", "resume", "load_from", "ckpt_every", "ckpt_every_minutes",
                        "knn_every", "knn_every_steps", "knn_bank_per_class", "log_every", "download", "workers",
                        "device", "precision", "compile"}


def load_for_resume(path: Path, config: dict) -> dict:
    """The checkpoint to resume from, or one clear ValueError: damaged, or made with other settings."""
    try:
        ckpt = C.read_checkpoint(path)
        saved = ckpt["train_config"]
    except (ValueError, KeyError) as e:  # cut, foreign or not ours
        raise ValueError(f"cannot resume from {path}: the file is damaged or not a train.py checkpoint "
                         f"({type(e).__name__}); pass --no-resume to start afresh, or another --output-dir") from None
    diff = {k: (saved[k], v) for k, v in config.items()  # fields a checkpoint predates are not compared
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != v}
    if diff:
        listed = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(diff.items()))
        raise ValueError(f"cannot resume {path}: it was made with other settings ({listed}); use the same "
                         f"flags, another --output-dir, or --no-resume")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# ---- the run: setup (bench.py times the same), the step ----


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

    args: argparse.Namespace  # every field of CONFIGS, as parsed
    config: TrainConfig  # the same values, typed: what the loop reads
    model: M.IBOT
    student: torch.nn.Module  # model.student, or its DistributedDataParallel wrapper on several ranks
    optimizer: typing.Any  # torch.optim.AdamW, or MuonWithAdamW
    scaler: torch.amp.GradScaler
    autocast: typing.Any
    device: str
    rank: int
    world: int
    images: torch.utils.data.Dataset
    steps_per_epoch: int
    epoch_batches: typing.Callable  # (epoch, start_batch) -> batches (global, local, masks), crop-major
    decayed: tuple = ()  # per optimizer param group: whether the weight-decay schedule applies to it

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world


def setup(args) -> Run:
    """Device, processes, data and batches, model, optimiser: everything before the first step."""
    build(TrainConfig, args)  # bad values fail here, before any process group or data
    args.device = pick_device(args.device)
    args.precision = pick_precision(args.precision, args.device)
    config = build(TrainConfig, args)
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
    print0(f"data: {images.summary}")
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
        pixels = D.decode_all(images, workers, args.global_size).to(device)
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
    if args.patch_whitening and args.load_from:
        print0(f"--patch-whitening: not applied, the weights come from {args.load_from}")
    elif args.patch_whitening:
        whiten_from_training_images(model, images, args.global_size)
    if args.load_from:
        load_weights(model, args.load_from)
    torch.manual_seed(args.seed + 1 + rank)  # drop path differs per rank; data draws are seeded per sample
    fused = {"fused": True} if args.device in ("cuda", "cpu") else {}  # fused AdamW: one kernel for all parameters
    optimizer = (MuonWithAdamW(model.student, fused) if args.optimizer == "muon" else
                 torch.optim.AdamW(M.param_groups(model.student), lr=0.0, **fused))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = nullcontext() if dtype is None else torch.autocast(args.device, dtype=dtype)
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    if args.compile:  # the backbones hold nearly all the work; compiled in place (ReadOnlyStudent's last block
        # runs on the rows the loss reads, whose count follows the masks: a data-dependent shape there)
        model.student.backbone.compile()
        model.teacher.backbone.compile()
    student = model.student
    if world > 1:  # torch's DDP averages the gradients, overlapping the all-reduce with the backward pass
        student = torch.nn.parallel.DistributedDataParallel(model.student,
                                                            device_ids=[local_rank] if args.device == "cuda" else None)
    decayed = tuple(group["weight_decay"] != 0 for group in optimizer.param_groups)  # before any checkpoint loads
    return Run(args, config, model, student, optimizer, scaler, autocast, device, rank, world, images,
               len(sampler) // args.batch_size, epoch_batches, decayed)


def whiten_from_training_images(model: M.IBOT, images, size: int, n: int = 256) -> None:
    """Student and teacher start from the whitening of n training images' patches (M.whiten_patch_embed), the
    images spread evenly over the dataset and seen as the kNN monitor sees them."""
    pick = torch.linspace(0, len(images) - 1, min(n, len(images))).long().tolist()
    sample = D.Transformed(images, D.eval_transform(size))
    M.whiten_patch_embed(model.student.backbone.patch_embed, torch.stack([sample[i][0] for i in pick]).to(
        model.student.backbone.patch_embed.proj.weight.device))
    model.update_teacher(0.0)  # the teacher starts as a copy of the student
    p = model.cfg.patch_size
    print0(f"patch embedding: the whitening of the {p} x {p} patches of {len(pick)} training images")


def train_step(run: Run, batch, s: dict, freeze_last_layer: bool) -> dict:
    """One step: loss, backward, clipping, AdamW, EMA of the teacher. `s`: this step's schedule values."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    global_crops, local_crops, masks = (None if t is None else t.to(run.device, non_blocking=True) for t in batch)
    for group, decayed in zip(optimizer.param_groups, run.decayed):
        group["lr"] = s["lr"]
        if decayed:  # the groups of biases and 1-D parameters are never decayed
            group["weight_decay"] = s["wd"]
    with run.autocast:
        out = model(global_crops, local_crops, masks, s["teacher_temp"], s["teacher_patch_temp"], student=run.student)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.unscale_(optimizer)
    clip_gradients([p for p in model.student.parameters() if p.grad is not None], run.config.clip_grad)
    if freeze_last_layer:
        for n, p in model.student.named_parameters():
            if "last_layer" in n:
                p.grad = None  # the first epoch: no update, and no decay either, of the prototypes
    scaler.step(optimizer)
    scaler.update()
    model.update_teacher(s["momentum"])
    return {k: v.detach() for k, v in out.items()}



def load_weights(model: M.IBOT, path: str) -> None:
    """--load-from: the student and the teacher start from a checkpoint's backbones (ours, official iBOT / DINO,
    timm; its student for ours and the official files, else the one backbone for both), position embeddings
    interpolated to this run's grid; the heads too where the file has them at this run's shapes."""
    ckpt = C.read_checkpoint(path)
    for side, net in (("student", model.student), ("teacher", model.teacher)):
        source = C.load_backbone(ckpt, side if side in ckpt else "teacher", num_heads=M.ARCHS[model.cfg.arch]["num_heads"])
        state = source.state_dict()
        state["pos_embed"] = source.interpolate_pos_embed(*net.backbone.grid).detach()
        missing, unexpected = net.backbone.load_state_dict(state, strict=False)
        if set(missing) - {"masked_embed"} or unexpected:
            raise ValueError(f"--load-from {path}: its {side} backbone does not fit --arch {model.cfg.arch} "
                             f"(missing {missing}, unexpected {unexpected})")
        heads = {k.split("head.", 1)[1]: v for k, v in ckpt.get(side, {}).items() if "head." in k}
        ours = net.head.state_dict()
        fits = heads and all(k in heads and heads[k].shape == v.shape for k, v in ours.items())
        if fits:
            net.head.load_state_dict({k: heads[k] for k in ours})
        print0(f"--load-from {path}: the {side}'s backbone" + (" and head" if fits else " (a new head)"))

# ---------------------------------------------------------------------------------------------------
# ---- around the loop: ranks that agree, stop signals, the output folder, checkpoints, the log ----


def slowest_rank(*seconds: float) -> list[float]:
    """Each clock reading as the slowest rank has it (the same numbers on every rank)."""
    return all_reduce(torch.tensor(seconds, dtype=torch.float64), dist.ReduceOp.MAX).tolist()


def any_rank(*flags: bool) -> list[bool]:
    """Whether each flag is true on some rank: the same answers on every rank, from one small all-reduce, so
    that every rank stops, saves or raises at the same step and none waits forever."""
    return [bool(v) for v in all_reduce(torch.tensor([float(f) for f in flags]), dist.ReduceOp.MAX)]


class StopSignals:
    """SIGTERM (how clusters preempt a job; torchrun passes it on) and SIGINT (Ctrl-C) ask the run to stop: the
    loop saves the step it is at and returns. A second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class OutputFolder:
    """The run's folder, made and tried for writing before any image is decoded, and locked for the run: a second
    live run into it is refused in one line. The lock (flock) ends with its process, so a killed run leaves none."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank, self.lock, self.made = path, rank, None, False

    def __enter__(self):
        if self.rank:
            return self
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / "run.lock", "a+")
        except OSError as e:
            raise ValueError(f"--output-dir {self.path} cannot be written ({e.strerror or e}); pass another "
                             f"--output-dir") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.seek(0)
            owner = self.lock.read().strip() or "another process"
            self.lock.close()
            raise ValueError(f"another run ({owner}) is writing to {self.path}; wait for it to end, stop it, or pass "
                             f"another --output-dir") from None
        self.lock.truncate(0)
        self.lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.lock.flush()
        return self

    def __exit__(self, *exc):
        if self.lock:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            if self.made and [p.name for p in self.path.iterdir()] == ["run.lock"]:  # a run that wrote nothing
                (self.path / "run.lock").unlink()
                self.path.rmdir()


class Checkpoints:
    """<output-dir>/checkpoint.pth: written atomically by rank 0, never with non-finite weights, and read back to
    resume exactly (weights, centres, optimiser, scaler, step, schedule length, RNG)."""

    def __init__(self, run: "Run", path: Path, config: dict):
        self.run, self.path, self.config, self.t_saved = run, path, config, time.perf_counter()

    def resume(self, schedules: Schedules) -> tuple[Schedules, int, float]:
        """(schedules, step, seconds one kNN score takes) to go on from: the checkpoint's, or a fresh start's."""
        run = self.run
        if not (run.config.resume and self.path.exists()):
            return schedules, 0, 0.0
        ckpt = load_for_resume(self.path, self.config)
        run.model.load_checkpoint(ckpt)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        schedules = Schedules(run.args, ckpt["total"], run.steps_per_epoch, run.global_batch)
        print0(f"resumed from {self.path} at step {ckpt['step']} of {schedules.total}")
        return schedules, ckpt["step"], ckpt.get("knn_s", 0.0)

    def due(self) -> bool:
        minutes = self.run.config.ckpt_every_minutes
        return bool(minutes) and time.perf_counter() - self.t_saved > 60 * minutes

    def save(self, step: int, schedules: Schedules, knn_s: float) -> bool:
        """Write the checkpoint; False (and nothing written) when the weights are not finite."""
        run = self.run
        if not weights_finite(run.model):
            return False
        if run.rank == 0:
            ckpt = run.model.checkpoint()
            ckpt.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                        epoch=step // run.steps_per_epoch, step=step, total=schedules.total,
                        train_config=self.config, rng=rng_state(), knn_s=knn_s)
            save_atomic(ckpt, self.path)
        self.t_saved = time.perf_counter()
        return True

    def non_finite(self, where: str) -> "NonFiniteLoss":
        kept = (f"the last good checkpoint {self.path} is left as it was" if self.path.exists() else
                "no checkpoint had been written yet")
        return NonFiniteLoss(f"non-finite loss {where}; {kept}. Lower --lr or keep --clip-grad on "
                             f"(docs/cpu_recipe.md says what makes a run unstable)")


def weights_finite(model: M.IBOT) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*model.student.parameters(), *model.teacher.parameters()])


@torch.no_grad()
def diagnostics(model: M.IBOT, global_crops: torch.Tensor, teacher_temp: float) -> dict:
    """Why a run learns or collapses, from the teacher on one batch of global crops (gB images):
    the entropy of its [CLS] targets P_u per image and of their batch mean (uniform collapse: both near ln K;
    one-prototype collapse: both near 0; a healthy run: low per image, high for the mean), the share of the
    K prototypes that are some image's argmax, and the mean cosine between different images' backbone
    [CLS] features (near 1: every image looks alike). Only [CLS] goes through the head."""
    features = model.teacher.backbone(global_crops)[:, 0].float()  # (gB, D)
    head = model.teacher.head
    P = model.loss.teacher_targets(head.cls_logits(head.project(features)), model.loss.center, teacher_temp)  # (gB, K)
    entropy = -(P * P.clamp_min(1e-12).log()).sum(-1)  # (gB,)
    mean_P = P.mean(0)
    z = torch.nn.functional.normalize(features, dim=-1)
    n = z.shape[0]
    cosine = (z @ z.T).sum() - n  # off-diagonal sum
    batch_entropy = -(mean_P * mean_P.clamp_min(1e-12).log()).sum()
    return dict(target_entropy=float(entropy.mean()), batch_entropy=float(batch_entropy),
                ln_K=math.log(P.shape[-1]), prototypes_used=P.argmax(-1).unique().numel() / P.shape[-1],
                feature_cosine=float(cosine / max(n * (n - 1), 1)))


class Log:
    """The run's record: log.jsonl rows (the means of the loss terms since the last row, the schedules, img/s,
    the diagnostics and, when due, the kNN score), and a progress line at least every 8 s."""

    def __init__(self, run: "Run", out_dir: Path, t_start: float, non_finite: typing.Callable):
        cfg = run.config
        self.run, self.path, self.t_start, self.non_finite = run, out_dir / "log.jsonl", t_start, non_finite
        self.scoring = bool(cfg.knn_every or cfg.knn_every_steps) and D.has_val_split(
            cfg.dataset, cfg.data_path, cfg.holdout_per_class)
        self.sums, self.n, self.t_row, self.t_print, self.last = {}, 0, time.perf_counter(), 0.0, None
        if (cfg.knn_every or cfg.knn_every_steps) and not self.scoring:
            print0("kNN monitor off: the images have no labels (no class folders); target_entropy, batch_entropy, "
                   "prototypes_used and feature_cosine in log.jsonl show whether it learns (docs/small_data.md)"
                   if not getattr(run.images, "labelled", True) else
                   "kNN monitor off: no val split; pass --holdout-per-class N to hold out N images of each class")

    def write(self, row: dict) -> None:
        print0(json.dumps(row))
        if self.run.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def knn(self) -> float:
        return knn_monitor(self.run.model, self.run.args, self.run.device)

    def first_row(self) -> float:
        """The random-init kNN score, step 0; returns what one score costs (kept free at the end of a budget)."""
        t0 = time.perf_counter()
        top1 = self.knn()
        self.write(dict(epoch=0, step=0, images_seen=0, knn_top1=top1, elapsed_s=time.perf_counter() - self.t_start))
        return time.perf_counter() - t0

    def knn_due(self, step: int, epochs_done: int | None, last: bool) -> bool:
        cfg = self.run.config
        return self.scoring and (last or bool(cfg.knn_every_steps and step % cfg.knn_every_steps == 0)
                                 or bool(epochs_done and cfg.knn_every and epochs_done % cfg.knn_every == 0))

    def add(self, out: dict) -> None:
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in out.items()}
        self.n += 1

    def row(self, epoch: float, step: int, s: dict, batch, knn: bool) -> dict:
        """A row of the steps since the last one; a non-finite mean on any rank raises (on every rank)."""
        if not self.n:
            return {}
        means = {k: float(v) / self.n for k, v in self.sums.items()}
        if any_rank(not all(math.isfinite(v) for v in means.values()))[0]:
            raise self.non_finite(f"in the steps up to {step}")
        run = self.run
        row = dict(epoch=epoch, step=step, images_seen=step * run.global_batch, **means, **s,
                   img_per_s=self.n * run.global_batch / (time.perf_counter() - self.t_row),
                   **diagnostics(run.model, batch[0].to(run.device), s["teacher_temp"]))
        if knn:
            row["knn_top1"] = self.knn()
        row["elapsed_s"] = time.perf_counter() - self.t_start
        self.write(row)
        self.sums, self.n, self.t_row, self.last = {}, 0, time.perf_counter(), row
        return row

    def progress(self, epoch: int, step: int, total: int, out: dict, s: dict, t_epoch: float, n_epoch: int) -> None:
        now = time.perf_counter()
        if step % 10 and step < total and now - self.t_print <= 8:
            return
        eta = (total - step) * (now - t_epoch) / n_epoch
        print0(f"epoch {epoch} step {step}/{total} loss {float(out['loss']):.3f} (cls {float(out['cls']):.3f} "
               f"patch {float(out['patch']):.3f}) lr {s['lr']:.2e} "
               f"{n_epoch * self.run.global_batch / (now - t_epoch):.0f} img/s {(now - self.t_start) / 60:.1f} min, "
               f"ETA {eta / 60:.1f} min")
        self.t_print = now


class BudgetPacer:
    """--budget: the schedules sized to end with it, from the step rate measured after the first two (compiling)
    steps, on the slowest rank's clock so that every rank decides alike; `reserve` seconds are kept for what
    follows the last step (the final kNN score, checkpoint and plot)."""

    def __init__(self, budget_s: float | None, reserve: float, t_start: float, first_step: int, global_batch: int):
        self.budget_s, self.reserve, self.t_start, self.first = budget_s, reserve, t_start, first_step
        self.global_batch, self.t_loop = global_batch, time.perf_counter()

    def __call__(self, schedules: Schedules, step: int) -> Schedules:
        k = step - self.first
        if not self.budget_s or k < 2:
            return schedules
        if k == 2:
            self.t_loop = time.perf_counter()
            return schedules
        elapsed, loop_s = slowest_rank(time.perf_counter() - self.t_start, time.perf_counter() - self.t_loop)
        schedules = schedules.within_budget(step, self.budget_s - self.reserve - elapsed, loop_s / (k - 2),
                                            resize=k == 3 or step % 10 == 0)
        if k == 3:
            print0(f"budget {self.budget_s:.0f}s: about {schedules.total} steps "
                   f"({schedules.total / schedules.steps_per_epoch:.2f} epochs) at "
                   f"{self.global_batch * (k - 2) / loop_s:.0f} img/s")
        return schedules


# ---------------------------------------------------------------------------------------------------
# ---- the loop ----


def train(args) -> dict:
    """Run (or resume) one training run; returns a summary. Raises ValueError on bad input and NonFiniteLoss.
    With a budget, everything from the call to the final checkpoint fits in it: start-up, the kNN scores at
    the start and the end, checkpoints. SIGTERM or Ctrl-C save the step the run is at and return."""
    t_start = getattr(args, "t_start", None) or time.perf_counter()
    out_dir = Path(args.output_dir)
    for cls in CONFIGS:  # bad values fail here, before the output folder is made
        build(cls, args)
    with OutputFolder(out_dir, int(os.environ.get("RANK", 0))), StopSignals() as signals:
        run = setup(args)
        cfg, spe = run.config, run.steps_per_epoch
        total = min(cfg.epochs * spe, cfg.max_steps or cfg.epochs * spe)
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                  if k not in ("t_start", "notes")}
        checkpoints = Checkpoints(run, out_dir / "checkpoint.pth", config)
        schedules, step, knn_s = checkpoints.resume(Schedules(args, total, spe, run.global_batch))
        log = Log(run, out_dir, t_start, checkpoints.non_finite)
        print0(f"iBOT {args.arch}/{args.patch_size} on {cfg.dataset} ({len(run.images)} images), {run.world} x "
               f"{cfg.device}, {cfg.precision}, batch {run.global_batch}, {schedules.total} steps")
        if log.scoring and step == 0:
            knn_s = slowest_rank(log.first_row())[0]  # one figure on every rank, so every rank paces alike
        pace = BudgetPacer(args.budget_s, 1.2 * knn_s + 5.0 if log.scoring else 5.0, t_start, step, run.global_batch)
        stopped, completed = None, False
        try:
            while step < schedules.total and not stopped:
                epoch, start_batch = divmod(step, spe)
                t_epoch, n_epoch = time.perf_counter(), 0
                for batch in run.epoch_batches(epoch, start_batch):
                    s = schedules.at(step)
                    out = train_step(run, batch, s, step < schedules.freeze_last_layer_steps)
                    step, n_epoch = step + 1, n_epoch + 1
                    log.add(out)
                    schedules = pace(schedules, step)
                    last = step >= schedules.total
                    if step % 10 == 0 or last or (run.world == 1 and signals.received):  # what every rank shares
                        bad, stop, save = any_rank(not math.isfinite(float(out["loss"])), bool(signals.received),
                                                   checkpoints.due())
                        if bad:
                            raise checkpoints.non_finite(f"{float(out['loss'])} at step {step - 1}")
                        if stop:
                            stopped = signals.received or "a signal on another rank"
                            break
                        if save and not last and not checkpoints.save(step, schedules, knn_s):
                            raise checkpoints.non_finite(f"weights at step {step}")
                    log.progress(epoch, step, schedules.total, out, s, t_epoch, n_epoch)
                    if last:
                        break
                    knn = log.knn_due(step, None, False)
                    if ((cfg.log_every and step % cfg.log_every == 0) or knn) and step % spe:  # mid-epoch rows
                        log.row(round(step / spe, 3), step, s, batch, knn)
                if stopped:
                    break
                epochs_done = step // spe if step % spe == 0 else None
                knn = log.knn_due(step, epochs_done, step >= schedules.total)
                if knn and step >= schedules.total and args.budget_s:  # the last score only if the budget holds it
                    left = args.budget_s - slowest_rank(time.perf_counter() - t_start)[0]
                    if left < 1.1 * knn_s + 2:
                        knn = False
                        print0(f"budget: {max(left, 0):.0f}s left, too few for the final kNN score (about "
                               f"{knn_s:.0f}s): skipped")
                log.row(epochs_done or round(step / spe, 3), step, s, batch, knn)
                if (epoch + 1) % cfg.ckpt_every == 0 or step >= schedules.total:
                    if not checkpoints.save(step, schedules, knn_s):
                        raise checkpoints.non_finite(f"weights at step {step}")
            completed = not stopped
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop's first check
            stopped = "SIGINT"
        finally:
            try:
                if completed and dist.is_initialized():  # a collective: only when every rank got here alike
                    check_ranks_agree(run.model)
                if stopped:
                    save_on_stop(checkpoints, stopped, step, schedules, knn_s)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
    if run.rank == 0 and log.path.exists():
        import plot_run  # matplotlib, only now
        plot = plot_run.plot(out_dir)
        if plot:
            print0(f"curves: {plot}")
    return dict(steps=step, total=schedules.total, train_s=time.perf_counter() - t_start,
                interrupted=bool(stopped), stopped_by=stopped, last=log.last)


def save_on_stop(checkpoints: Checkpoints, stopped: str, step: int, schedules: Schedules, knn_s: float) -> None:
    if checkpoints.save(step, schedules, knn_s):
        print0(f"stopped by {stopped}: saved {checkpoints.path} at step {step}; run the same command again to resume")
    else:
        print0(f"stopped by {stopped} at step {step} with non-finite weights: nothing saved"
               + (f"; {checkpoints.path} is the last good checkpoint" if checkpoints.path.exists() else ""))


@torch.no_grad()
def check_ranks_agree(model: M.IBOT) -> None:
    """Every rank must end with the same teacher and centres; a silent divergence would poison the run."""
    state = [p.double().sum() for p in model.teacher.parameters()] + [model.loss.center.double().sum(),
                                                                       model.loss.patch_center.double().sum()]
    mine = torch.stack(state)
    gap = max(float((other - mine).abs().max()) for other in all_gather(mine))
    if gap > 0:
        raise RuntimeError(f"ranks disagree on the teacher or the centres (max difference {gap})")
    print0(f"{world_size()} ranks agree on the teacher weights and loss centres")


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
    """The command: 0 when the run ends, 128 + the signal's number when SIGTERM or Ctrl-C stopped it (its step
    saved), 1 with one line on stderr for bad input or a non-finite loss."""
    t_start = t_start or time.perf_counter()
    try:
        args = parse_args(argv)
        args.t_start = t_start
        summary = train(args)
    except (ValueError, NonFiniteLoss) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, the ranks' lines do not interleave
        # Free the loader's workers now: torch's re-raise of a worker's error leaves a reference cycle, and a
        # loader collected later as garbage waits 5 s per worker before it kills them.
        traceback.clear_frames(e.__traceback__)
        return 1
    stopped = summary["stopped_by"]
    return 128 + signal.Signals[stopped].value if stopped in ("SIGTERM", "SIGINT") else 0


if __name__ == "__main__":
    sys.exit(main(t_start=T_IMPORT))
