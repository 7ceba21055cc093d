"""Pack a CIFAR-10 subset (a folder of its class folders of PNGs) into one zip for a GPU machine.

    python scripts/pack_cifar.py --src DIR [--train-per-class 1500 --val-per-class 500 --out .gpu/cifar10.zip]

Keeps the first N and the last M images of each class (sorted by name), so `--holdout-per-class M` on the
unpacked folder gives the same train / val split as on the full folder. The default 1,500 + 500 per class make
a zip of about 46 MiB (CIFAR-10's PNGs, stored: they are compressed already), small enough to carry to another machine
with the repository. Unpack with `python -m zipfile -e .gpu/cifar10.zip DEST`;
scripts/gpu_check.sh does.
"""

import argparse
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pack(src: Path, out: Path, train_per_class: int, val_per_class: int) -> int:
    """Writes the zip (train/<class>/<file>.png); returns the number of images packed."""
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; expected a folder of CIFAR-10 class folders")
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {src}")
    chosen = {}
    for c in classes:
        files = sorted(c.glob("*.png"))
        if len(files) < train_per_class + val_per_class:
            raise ValueError(f"{c} has {len(files)} PNGs, fewer than --train-per-class {train_per_class} + "
                             f"--val-per-class {val_per_class}")
        chosen[c.name] = files[:train_per_class] + files[len(files) - val_per_class:]
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, files in chosen.items():
            for f in files:
                z.write(f, f"train/{name}/{f.name}")
    return sum(len(files) for files in chosen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=os.environ.get("IBOT_CIFAR10_DIR"),
                   help="CIFAR-10 class folders (default: $IBOT_CIFAR10_DIR)")
    p.add_argument("--train-per-class", type=int, default=1500)
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / ".gpu" / "cifar10.zip"))
    a = p.parse_args(argv)
    try:
        if a.src is None:
            raise ValueError("pass --src, a folder of CIFAR-10 class folders of PNGs, or set IBOT_CIFAR10_DIR to one")
        if a.train_per_class < 1 or a.val_per_class < 0:
            raise ValueError(f"--train-per-class must be at least 1 and --val-per-class at least 0, got "
                             f"{a.train_per_class} and {a.val_per_class}")
        n = pack(Path(a.src), Path(a.out), a.train_per_class, a.val_per_class)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.out}: {n} images, {Path(a.out).stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
