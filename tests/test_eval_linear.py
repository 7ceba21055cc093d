"""Tests for eval_linear: kNN and the linear probe on problems whose answer is known by construction, the probe's
feature layouts against the tokens they come from, official-layout checkpoints through the command line, the
errors a user meets, and an end-to-end run from a train.py checkpoint on real CIFAR-10 images.
"""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_linear as el
import ibot_min as M
import train

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


# ---------------------------------------------------------------------------------------------------
# ---- helpers ----


def _our_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint in our format: ViT-nano, patch 8, 32 px."""
    torch.manual_seed(seed)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=8, global_size=32, out_dim=32, patch_out_dim=32, head_hidden_dim=32,
                        head_bottleneck_dim=16, local_crops=0)
    torch.save(M.IBOT(cfg).checkpoint(), path)
    return path


def _colour_folder(root: Path, n_classes: int, per_class: int, colour_of, seed: int = 0) -> Path:
    """Class folders of 32 px images, image i of class c filled with colour_of(c, i) plus +-3 levels of noise."""
    g = torch.Generator().manual_seed(seed)
    for c in range(n_classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            base = torch.tensor(colour_of(c, i), dtype=torch.int16).view(1, 1, 3)
            pixels = (base + torch.randint(-3, 4, (32, 32, 3), generator=g, dtype=torch.int16)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / f"class{c:02d}" / f"{i:03d}.png")
    return root


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = el.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------------
# ---- 1. kNN through the whole pipeline: folders -> backbone -> features -> votes ----


def test_knn_on_images_that_separate_the_classes_is_perfect(tmp_path, capsys):
    # Ten classes, each one colour: images of a class are near-copies, so their [CLS] features are nearest
    # neighbours under any backbone. 8 training images per class, so k <= 8 votes only within the class.
    colours = torch.randint(0, 256, (10, 3), generator=torch.Generator().manual_seed(1)).tolist()
    data = _colour_folder(tmp_path / "data", 10, 12, lambda c, i: colours[c])
    ckpt = _our_checkpoint(tmp_path / "ckpt.pth")
    rc, out, err = _run(["--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
                         "--holdout-per-class", 4, "--knn", "--ks", 1, 8, "--workers", 0], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "eval_imagefolder.json").read_text())
    assert result["knn"] == {"1": 100.0, "8": 100.0}
    assert result["config"]["train_images"] == 80 and result["config"]["val_images"] == 40


def test_knn_with_labels_unrelated_to_the_images_is_at_chance(tmp_path, capsys):
    # Every image a random colour, its folder a random one of ten: nothing links image and label.
    g = torch.Generator().manual_seed(2)
    colours = torch.randint(0, 256, (10, 40, 3), generator=g).tolist()
    data = _colour_folder(tmp_path / "data", 10, 40, lambda c, i: colours[c][i])
    ckpt = _our_checkpoint(tmp_path / "ckpt.pth")
    rc, _, err = _run(["--checkpoint", ckpt, "--dataset", "imagefolder", "--data-path", data,
                       "--holdout-per-class", 20, "--knn", "--ks", 10, 20, "--workers", 0], capsys)
    assert rc == 0, err
    knn = json.loads((tmp_path / "eval_imagefolder.json").read_text())["knn"]
    assert all(0.0 <= top1 <= 20.0 for top1 in knn.values()), knn  # chance 10% on 200 images, sd ~2 points


# ---------------------------------------------------------------------------------------------------
# ---- 2. the linear probe ----


def test_linear_probe_learns_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(0)
    centres = 3 * F.normalize(torch.randn(10, 64, generator=g), dim=-1)  # pairwise distances ~4.2

    def sample(n):
        y = torch.arange(n) % 10
        return centres[y] + 0.3 * torch.randn(n, 64, generator=g), y

    (x, y), (vx, vy) = sample(1000), sample(500)
    linear = el.train_linear(el.cached_batches(x, y, 64, seed=0), 64, 10, lr=0.1, epochs=10, steps_per_epoch=16)
    top1, top5 = el.accuracy(linear, vx, vy)
    assert top1 >= 98.0 and top5 == 100.0, (top1, top5)
    # and the untrained layer (normal std 0.01, bias 0) is near chance: the score comes from the training
    untrained = el.train_linear(el.cached_batches(x, y, 64, seed=0), 64, 10, lr=0.0, epochs=1, steps_per_epoch=16)
    assert el.accuracy(untrained, vx, vy)[0] < 50.0


def test_top5_is_capped_at_the_number_of_classes():
    linear = torch.nn.Linear(4, 3)
    top1, top5 = el.accuracy(linear, torch.randn(20, 4), torch.randint(0, 3, (20,)))
    assert top5 == 100.0 and 0.0 <= top1 <= 100.0


def test_probe_feature_layouts():
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=8, img_size=32).eval()  # D = 128, 4 blocks
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        final = vit(x)  # (B, 1+N, D): the last block through the final norm
        cls0 = el.probe_features(vit, x, 2, avgpool=0)
        mean1 = el.probe_features(vit, x, 2, avgpool=1)
        both2 = el.probe_features(vit, x, 2, avgpool=2)
        inner = vit.get_intermediate_layers(x, 2)[0][:, 0]
    assert cls0.shape == (3, 256) and mean1.shape == (3, 128) and both2.shape == (3, 384)
    torch.testing.assert_close(cls0, torch.cat([inner, final[:, 0]], dim=-1))
    torch.testing.assert_close(mean1, final[:, 1:].mean(dim=1))
    torch.testing.assert_close(both2, torch.cat([cls0, mean1], dim=-1))
    assert el.default_probe(384) == (4, 0) and el.default_probe(192) == (4, 0) and el.default_probe(768) == (1, 2)
    with pytest.raises(ValueError, match="avgpool"):
        el.probe_features(vit, x, 1, avgpool=3)


# ---------------------------------------------------------------------------------------------------
# ---- 3. checkpoints a user brings ----


def _official_checkpoint(path: Path, patch_size_in_args: int = 16) -> tuple[Path, M.VisionTransformer]:
    """The official iBOT layout: teacher backbone./head., student module.backbone./module.head., centres, args."""
    torch.manual_seed(0)
    # the official vit_tiny's width and heads (192, 3), two blocks: the arch name gives the heads
    student = M.VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, masked_embed=True)
    teacher = M.VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3)
    head = M.IBOTHead(192, 32, 32, hidden_dim=16, bottleneck_dim=8)
    ckpt = {
        "student": {**{"module.backbone." + k: v for k, v in student.state_dict().items()},
                    **{"module.head." + k: v for k, v in head.state_dict().items()}},
        "teacher": {**{"backbone." + k: v for k, v in teacher.state_dict().items()},
                    **{"head." + k: v for k, v in head.state_dict().items()}},
        "ibot_loss": {"center": torch.zeros(1, 32), "center2": torch.zeros(1, 1, 32)},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=patch_size_in_args, out_dim=32),
        "epoch": 3,
    }
    assert "head.mlp.0.weight" in ckpt["teacher"]
    torch.save(ckpt, path)
    return path, teacher


def test_official_layout_checkpoint_through_the_command_line(tmp_path, capsys):
    path, teacher = _official_checkpoint(tmp_path / "checkpoint.pth")
    loaded, config = el.load(argparse.Namespace(checkpoint=path, which="teacher", num_heads=None))
    assert config["patch_size"] == 16 and loaded.masked_embed is None
    torch.testing.assert_close(loaded.state_dict(), teacher.state_dict())

    out_file = tmp_path / "result.json"
    rc, out, err = _run(["--checkpoint", path, "--dataset", "synthetic", "--knn", "--linear", "--epochs", 2,
                         "--lrs", 1e-2, 1e-1, "--workers", 0, "--output", out_file], capsys)
    assert rc == 0, err
    result = json.loads(out_file.read_text())
    assert set(result) == {"knn", "linear", "config", "checkpoint", "hardware", "seconds"}
    assert set(result["knn"]) == {"10", "20", "100", "200"}
    assert all(0.0 <= v <= 100.0 for v in result["knn"].values())
    linear = result["linear"]
    assert set(linear["sweep"]) == {"0.01", "0.1"} and linear["lr"] in (0.01, 0.1)
    assert linear["top1"] == max(run["top1"] for run in linear["sweep"].values()) and 0.0 <= linear["top5"] <= 100.0
    # ViT-S and below: n = 4 last blocks' [CLS], avgpool 0; capped at this ViT's 2 blocks
    assert result["config"]["n_last_blocks"] == 2 and result["config"]["avgpool"] == 0 and linear["features"] == 384
    assert result["config"]["image_size"] == 32  # synthetic: 32 px
    assert result["checkpoint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert result["hardware"]["torch"] == torch.__version__ and result["seconds"] > 0
    assert "kNN k=20" in out and "linear lr 0.1" in out


def test_full_protocol_runs_with_augmentation(tmp_path, capsys):
    ckpt = _our_checkpoint(tmp_path / "ckpt.pth")
    rc, out, err = _run(["--checkpoint", ckpt, "--dataset", "synthetic", "--linear", "--full", "--epochs", 1,
                         "--n-last-blocks", 1, "--avgpool", 2, "--workers", 0], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "eval_synthetic.json").read_text())
    assert result["config"]["mode"] == "full" and result["knn"] == {}
    assert result["linear"]["features"] == 2 * 128 and 0.0 <= result["linear"]["top1"] <= 100.0
    assert "epoch 1/1" in out


# ---------------------------------------------------------------------------------------------------
# ---- 4. bad input: a clear message and exit code 1, never a traceback ----


def test_errors(tmp_path, capsys):
    rc, _, err = _run(["--checkpoint", tmp_path / "missing.pth", "--dataset", "synthetic"], capsys)
    assert rc == 1 and err.startswith("error:") and "missing.pth" in err

    torch.save({"optimizer_state": torch.zeros(2), "some_weights": torch.ones(3)}, tmp_path / "nothing.pth")
    rc, _, err = _run(["--checkpoint", tmp_path / "nothing.pth", "--dataset", "synthetic"], capsys)
    assert rc == 1 and "no ViT backbone" in err and "optimizer_state" in err and "some_weights" in err

    (tmp_path / "notes.pth").write_text("not a checkpoint")
    rc, _, err = _run(["--checkpoint", tmp_path / "notes.pth", "--dataset", "synthetic"], capsys)
    assert rc == 1 and err.startswith("error:") and "notes.pth" in err

    path, _ = _official_checkpoint(tmp_path / "official.pth", patch_size_in_args=8)
    rc, _, err = _run(["--checkpoint", path, "--dataset", "synthetic"], capsys)
    assert rc == 1 and "patch_size 8" in err and "16" in err

    ckpt = _our_checkpoint(tmp_path / "ckpt.pth")
    rc, _, err = _run(["--checkpoint", ckpt, "--dataset", "synthetic", "--image-size", 30], capsys)
    assert rc == 1 and "image size 30" in err and "patch size 8" in err

    (tmp_path / "empty").mkdir()
    rc, _, err = _run(["--checkpoint", ckpt, "--dataset", "imagefolder", "--train-path", tmp_path / "empty",
                       "--val-path", tmp_path / "empty"], capsys)
    assert rc == 1 and err.startswith("error:") and "empty" in err


# ---------------------------------------------------------------------------------------------------
# ---- 5. end to end: train.py on a few hundred CIFAR-10 images, then evaluate its checkpoint ----


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 folders not found at {CIFAR}")
def test_end_to_end_from_a_train_py_checkpoint(tmp_path, capsys):
    subset = ["--holdout-per-class", 20, "--limit-per-class", 20]
    rc = train.main([str(a) for a in ["--arch", "vit_nano", "--dataset", "imagefolder", "--data-path", CIFAR, *subset,
                                      "--batch-size", 16, "--max-steps", 2, "--out-dim", 128, "--local-crops", 0,
                                      "--knn-every", 0, "--workers", 0, "--output-dir", tmp_path / "run"]])
    assert rc == 0
    capsys.readouterr()
    rc, out, err = _run(["--checkpoint", tmp_path / "run" / "checkpoint.pth", "--dataset", "imagefolder",
                         "--data-path", CIFAR, *subset, "--epochs", 5, "--workers", 0], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "run" / "eval_imagefolder.json").read_text())
    assert result["config"]["train_images"] == 200 and result["config"]["val_images"] == 200
    assert result["config"]["image_size"] == 32  # the checkpoint's own global size
    assert set(result["knn"]) == {"10", "20", "100", "200"}
    assert all(0.0 <= v <= 100.0 for v in [*result["knn"].values(), result["linear"]["top1"], result["linear"]["top5"]])
