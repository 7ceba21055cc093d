"""Pack a CIFAR-10 subset of ../shared/data/cifar10/train into one zip (PNG bytes, stored) for a GPU machine.

    python scripts/pack_cifar.py --train-per-class 2000 --val-per-class 500 --out .gpu/cifar10.zip

Keeps the first N and the last M images of each class, so `--holdout-per-class M` on the unpacked folder gives
the same train / val split as on the full folder. Unpack with `python -m zipfile -e .gpu/cifar10.zip DEST`.
"""

import argparse
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train"))
    p.add_argument("--train-per-class", type=int, default=2000)
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--out", default=str(ROOT / ".gpu" / "cifar10.zip"))
    a = p.parse_args()
    src, out = Path(a.src), Path(a.out)
    classes = sorted(d for d in src.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"error: no class folders in {src}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for c in classes:
            files = sorted(c.glob("*.png"))
            for f in files[:a.train_per_class] + files[len(files) - a.val_per_class:]:
                z.write(f, f"train/{c.name}/{f.name}")
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(classes)} classes")
