"""Evaluate a frozen ViT backbone: weighted kNN and a linear probe (docs/method.md, "Evaluation protocols").

Reads our checkpoints (the teacher unless --which student), official iBOT / DINO ones (full or backbone-only)
and timm ViT state dicts, all with torch.load(weights_only=True); position embeddings are interpolated to the
evaluation size, and a backbone that takes one channel is fed the images in grayscale. Without --knn or --linear
it runs both.

CPU or one GPU, a train.py CIFAR-10 run (the last 500 images of each class are the val split, as in training):
    python eval_linear.py --checkpoint runs/ibot/checkpoint.pth --dataset imagefolder \\
        --data-path "$IBOT_CIFAR10_DIR" --holdout-per-class 500 --knn --linear --lrs 1e-3 1e-2 0.1
An official ViT-S/16 on ImageNet (<path>/train and <path>/val), the full protocol (augmentation, 100 epochs):
    python eval_linear.py --checkpoint ibot_vits16_teacher.pth --dataset imagefolder --data-path /data/imagenet \\
        --linear --full --batch-size 1024
Two folders of class folders:
    python eval_linear.py --checkpoint ckpt.pth --dataset imagefolder --train-path A/ --val-path B/ --knn
One node, 8 GPUs (--batch-size is per GPU, the lr scales with the global batch):
    torchrun --standalone --nproc_per_node 8 eval_linear.py --checkpoint ckpt.pth --data-path /data/imagenet --linear

Prints a table and writes the scores, config, checkpoint hash, hardware and time to --output
(default: eval_<dataset>.json next to the checkpoint).
"""

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms as T

import data as D
import checkpoints as C
import ibot_min as M
from runtime import all_gather, pick_device, print0, setup_distributed


def default_probe(embed_dim: int) -> tuple[int, int]:
    """(n_last_blocks, avgpool) of the official recipes: ViT-S and smaller n=4, avgpool 0; ViT-B/L n=1, avgpool 2."""
    return (4, 0) if embed_dim <= 384 else (1, 2)


def probe_features(backbone: M.VisionTransformer, images: torch.Tensor, n_last_blocks: int,
                   avgpool: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, F). avgpool 0: [CLS] of the last n blocks concatenated (F = n*D); 1: mean patch token
    of the last block (F = D); 2: both (F = (n+1)*D). Every block's tokens go through the final norm."""
    if avgpool not in (0, 1, 2):
        raise ValueError(f"avgpool must be 0, 1 or 2, got {avgpool}")
    tokens = backbone.get_intermediate_layers(images, n_last_blocks)  # n x (B, 1+N, D)
    cls = [t[:, 0] for t in tokens]
    mean_patch = [tokens[-1][:, 1:].mean(dim=1)]
    return torch.cat({0: cls, 1: mean_patch, 2: cls + mean_patch}[avgpool], dim=-1).float()


def train_transform(size: int, channels: int = 3) -> T.Compose:
    to_channels, normalise = D.channels_and_normalise(channels)
    return T.Compose([*to_channels, T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalise])


# ---- features, once, in batches, sharded over ranks ----


def gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's rows (shards may differ in length by one), through runtime's collectives."""
    if world == 1:
        return t
    sizes = [int(n) for n in all_gather(torch.tensor([len(t)]))]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:len(t)] = t
    return torch.cat([p[:n] for p, n in zip(all_gather(padded), sizes)])


@torch.no_grad()
def extract_probe_features(backbone: M.VisionTransformer, batches, n_last_blocks: int, avgpool: int,
                           device) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ibot_min.extract_features, with the probe's features (not L2-normalised) in place of the final [CLS]."""
    feats, labels = [], []
    for x, y in batches:
        feats.append(probe_features(backbone, x.to(device, non_blocking=True), n_last_blocks, avgpool))
        labels.append(torch.as_tensor(y).to(device))
    return torch.cat(feats), torch.cat(labels)


# ---- the linear probe ----


def accuracy(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 (%; top-k capped at the number of classes)."""
    with torch.no_grad():
        top = linear(features).topk(min(5, linear.out_features), dim=1).indices  # (N, 5)
    hits = top == labels[:, None]
    return 100.0 * hits[:, 0].sum().item() / len(labels), 100.0 * hits.any(1).sum().item() / len(labels)


def train_linear(batches, in_dim: int, num_classes: int, lr: float, epochs: int, steps_per_epoch: int,
                 world: int = 1, log=None, device="cpu") -> nn.Linear:
    """A linear layer on frozen features: SGD momentum 0.9, no weight decay, cosine lr per step down to 0.
    `batches(epoch)` yields (features (B, F), labels (B,)); with several ranks each feeds its own shard."""
    linear = nn.Linear(in_dim, num_classes).to(device)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    # several ranks: torch's DDP averages the gradients (each rank must feed the same number of batches)
    ddp = nn.parallel.DistributedDataParallel(linear) if world > 1 else linear
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in batches(epoch):
            loss = nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, n = total + loss.item(), n + 1
        if log:
            log(epoch, total / max(n, 1), linear)
    return linear


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """The fast mode: shuffled minibatches of cached features, the order a function of (seed, epoch)."""
    def batches(epoch):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size].to(features.device)
            yield features[idx], labels[idx]
    return batches


# ---- the run ----


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--num-heads", type=int, help="attention heads, for checkpoints that do not say it (a bare "
                   "state dict; an architecture name gives it)")
    p.add_argument("--dataset", default="imagefolder", help="cifar10 | cifar100 | imagefolder | synthetic")
    p.add_argument("--data-path")
    p.add_argument("--train-path", help="imagefolder: a folder of class folders to train on (with --val-path)")
    p.add_argument("--val-path")
    p.add_argument("--download", action="store_true")
    p.add_argument("--holdout-per-class", type=int, default=0, help="one folder: its last N images per class are val")
    p.add_argument("--limit-per-class", type=int, help="use the first N training images of each class")
    p.add_argument("--image-size", type=int, help="default: the checkpoint's, else 32 for cifar/synthetic, else 224")
    p.add_argument("--knn", action="store_true")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--linear", action="store_true")
    p.add_argument("--n-last-blocks", type=int, help="default 4 for ViT-S and smaller, 1 for ViT-B/L")
    p.add_argument("--avgpool", type=int, choices=[0, 1, 2], help="default 0 for ViT-S and smaller, 2 for ViT-B/L")
    p.add_argument("--full", action="store_true", help="the full protocol: random-resized-crop + flip every epoch")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="base lr, scaled by global batch / 256")
    p.add_argument("--lrs", type=float, nargs="+", help="sweep these base lrs on cached features, keep the best")
    p.add_argument("--workers", type=int)
    p.add_argument("--device", help="cuda | mps | cpu (default: the best there is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="the JSON result file (default eval_<dataset>.json beside the checkpoint)")
    args = p.parse_args(argv)
    if not (args.knn or args.linear):
        args.knn = args.linear = True
    if args.lrs and args.full:
        p.error("--lrs sweeps on cached features; pick the lr there and pass it to --full with --lr")
    return args


def load(args) -> tuple[M.VisionTransformer, dict]:
    """The backbone and the checkpoint's config (ours: its config dict; official, DeiT, timm: vars(args))."""
    path = Path(args.checkpoint)
    ckpt = C.read_checkpoint(path)
    try:
        backbone = C.load_backbone(ckpt, args.which, args.num_heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except RuntimeError as e:  # tensors that disagree on a shape
        raise ValueError(f"checkpoint {path} does not hold one consistent ViT: {' '.join(str(e).split())}") from e
    channels = backbone.patch_embed.proj.in_channels
    if channels not in (1, 3):
        raise ValueError(f"checkpoint {path} takes {channels}-channel images; eval_linear.py feeds RGB (3 channels) "
                         f"or grayscale (1)")
    return backbone, C.saved_config(ckpt)


def datasets(args):
    """(train, val) datasets of (PIL image, label) and the class names."""
    if args.train_path or args.val_path:
        if not (args.train_path and args.val_path) or args.dataset != "imagefolder":
            raise ValueError("--train-path and --val-path go together, with --dataset imagefolder")
        # each folder whole: its "train" split with no holdout
        sets = [D.build_dataset("imagefolder", args.train_path, "train", 0, args.limit_per_class),
                D.build_dataset("imagefolder", args.val_path, "train")]
    else:
        sets = [D.build_dataset(args.dataset, args.data_path, split, args.holdout_per_class, args.limit_per_class,
                                    args.download, synthetic_size=args.image_size) for split in ("train", "val")]
    for ds in sets:
        if not ds.labelled:
            raise ValueError(f"kNN and the linear probe score labels, and these images have none: {ds.summary}")
    if sets[0].classes != sets[1].classes:
        raise ValueError(f"train and val class folders differ: {sets[0].classes} vs {sets[1].classes}")
    for name, ds in zip(("train", "val"), sets):
        if len(ds) == 0:
            raise ValueError(f"the {name} split is empty")
    return sets[0], sets[1], sets[0].classes


def check_shards(train_set, val_set, world: int) -> None:
    """Every process extracts features from its own share of each split, so each needs at least one image.
    The sizes are the same on every rank: all of them stop here, before any collective, or none."""
    for name, ds in (("train", train_set), ("val", val_set)):
        if len(ds) < world:
            raise ValueError(f"the {name} split has fewer images ({len(ds)}) than processes ({world}); run fewer "
                             f"processes (--nproc_per_node) or on more images")


def evaluate(args) -> dict:
    t_start = time.perf_counter()
    args.device = pick_device(args.device)
    rank, world, local_rank = setup_distributed(args)
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    torch.manual_seed(args.seed)
    backbone, config = load(args)
    backbone = backbone.to(device).eval().requires_grad_(False)  # frozen, and no drop path
    if args.image_size is None:  # the checkpoint's size (a non-square one: square crops of its longer side)
        stated, small = C.stated_image_size(config), args.dataset in ("cifar10", "cifar100", "synthetic")
        args.image_size = max(stated) if stated else (32 if small else 224)
    if args.image_size % backbone.patch_size:
        raise ValueError(f"image size {args.image_size} is not divisible by the backbone's patch size "
                         f"{backbone.patch_size}")
    n_default, pool_default = default_probe(backbone.embed_dim)
    args.n_last_blocks = args.n_last_blocks or min(n_default, len(backbone.blocks))
    args.avgpool = pool_default if args.avgpool is None else args.avgpool
    if not 1 <= args.n_last_blocks <= len(backbone.blocks):
        raise ValueError(f"--n-last-blocks must lie in [1, {len(backbone.blocks)}], got {args.n_last_blocks}")
    train_set, val_set, classes = datasets(args)
    check_shards(train_set, val_set, world)
    channels = backbone.patch_embed.proj.in_channels  # RGB images, or grayscale for a one-channel backbone
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else nullcontext()

    def loader(images, transform, training=False):
        dataset, data = D.Transformed(images, transform), torch.utils.data
        if training:  # --full: a shuffled shard per rank, reshuffled every epoch
            sampler = data.DistributedSampler(dataset, world, rank, seed=args.seed) if world > 1 else \
                data.RandomSampler(dataset)
        else:  # extraction: rank r takes images r, r + world, ...; gather() joins them
            dataset, sampler = data.Subset(dataset, range(rank, len(dataset), world)), None
        return data.DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=workers,
                               pin_memory=args.device == "cuda")

    def features(images, what, fn):
        with autocast:
            f, y = fn(D.progress(loader(images, D.eval_transform(args.image_size, channels)), f"{what} features"))
        return gather(f, world), gather(y, world)

    print0(f"{args.checkpoint} ({args.which}): ViT {backbone.embed_dim} wide, {len(backbone.blocks)} blocks, "
                 f"patch {backbone.patch_size}, at {args.image_size} px; {args.dataset}: {len(train_set)} train, "
                 f"{len(val_set)} val images, {len(classes)} classes; {world} x {args.device}")
    result = dict(knn={}, linear={})
    if args.knn:
        def knn_fn(batches):
            return M.extract_features(backbone, batches, device)
        bank, bank_y = features(train_set, "kNN train", knn_fn)
        test, test_y = features(val_set, "kNN val", knn_fn)
        result["knn"] = M.knn_classify(bank, bank_y, test, test_y, args.ks, args.temperature, len(classes))
    if args.linear:
        def probe_fn(batches):
            return extract_probe_features(backbone, batches, args.n_last_blocks, args.avgpool, device)
        val_x, val_y = features(val_set, "probe val", probe_fn)
        global_batch = args.batch_size * (world if args.full else 1)  # fast mode: every rank trains on all features

        def log(epoch, loss, linear):
            if (epoch + 1) % max(1, args.epochs // 10) == 0 or epoch + 1 == args.epochs or args.full:
                top1, top5 = accuracy(linear, val_x, val_y)
                print0(f"  epoch {epoch + 1}/{args.epochs} loss {loss:.4f} val top-1 {top1:.2f} top-5 {top5:.2f}")

        runs = {}
        if args.full:
            train_loader = loader(train_set, train_transform(args.image_size, channels), training=True)

            def batches(epoch):
                if world > 1:
                    train_loader.sampler.set_epoch(epoch)
                for x, y in train_loader:
                    with torch.no_grad(), autocast:
                        feats = probe_features(backbone, x.to(device, non_blocking=True), args.n_last_blocks,
                                               args.avgpool)
                    yield feats, y.to(device)
            lr = args.lr * global_batch / 256
            linear = train_linear(batches, val_x.shape[1], len(classes), lr, args.epochs, len(train_loader), world,
                                  log, device)
            runs[lr] = accuracy(linear, val_x, val_y)
        else:
            train_x, train_y = features(train_set, "probe train", probe_fn)
            steps = -(-len(train_x) // args.batch_size)
            for base_lr in args.lrs or [args.lr]:
                lr = base_lr * global_batch / 256
                print0(f"linear probe on cached features, lr {lr:g}")
                linear = train_linear(cached_batches(train_x, train_y, args.batch_size, args.seed), train_x.shape[1],
                                      len(classes), lr, args.epochs, steps, 1, log, device)
                runs[lr] = accuracy(linear, val_x, val_y)
        best = max(runs, key=lambda lr: runs[lr][0])  # selected on the val split, as the official sweeps do
        result["linear"] = dict(top1=runs[best][0], top5=runs[best][1], lr=best, features=val_x.shape[1],
                                sweep={str(lr): dict(top1=a, top5=b) for lr, (a, b) in runs.items()})
    result.update(
        config={**vars(args), "mode": "full" if args.full else "fast",
                "train_images": len(train_set), "val_images": len(val_set), "num_classes": len(classes),
                "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "patch_size": backbone.patch_size},
        checkpoint=dict(path=str(args.checkpoint), sha256=sha256(args.checkpoint)[:16], which=args.which),
        hardware=dict(device=torch.cuda.get_device_name(device) if args.device == "cuda" else args.device,
                      world_size=world, cpu_count=os.cpu_count(), torch=torch.__version__),
        seconds=time.perf_counter() - t_start)
    if rank == 0:
        print_table(result)
        out = Path(args.output or Path(args.checkpoint).with_name(f"eval_{args.dataset}.json"))
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def print_table(result: dict) -> None:
    rows = [(f"kNN k={k}", f"{top1:6.2f}", "     -") for k, top1 in result["knn"].items()]
    for lr, acc in result["linear"].get("sweep", {}).items():
        mark = " *" if float(lr) == result["linear"]["lr"] and len(result["linear"]["sweep"]) > 1 else ""
        rows.append((f"linear lr {float(lr):g}{mark}", f"{acc['top1']:6.2f}", f"{acc['top5']:6.2f}"))
    print(f"\n{'protocol':<24} {'top-1':>6} {'top-5':>6}")
    for name, top1, top5 in rows:
        print(f"{name:<24} {top1:>6} {top5:>6}")
    if "sweep" in result["linear"] and len(result["linear"]["sweep"]) > 1:
        print("* the best lr on the val split")
    print(f"{result['hardware']['device']}, {result['seconds']:.0f}s")


def main(argv=None) -> int:
    try:
        evaluate(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, the ranks' lines do not interleave
        # Free the loader's workers now: torch's re-raise of a worker's error leaves a reference cycle, and a
        # loader collected later as garbage waits 5 s per worker before it kills them.
        traceback.clear_frames(e.__traceback__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
