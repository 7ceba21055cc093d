"""Data plumbing shared by train.py and eval_linear.py: datasets of (PIL image, label), reading images,
the evaluation transform, and the per-sample-seeded multi-crop dataset with its collate.

Datasets: torchvision's CIFAR-10/100 (with its download), any folder tree of images (labelled when it is one
level of class folders, as torchvision's ImageFolder: one folder with a held-out tail per class, or train/ +
val/), and synthetic images for smoke runs. Each says whether it has labels (`labelled`) and what was found
(`summary`, one line).
"""

import os
import time
import traceback
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
        super().__init__(last_line.split(f"{type(self).__name__}: ", 1)[-1])


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
    """Image i's file where the dataset has files (ImageTree), else its index."""
    samples = getattr(images, "samples", None)
    return samples[i][0] if samples else f"image {i}"


# ---------------------------------------------------------------------------------------------------
# ---- folders of images: class folders give labels, any other tree trains without ----

IMAGE_SUFFIXES = torchvision.datasets.folder.IMG_EXTENSIONS  # .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp
NO_LABEL = -1  # the label of every image in a tree without class folders


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


class ImageTree(torch.utils.data.Dataset):
    """Every image file under a folder, in sorted order, as (PIL image, label).

    Labelled when the images lie in one level of class folders (torchvision's ImageFolder layout: root/class/image,
    the classes sorted by name); otherwise (a flat folder, dated folders nested deeper, images at several depths)
    every label is NO_LABEL and `classes` is empty. Hidden files and folders
    (names that start with '.': macOS's ._0001.png and .DS_Store, .git) and files without an image suffix are
    skipped and counted, so the summary can name them."""

    def __init__(self, root: Path):
        self.root = root
        found, self.hidden, self.others = [], [], []  # found: (path, folders above it, the first of them)
        top_folders = []
        for folder, subfolders, files in os.walk(root, followlinks=True):  # top-down, so subfolders can be pruned
            self.hidden += [os.path.join(folder, d) for d in sorted(subfolders) if d.startswith(".")]
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            above = Path(folder).relative_to(root).parts
            if not above:
                top_folders = list(subfolders)
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.startswith("."):
                    self.hidden.append(path)
                elif name.lower().endswith(IMAGE_SUFFIXES):
                    found.append((path, len(above), above[0] if above else None))
                else:
                    self.others.append(path)
        self.depths = sorted({depth for _, depth, _ in found})
        folders = sorted({first for _, _, first in found if first is not None})
        self.empty = [os.path.join(root, d) for d in top_folders if d not in folders]  # no image below them
        self.labelled = self.depths == [1]
        self.classes = folders if self.labelled else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(path, index[first] if self.labelled else NO_LABEL) for path, _, first in found]
        self.found = len(self.samples)  # before any split
        self.summary = self.describe()  # build_dataset rewrites it for the split it keeps

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def describe(self, kept: str = "") -> str:
        """One line for a run's first lines: what was found, whether it gives labels and why, what was skipped.
        `kept`: how a split was cut from it, such as " (the last 500 of each class held out): 4,500 in the train
        split"."""
        if not self.found:
            what = "no images"
        elif self.labelled:
            what = f"{plural(self.found, 'image')} in {plural(len(self.classes), 'class folder')}"
        else:
            layout = ("a flat folder" if self.depths == [0] else
                      f"images {self.depths[0]} folders deep" if len(self.depths) == 1 else
                      f"images {self.depths[0]} to {self.depths[-1]} folders deep")
            what = f"{plural(self.found, 'image')}, no labels ({layout}, not one level of class folders)"
        return f"{self.root}: {what}{kept}" + (f"; skipped {self.skipped()}" if self.skipped() else "")

    def skipped(self) -> str:
        kinds = ((self.hidden, "hidden file or folder", "hidden files or folders"),
                 (self.others, "non-image file", None), (self.empty, "folder without images", "folders without images"))
        return " and ".join(f"{plural(len(found), one, many)} (such as {Path(found[0]).name})"
                            for found, one, many in kinds if found)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return read_image(path), label


def image_tree(root: Path) -> ImageTree:
    """A folder's ImageTree, with at least one image."""
    tree = ImageTree(root)
    if not tree.samples:
        raise ValueError(f"no images found in {root}: expected image files ({' '.join(IMAGE_SUFFIXES)}), in class "
                         f"folders for labels" + (f"; skipped {tree.skipped()}" if tree.skipped() else ""))
    return tree


class SyntheticImages(torch.utils.data.Dataset):
    """Random images for smoke runs and benchmarks; image i is always the same."""

    labelled = True

    def __init__(self, n: int = 1024, size: int = 32, num_classes: int = 10, first: int = 0):
        self.n, self.size, self.first, self.classes = n, size, first, [str(c) for c in range(num_classes)]
        self.summary = f"synthetic: {n:,} random {size} px images in {num_classes} classes"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.first + i)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=gen, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy()), i % len(self.classes)


def has_val_split(name: str, data_path: str | None, holdout_per_class: int = 0) -> bool:
    """Whether build_dataset(..., "val") has labelled images to score: CIFAR's test set, synthetic images, a
    held-out tail per class of a folder of class folders, or a val/ folder of class folders. A tree without
    class folders has none."""
    if name != "imagefolder":
        return True
    root = Path(data_path or "")
    if not data_path or not root.is_dir():
        return False
    if (root / "train").is_dir() and (root / "val").is_dir():
        return ImageTree(root / "val").labelled
    return holdout_per_class > 0 and ImageTree(root).labelled


def first_per_class(samples: list, n: int) -> list:
    """The first n (path, label) pairs of each label, in order (a tree without labels: its first n images)."""
    seen, kept = {}, []
    for path, label in samples:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            kept.append((path, label))
    return kept


def build_dataset(name: str, data_path: str | None, split: str = "train", holdout_per_class: int = 0,
                  limit_per_class: int | None = None, download: bool = False, synthetic_size: int = 32):
    """A dataset of (PIL image, label), with `labelled` (whether its labels mean anything) and `summary` (one
    line on what was found, for a run's first lines).
    imagefolder: <path>/train and <path>/val when both exist; else any folder tree of images (ImageTree). With
    class folders, the last `holdout_per_class` images of each class (sorted by name) form the val split; without
    them the whole tree trains, `holdout_per_class` does not apply and there is no val split."""
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
                             f"(a folder of images)") from e
        if limit_per_class and split == "train":  # the first N images of each class, as for folders
            keep = [i for i, _ in first_per_class(list(enumerate(ds.targets)), limit_per_class)]
            ds.data, ds.targets = ds.data[keep], [ds.targets[i] for i in keep]
        ds.labelled = True
        ds.summary = f"{name} in {data_path}: {len(ds):,} {'test' if split == 'val' else 'training'} images"
        return ds
    if name != "imagefolder":
        raise ValueError(f"unknown dataset {name!r}; expected cifar10, cifar100, imagefolder or synthetic")
    root = Path(data_path or "")
    if not data_path or not root.is_dir():
        raise ValueError(f"data path {data_path!r} is not a folder")
    cuts = []  # how the split was cut from the tree, for its summary
    if (root / "train").is_dir() and (root / "val").is_dir():
        ds = image_tree(root / split)
        if split == "val" and not ds.labelled:
            raise ValueError(f"{root / 'val'} has no class folders, so no labels to score: no val split")
        if ds.labelled:  # a label is a class's index: both splits must have the same classes
            other = root / ("val" if split == "train" else "train")
            names = {e.name for e in os.scandir(other) if e.is_dir() and not e.name.startswith(".")}
            if ds.empty or names != set(ds.classes):
                raise ValueError(f"{root / split} and {other} must hold the same class folders, each with images"
                                 + (f"; {', '.join(ds.empty)} has no images" if ds.empty else "")
                                 + (f"; only in {other}: {', '.join(sorted(names - set(ds.classes)))}"
                                    if names - set(ds.classes) else "")
                                 + (f"; only in {root / split}: {', '.join(sorted(set(ds.classes) - names))}"
                                    if set(ds.classes) - names else ""))
    else:
        ds = image_tree(root)
        if ds.labelled:
            by_class = {}
            for path, label in ds.samples:  # sorted by class, then by file name
                by_class.setdefault(label, []).append((path, label))
            samples = []
            for items in by_class.values():
                if holdout_per_class >= len(items):
                    raise ValueError(f"holdout of {holdout_per_class} per class leaves no training images "
                                     f"({len(items)} in a class)")
                cut = len(items) - holdout_per_class
                samples += items[cut:] if split == "val" else items[:cut]
            ds.samples = samples
            if holdout_per_class:
                cuts.append(f"the last {holdout_per_class:,} of each class held out")
        if split == "val" and not (ds.labelled and holdout_per_class):
            raise ValueError(f"{root} has no train/ and val/ folders and " +
                             ("--holdout-per-class is 0" if ds.labelled else "no class folders, so no labels") +
                             ": no val split")
    if limit_per_class and split == "train":
        ds.samples = first_per_class(ds.samples, limit_per_class)
        cuts.append(f"the first {limit_per_class:,}" + (" of each class" if ds.labelled else "") + " kept")
    if cuts:
        ds.summary = ds.describe(f" ({', '.join(cuts)}): {len(ds.samples):,} in the {split} split")
    if not ds.samples:
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


def decode_all(images, workers: int, global_size: int | None = None) -> torch.Tensor:
    """Every image of a dataset decoded once -> uint8 (N, 3, H, W), for the on-device augmentation.
    Images of one size (CIFAR) keep it. Images of several sizes are stored as squares of 2 x global_size, each
    one's shorter side resized to that and its centre kept, so that a global crop of a quarter of the image is
    not upsampled (the PIL views, --no-device-augment, crop from the whole images instead)."""
    first = images[0][0].size
    print0(f"decoding {len(images):,} images for the on-device augmentation")
    try:
        return decode(OneSize(images, first), workers)
    except MixedSizes as e:
        traceback.clear_frames(e.__traceback__)  # frees the loader's workers now, not at the next collection
        if global_size is None:
            raise BadImage(f"{e}; pass --no-device-augment") from None
        message = str(e)
    side = 2 * global_size
    print0(f"{message}: each image stored as {side} x {side} pixels (its shorter side resized, the centre kept), "
           f"{len(images) * 3 * side * side / 2**30:.2f} GiB; --no-device-augment crops the whole images")
    return decode(Squares(images, side), workers)


def decode(dataset: torch.utils.data.Dataset, workers: int) -> torch.Tensor:
    return torch.cat(list(torch.utils.data.DataLoader(dataset, batch_size=1024, num_workers=workers)))


class MixedSizes(BadImage):
    pass


class OneSize(torch.utils.data.Dataset):
    """Images as uint8 (3, H, W), each checked as it is decoded against the size (width, height) all must have."""

    def __init__(self, images, size: tuple[int, int]):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, _ = self.images[i]
        if img.size != self.size:
            raise MixedSizes(f"images of several sizes: {image_name(self.images, i)} is {img.size[0]} x "
                             f"{img.size[1]} pixels, {image_name(self.images, 0)} {self.size[0]} x {self.size[1]}")
        return TF.pil_to_tensor(img)


class Squares(torch.utils.data.Dataset):
    """Images as uint8 (3, side, side): the shorter side resized to `side` (bicubic, antialiased), the centre kept."""

    def __init__(self, images, side: int):
        self.images, self.side = images, side

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, _ = self.images[i]
        img = TF.center_crop(TF.resize(img, self.side, T.InterpolationMode.BICUBIC), self.side)
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
