"""The trained model that ships in models/: it loads as a user would load it, and its kNN score on 1,000
validation images is the one the README states (the same computation, so only float noise may differ)."""

import re
from pathlib import Path

import pytest
import torch

import data as D
import checkpoints as C
import ibot_min as M

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "ibot_vit_nano_cifar10.pth"
# the README's sentence: "... kNN top-1 on 1,000 validation images (...): **53.4**", across line breaks
README_FIGURE = re.compile(r"kNN top-1 on 1,000 validation images[^*]*\*\*([0-9.]+)\*\*")
# and the next words: "(27.3 at random initialisation by the same protocol)"
README_RANDOM = re.compile(r"\(([0-9.]+) at random\s+initialisation by the same protocol")


def first_per_class(images, n: int) -> list[int]:
    seen, keep = {}, []
    for i, label in enumerate(images.targets):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            keep.append(i)
    return keep


def shipped_knn(cifar_train: Path, backbone=None) -> float:
    """kNN top-1 (k=20, T=0.07, teacher [CLS], fp32) of the shipped model, or of `backbone`: bank = the first 1,000
    training images of each class, queries = the first 100 validation images of each class (the last 500 of each
    class are validation)."""
    backbone = (backbone or C.load_backbone(MODEL)).eval()
    tf = D.eval_transform(32)
    bank = D.build_dataset("imagefolder", str(cifar_train), "train", holdout_per_class=500, limit_per_class=1000)
    val = D.build_dataset("imagefolder", str(cifar_train), "val", holdout_per_class=500)
    val = torch.utils.data.Subset(val, first_per_class(val, 100))
    loaders = [torch.utils.data.DataLoader(D.Transformed(images, tf), batch_size=500) for images in (bank, val)]
    bank_f, bank_y = M.extract_features(backbone, loaders[0])
    val_f, val_y = M.extract_features(backbone, loaders[1])
    return M.knn_classify(bank_f, bank_y, val_f, val_y, ks=(20,))[20]


def test_shipped_model_is_small_and_loads_as_users_load_it():
    assert MODEL.is_file(), "models/ibot_vit_nano_cifar10.pth is missing: see docs/results.md"
    assert MODEL.stat().st_size <= 8 * 2**20
    ckpt = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert {"teacher", "config", "ibot_loss"} <= set(ckpt) and "student" not in ckpt
    backbone = C.load_backbone(MODEL)
    assert (backbone.embed_dim, len(backbone.blocks), backbone.patch_size) == (128, 4, 4)
    tokens = backbone(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 65, 128) and torch.isfinite(tokens).all()
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())


@pytest.mark.slow
def test_shipped_model_scores_the_readme_figure(cifar_train, tmp_path):
    stated = README_FIGURE.search((ROOT / "README.md").read_text())
    assert stated, "the README must state the shipped model's kNN on 1,000 validation images"
    measured = shipped_knn(cifar_train)
    assert abs(measured - float(stated.group(1))) <= 1.0, f"measured {measured:.2f}, README {stated.group(1)}"
    assert measured > random_knn(cifar_train, tmp_path) + 2  # it learned, beyond the noise of 1,000 images


def random_knn(cifar_train: Path, tmp_path: Path) -> float:
    """The same protocol on the teacher train.py starts from with the shipped model's preset (seed 0, the patch
    embedding whitened), checked against the README's figure for it."""
    import train
    args = train.parse_args(["--preset", "cifar10-cpu", "--data-path", str(cifar_train), "--holdout-per-class", "500",
                             "--no-device-augment", "--workers", "0", "--device", "cpu",
                             "--output-dir", str(tmp_path)])
    random_init = shipped_knn(cifar_train, train.setup(args).model.teacher.backbone)
    stated = README_RANDOM.search((ROOT / "README.md").read_text())
    assert stated and abs(random_init - float(stated.group(1))) <= 1.0, f"random init {random_init:.2f}"
    return random_init
