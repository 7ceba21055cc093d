"""Folders of one's own images: any tree trains (labels only from one level of class folders), hidden and
non-image files are skipped and counted, mixed sizes work on both view paths. Each case runs through the
command (train.py or eval_linear.py) as a user would: its exit code, its one line, no image lost."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import data as D
import eval_linear as el
import ibot_min as M
import train

TINY = ["--preset", "cifar10", "--dataset", "imagefolder", "--arch", "vit_nano", "--global-size", "16",
        "--local-size", "8", "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--workers", "0",
        "--device", "cpu", "--batch-size", "4", "--max-steps", "2", "--no-device-augment"]
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the header of a macOS ._ resource file


def write_png(path: Path, width: int = 16, height: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def copied_from_a_mac(folder: Path) -> None:
    """What a Mac leaves beside copied images: an AppleDouble ._ file per image, a .DS_Store per folder."""
    for image in sorted(folder.rglob("*.png")):
        (image.parent / f"._{image.name}").write_bytes(APPLE_DOUBLE)
    for sub in {image.parent for image in folder.rglob("*.png")} | {folder}:
        (sub / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def run_train(argv, capsys) -> tuple[int, str, str]:
    rc = train.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# ---- 1. trees without class folders train, every image of them ----


def test_flat_folder_trains_without_labels_even_with_the_presets_holdout(tmp_path, capsys):
    for i in range(12):
        write_png(tmp_path / "photos" / f"IMG_{i:04d}.png", seed=i)
    images = D.build_dataset("imagefolder", str(tmp_path / "photos"), "train", holdout_per_class=500)
    assert not images.labelled and images.classes == [] and len(images) == 12
    assert set(images.targets) == {D.NO_LABEL}
    assert images.summary == (f"{tmp_path / 'photos'}: 12 images, no labels (a flat folder, not one level of class "
                              f"folders)")
    assert not D.has_val_split("imagefolder", str(tmp_path / "photos"), 500)  # so the kNN monitor is off
    with pytest.raises(ValueError, match="no class folders, so no labels: no val split"):
        D.build_dataset("imagefolder", str(tmp_path / "photos"), "val", holdout_per_class=500)

    rc, out, err = run_train(TINY + ["--data-path", tmp_path / "photos", "--holdout-per-class", 500,
                                     "--knn-every-steps", 1, "--output-dir", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert "on imagefolder (12 images)" in out  # the holdout took none of them
    rows = log_rows(tmp_path / "run")
    assert rows and not any("knn_top1" in row for row in rows)  # no labels: no kNN score, even when asked
    assert all(0.0 < row["prototypes_used"] <= 1.0 for row in rows)  # the diagnostics carry the run


def test_nested_dated_folders_train_without_labels(tmp_path, capsys):
    days = ["2023/12-24", "2023/12-31", "2024/01-01", "2024/07-14"]
    for d, day in enumerate(days):
        for i in range(3):
            write_png(tmp_path / "camera" / day / f"{i}.png", seed=10 * d + i)
    write_png(tmp_path / "camera" / "2024" / "cover.png")  # one image a level higher
    images = D.build_dataset("imagefolder", str(tmp_path / "camera"), "train")
    assert not images.labelled and len(images) == 13
    assert "13 images, no labels (images 1 to 2 folders deep" in images.summary
    assert images.samples[0][0] == str(tmp_path / "camera" / "2023" / "12-24" / "0.png")  # sorted, depth first

    rc, out, err = run_train(TINY + ["--data-path", tmp_path / "camera", "--holdout-per-class", 500,
                                     "--output-dir", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert "on imagefolder (13 images)" in out


def test_one_level_of_class_folders_keeps_its_labels_and_holdout(tmp_path):
    for c in ("cat", "dog"):
        for i in range(5):
            write_png(tmp_path / "pets" / c / f"{i}.png", seed=i)
    train_split = D.build_dataset("imagefolder", str(tmp_path / "pets"), "train", holdout_per_class=2)
    val_split = D.build_dataset("imagefolder", str(tmp_path / "pets"), "val", holdout_per_class=2)
    assert train_split.labelled and train_split.classes == ["cat", "dog"]
    assert train_split.targets == [0, 0, 0, 1, 1, 1] and val_split.targets == [0, 0, 1, 1]
    assert [Path(p).name for p, _ in val_split.samples] == ["3.png", "4.png"] * 2  # the last 2 of each class
    assert D.has_val_split("imagefolder", str(tmp_path / "pets"), 2)
    assert train_split.summary.endswith("10 images in 2 class folders (the last 2 of each class held out): 6 in the "
                                        "train split")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text("abcXY_1", min_size=1, max_size=4), st.lists(st.sampled_from(["png", "JPG", "txt"]),
                                                                              min_size=1, max_size=3),
                       min_size=1, max_size=4))
def test_class_folders_give_torchvisions_image_folder_samples(tree):
    # the reference: torchvision's ImageFolder on the same tree, with the hidden files it would try to read removed
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        for c, files in tree.items():
            (root / c).mkdir()
            for i, suffix in enumerate(files):
                (root / c / f"{i}.{suffix}").write_bytes(b"")
                (root / c / f"._{i}.{suffix}").write_bytes(APPLE_DOUBLE)
        ours = D.ImageTree(root)
        for hidden in root.rglob("._*"):
            hidden.unlink()
        has_images = [c for c, files in tree.items() if any(s != "txt" for s in files)]
        if len(has_images) < len(tree):  # torchvision refuses a class folder without images; ours names it
            assert ours.empty and all(Path(p).name not in has_images for p in ours.empty)
            return
        reference = torchvision.datasets.ImageFolder(str(root), loader=lambda p: p)
        assert ours.labelled and ours.classes == reference.classes and ours.samples == reference.samples
        assert len(ours.hidden) == sum(len(files) for files in tree.values())


# ---------------------------------------------------------------------------------------------------
# ---- 2. hidden and non-image files: skipped, counted, named ----


def test_a_folder_copied_from_a_mac_trains_and_says_what_it_skipped(tmp_path, capsys):
    for c in ("beach", "city"):
        for i in range(6):
            write_png(tmp_path / "trip" / c / f"{i:04d}.png", seed=i)
    copied_from_a_mac(tmp_path / "trip")  # 12 ._ files, 3 .DS_Store
    (tmp_path / "trip" / "beach" / "notes.txt").write_text("sunny")
    write_png(tmp_path / "trip" / ".thumbnails" / "0000.png")  # a hidden folder, not walked into
    images = D.build_dataset("imagefolder", str(tmp_path / "trip"), "train")
    assert images.labelled and images.classes == ["beach", "city"] and len(images) == 12
    assert images.summary == (f"{tmp_path / 'trip'}: 12 images in 2 class folders; skipped 16 hidden files or folders "
                              f"(such as .thumbnails) and 1 non-image file (such as notes.txt)")

    rc, out, err = run_train(TINY + ["--data-path", tmp_path / "trip", "--output-dir", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert "on imagefolder (12 images)" in out


def test_a_folder_of_only_hidden_and_other_files_is_one_line(tmp_path, capsys):
    (tmp_path / "phone").mkdir()
    for i in range(3):
        (tmp_path / "phone" / f"._IMG_{i}.png").write_bytes(APPLE_DOUBLE)
        (tmp_path / "phone" / f"IMG_{i}.HEIC").write_bytes(b"ftypheic")
    rc, _, err = run_train(TINY + ["--data-path", tmp_path / "phone", "--output-dir", tmp_path / "run"], capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: no images found in")
    assert "skipped 3 hidden files or folders (such as ._IMG_0.png) and 3 non-image files (such as IMG_0.HEIC)" in err


def test_eval_linear_on_a_tree_without_labels_is_one_line(tmp_path, capsys):
    for i in range(4):
        write_png(tmp_path / "photos" / f"{i}.png", seed=i)
    torch.manual_seed(0)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=8, global_size=16, out_dim=32, head_hidden_dim=32,
                       head_bottleneck_dim=16, local_crops=0)
    torch.save(M.IBOT(cfg).checkpoint(), tmp_path / "ckpt.pth")
    for split_flags in (["--data-path", tmp_path / "photos", "--holdout-per-class", 1],
                        ["--train-path", tmp_path / "photos", "--val-path", tmp_path / "photos"]):
        rc = el.main([str(a) for a in ["--checkpoint", tmp_path / "ckpt.pth", *split_flags, "--knn", "--workers", 0,
                                       "--device", "cpu"]])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "no labels" in err and str(tmp_path / "photos") in err


def test_train_and_val_folders_must_hold_the_same_classes(tmp_path):
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "b", "c"])):
        for c in classes:
            write_png(tmp_path / "data" / split / c / "0.png")
    for split in ("train", "val"):  # a label is a class's index: a class only in val would shift them
        with pytest.raises(ValueError, match=f"only in {tmp_path / 'data' / 'val'}: c"):
            D.build_dataset("imagefolder", str(tmp_path / "data"), split)


# ---------------------------------------------------------------------------------------------------
# ---- 3. mixed image sizes ----


def mixed_sizes(folder: Path) -> Path:
    for i, (w, h) in enumerate([(16, 16), (40, 24), (17, 33), (64, 64), (12, 20), (30, 30)]):
        write_png(folder / f"{i}.png", w, h, seed=i)
    return folder


def test_mixed_sizes_train_on_the_pil_views(tmp_path, capsys):
    rc, out, err = run_train(TINY + ["--data-path", mixed_sizes(tmp_path / "mixed"), "--output-dir", tmp_path / "run"],
                             capsys)
    assert rc == 0, err
    assert "on imagefolder (6 images)" in out


def test_mixed_sizes_are_stored_as_centre_squares_for_the_on_device_views(tmp_path, capsys):
    # a wide image: red edges, a green centre of the shorter side's width, which is what must be kept
    pixels = np.zeros((16, 40, 3), np.uint8)
    pixels[:, :, 0] = 255
    pixels[:, 12:28] = (0, 255, 0)
    (tmp_path / "mixed").mkdir()
    Image.fromarray(pixels).save(tmp_path / "mixed" / "0_wide.png")
    write_png(tmp_path / "mixed" / "1_square.png", 24, 24)
    images = D.build_dataset("imagefolder", str(tmp_path / "mixed"))
    stored = D.decode_all(images, workers=0, global_size=8)  # squares of 2 x 8 px
    assert stored.shape == (2, 3, 16, 16) and stored.dtype == torch.uint8
    centre = stored[0, :, :, 1:-1].float()  # bicubic rings only at the crop's outermost columns
    assert (centre[1] > 250).all() and (centre[0] < 5).all()
    assert "images of several sizes" in capsys.readouterr().out
    with pytest.raises(D.BadImage, match=r"1_square\.png is 24 x 24 pixels, .*0_wide\.png 40 x 16; pass "
                                         r"--no-device-augment"):
        D.decode_all(images, workers=0)  # no crop size to store them at: one line, both files named


def test_images_of_one_size_are_stored_as_they_are(tmp_path):
    for i in range(3):
        write_png(tmp_path / "same" / f"{i}.png", 20, 12, seed=i)
    images = D.build_dataset("imagefolder", str(tmp_path / "same"))
    stored = D.decode_all(images, workers=2 if os.cpu_count() > 1 else 0, global_size=8)
    assert stored.shape == (3, 3, 12, 20)
    for i in range(3):
        assert torch.equal(stored[i], torch.from_numpy(np.array(images[i][0])).permute(2, 0, 1))
