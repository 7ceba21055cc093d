"""Data plumbing shared by train.py and eval_linear.py: datasets of (PIL image, label), reading images,
the evaluation transform, and the per-sample-seeded multi-crop dataset with its collate.

Datasets: torchvision's CIFAR-10/100 (with its download), a folder of class folders (ImageFolder layout, one
folder with a held-out tail per class, or train/ + val/), and synthetic images for smoke runs.
"""

import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import ibot_min as M
from runtime import print0


class BadImage(ValueError):
    """An image file that cannot be used, named in one line. A DataLoader worker's error reaches the main process
    re-made from the worker's whole traceback text, whose last line is this error's own: only that is kept."""

    def __init__(self, message: str):
        last_line = (message.strip().splitlines() or [""])[-1]
        super().__init__(last_line.split(f"{BadImage.__name__}: ", 1)[-1])


def read_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit grayscale (PNG's mode I;16, or I) is scaled to 8 bits, where PIL's
    convert() would clip it at 255 and turn a full-range image nearly white."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # name the file: one bad image in a million must be findable
        raise BadImage(f"cannot read image {path}: {' '.join(str(e).split())}") from e
    if img.mode.startswith("I"):
        pixels = np.asarray(img)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadImage(f"cannot read image {path}: mode {img.mode} holds values {pixels.min()}..{pixels.max()}, "
                           f"expected 8- or 16-bit pixels")
        img = Image.fromarray(((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8))  # round(x / 257)
    elif img.mode == "F":
        raise BadImage(f"cannot read image {path}: floating-point pixels (mode F) have no known range, "
                       f"expected 8- or 16-bit pixels")
    return img.convert("RGB")


def image_name(images, i: int) -> str:
    """Image i's file where the dataset has files (ImageFolder), else its index."""
    samples = getattr(images, "samples", None)
    return samples[i][0] if samples else f"image {i}"


def image_folder(root: Path) -> torchvision.datasets.ImageFolder:
    """A folder of class folders, each with at least one image."""
    try:
        return torchvision.datasets.ImageFolder(str(root), loader=read_image)
    except FileNotFoundError as e:  # no class folders, or a class folder without images (torchvision names it)
        raise ValueError(f"no images found in {root}: expected class folders of images, each with at least one "
                         f"({e})") from e


class SyntheticImages(torch.utils.data.Dataset):
    """Random images for smoke runs and benchmarks; image i is always the same."""

    def __init__(self, n: int = 1024, size: int = 32, num_classes: int = 10, first: int = 0):
        self.n, self.size, self.first, self.classes = n, size, first, [str(c) for c in range(num_classes)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.first + i)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=gen, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy()), i % len(self.classes)


def has_val_split(name: str, data_path: str | None, holdout_per_class: int = 0) -> bool:
    """Whether build_dataset(..., "val") has images to score: CIFAR's test set, synthetic images, a held-out
    tail per class, or a val/ folder."""
    if name != "imagefolder":
        return True
    return holdout_per_class > 0 or bool(data_path and (Path(data_path) / "val").is_dir())


def build_dataset(name: str, data_path: str | None, split: str = "train", holdout_per_class: int = 0,
                  limit_per_class: int | None = None, download: bool = False, synthetic_size: int = 32):
    """A dataset of (PIL image, label).
    imagefolder: <path>/train and <path>/val when both exist; else one folder of class folders whose last
    `holdout_per_class` images (sorted by name) form the val split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synthetic":
        # the val images follow the train images, so they are never copies of them
        if split == "val":
            return SyntheticImages(256, synthetic_size, first=1024)
        return SyntheticImages(1024, synthetic_size)
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        if not data_path:
            raise ValueError(f"--data-path is needed for {name} (where it is, or where to download it)")
        try:
            ds = cls(data_path, train=split == "train", download=download)
        except RuntimeError as e:
            raise ValueError(f"{name} not found under {data_path} ({e}); pass --download to fetch it") from e
        except OSError as e:  # offline, or the server refused: urllib's errors are OSErrors
            raise ValueError(f"could not download {name} into {data_path} ({e}); with no network, copy "
                             f"torchvision's {name} files there, or pass --dataset imagefolder --data-path DIR "
                             f"(a folder of class folders)") from e
        if limit_per_class and split == "train":  # the first N images of each class, as for folders
            seen, keep = {}, []
            for i, label in enumerate(ds.targets):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= limit_per_class:
                    keep.append(i)
            ds.data, ds.targets = ds.data[keep], [ds.targets[i] for i in keep]
        return ds
    if name != "imagefolder":
        raise ValueError(f"unknown dataset {name!r}; expected cifar10, cifar100, imagefolder or synthetic")
    root = Path(data_path or "")
    if not data_path or not root.is_dir():
        raise ValueError(f"data path {data_path!r} is not a folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        ds = image_folder(root / split)
        per_class = ds.samples
    else:
        ds = image_folder(root)
        by_class = {}
        for path, label in ds.samples:  # sorted by class, then by file name
            by_class.setdefault(label, []).append((path, label))
        per_class = []
        for items in by_class.values():
            if holdout_per_class >= len(items):
                raise ValueError(f"holdout of {holdout_per_class} per class leaves no training images "
                                 f"({len(items)} in a class)")
            keep = items[len(items) - holdout_per_class:] if split == "val" else items[:len(items) - holdout_per_class]
            per_class += keep
        if split == "val" and not holdout_per_class:
            raise ValueError(f"{root} has no train/ and val/ folders and --holdout-per-class is 0: no val split")
    if limit_per_class and split == "train":
        counts, kept = {}, []
        for path, label in per_class:
            counts[label] = counts.get(label, 0) + 1
            if counts[label] <= limit_per_class:
                kept.append((path, label))
        per_class = kept
    ds.samples = ds.imgs = per_class
    ds.targets = [label for _, label in per_class]
    if not per_class:
        raise ValueError(f"no images in the {split} split of {root}")
    return ds


class MultiCropDataset(torch.utils.data.Dataset):
    """(crops, masks) per image; every draw seeded by (seed, epoch, index), so a resumed run redraws the same."""

    def __init__(self, images, augmentation: M.MultiCropAugmentation, seed: int, pred_start_epoch: int = 0):
        self.images, self.aug, self.seed, self.pred_start_epoch = images, augmentation, seed, pred_start_epoch
        self.epoch = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, _ = self.images[i]
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & (2**63 - 1))
        return self.aug(img, gen, masking=self.epoch >= self.pred_start_epoch)


def collate_crops(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """[(crops, masks (g, h, w))] * B -> global (g*B, C, H, W), local (l*B, C, h, w), masks (g*B, N); crop-major."""
    crops, masks = zip(*batch)
    g = masks[0].shape[0]
    per_crop = [torch.stack([c[v] for c in crops]) for v in range(len(crops[0]))]  # V x (B, C, H, W)
    local = torch.cat(per_crop[g:]) if len(per_crop) > g else None
    return torch.cat(per_crop[:g]), local, torch.stack(masks, dim=1).flatten(0, 1).flatten(1)


# a grayscale image's statistics from ImageNet's RGB ones, weighted as PIL's luma (exact for the mean, close for
# the std): for backbones that take one channel
GRAY_MEAN = (sum(w * m for w, m in zip((0.299, 0.587, 0.114), M.IMAGENET_MEAN)),)
GRAY_STD = (sum(w * s for w, s in zip((0.299, 0.587, 0.114), M.IMAGENET_STD)),)


def channels_and_normalise(channels: int) -> tuple[list, T.Normalize]:
    """The transforms that give a backbone the channels it takes (images are read as RGB), and its normalisation."""
    if channels == 3:
        return [], T.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD)
    if channels == 1:
        return [T.Grayscale(1)], T.Normalize(GRAY_MEAN, GRAY_STD)
    raise ValueError(f"images are fed as RGB (3 channels) or grayscale (1), not {channels} channels")


def eval_transform(size: int, channels: int = 3):
    """Centre crop at `size` (ImageNet: resize to 256, crop 224); CIFAR at 32 px passes unchanged."""
    resize = size * 256 // 224 if size > 64 else size
    to_channels, normalise = channels_and_normalise(channels)
    return T.Compose([*to_channels, T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), normalise])


def decode_all(images, workers: int) -> torch.Tensor:
    """Every image of a dataset decoded once -> uint8 (N, 3, H, W); for the on-device augmentation."""
    loader = torch.utils.data.DataLoader(OneSize(images, images[0][0].size), batch_size=1024, num_workers=workers)
    print0(f"decoding {len(images)} images for the on-device augmentation")
    return torch.cat(list(loader))


class OneSize(torch.utils.data.Dataset):
    """Images as uint8 (3, H, W), each checked as it is decoded against the size (width, height) all must have."""

    def __init__(self, images, size: tuple[int, int]):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, _ = self.images[i]
        if img.size != self.size:
            raise BadImage(f"--device-augment needs images of one size (such as CIFAR): {image_name(self.images, i)} "
                           f"is {img.size[0]} x {img.size[1]} pixels, the first image {self.size[0]} x {self.size[1]}")
        return TF.pil_to_tensor(img)


class Transformed(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, label = self.images[i]
        return self.transform(img), label


def progress(loader, what: str, every_s: float = 8.0):
    """Yield the loader's batches, printing how far it got at least every `every_s` seconds (rank 0)."""
    t0 = t_print = time.perf_counter()
    for i, batch in enumerate(loader, 1):
        yield batch
        now = time.perf_counter()
        if now - t_print >= every_s or i == len(loader):
            print0(f"{what}: {i}/{len(loader)} batches, {now - t0:.0f}s")
            t_print = now
