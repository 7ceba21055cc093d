"""Checkpoints a user brings: a damaged file is one line naming it in every reader (checkpoints.read_checkpoint,
load_backbone, eval_linear.py, scripts/ship_model.py), and what the weights cannot tell (the head count) is read
from where each common format keeps it, or asked for in one line, never guessed. The load_backbone layouts
(ours, official, backbone-only, timm) are tested in test_ibot_min.py, section 6."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints as C
import eval_linear as el
import ibot_min as M

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ship_model  # noqa: E402


def our_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=8, global_size=16, out_dim=32, head_hidden_dim=32,
                       head_bottleneck_dim=16, local_crops=0)
    torch.save(M.IBOT(cfg).checkpoint(), path)
    return path


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def narrow_heads_vit(seed: int = 0) -> M.VisionTransformer:
    """128 wide with 4 heads of 32: a head count that embed_dim // 64 (2) would get wrong."""
    torch.manual_seed(seed)
    return M.VisionTransformer(img_size=16, patch_size=8, embed_dim=128, depth=1, num_heads=4).eval()


def same_outputs(a: M.VisionTransformer, b: M.VisionTransformer) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# ---- 1. damaged files: one line naming the file, in every reader ----


@pytest.mark.parametrize("keep", [0, 10, 20_000, "half"])
def test_a_damaged_checkpoint_is_one_line_naming_it_in_every_reader(tmp_path, capsys, keep):
    whole = our_checkpoint(tmp_path / "whole.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[:len(whole) // 2 if keep == "half" else keep])
    with pytest.raises(ValueError, match=f"cannot read {cut}: the file is damaged or not a torch checkpoint"):
        C.read_checkpoint(cut)
    with pytest.raises(ValueError, match=f"cannot read {cut}: the file is damaged"):
        C.load_backbone(cut)

    rc = el.main([str(a) for a in ["--checkpoint", cut, "--dataset", "synthetic", "--knn", "--workers", 0]])
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and f"cannot read {cut}: the file is damaged" in err

    assert ship_model.main([str(cut), str(tmp_path / "shipped.pth")]) == 1
    assert f"cannot read {cut}" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "shipped.pth").exists()


def test_ship_model_command_keeps_the_teacher_and_refuses_other_files(tmp_path):
    ckpt = our_checkpoint(tmp_path / "ckpt.pth")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(ckpt),
                           str(tmp_path / "out" / "model.pth")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shipped = C.read_checkpoint(tmp_path / "out" / "model.pth")
    assert set(shipped) == {"teacher", "ibot_loss", "config", "step", "train_config"}
    same_outputs(C.load_backbone(tmp_path / "out" / "model.pth"), C.load_backbone(ckpt))

    torch.save({"state_dict": narrow_heads_vit().state_dict()}, tmp_path / "export.pth")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(tmp_path / "export.pth"),
                           str(tmp_path / "x.pth")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is not a train.py checkpoint" in one_line(proc.stderr)


def test_what_weights_only_refuses_and_what_is_not_a_dict_are_one_line(tmp_path):
    torch.save({"state_dict": {}, "best_acc": np.float64(71.5)}, tmp_path / "numpy.pth")
    with pytest.raises(ValueError, match=r"numpy.pth: it holds an object of type numpy\S*scalar, which "
                                         r"torch.load\(weights_only=True\) does not load"):
        C.read_checkpoint(tmp_path / "numpy.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="tensor.pth: it holds a Tensor, expected a checkpoint dict"):
        C.read_checkpoint(tmp_path / "tensor.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        C.read_checkpoint(tmp_path / "missing.pth")
    torch.save({"args": argparse.Namespace(arch="vit_small"), "epoch": 3}, tmp_path / "official.pth")
    assert C.read_checkpoint(tmp_path / "official.pth")["args"].arch == "vit_small"  # official flags load


# ---------------------------------------------------------------------------------------------------
# ---- 2. the head count: read where each format keeps it, or asked for in one line ----


def test_heads_not_stated_is_one_line_naming_the_argument(tmp_path, capsys):
    vit = narrow_heads_vit()
    with pytest.raises(ValueError, match="does not say how many attention heads its 128 wide ViT has, and the "
                                         r"weights cannot tell; pass num_heads \(eval_linear.py: --num-heads\)"):
        C.load_backbone(vit.state_dict())
    torch.save(vit.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bare.pth'}: the checkpoint does not say"):
        C.load_backbone(tmp_path / "bare.pth")

    flags = ["--checkpoint", tmp_path / "bare.pth", "--dataset", "synthetic", "--image-size", 16, "--knn",
             "--ks", 5, "--workers", 0, "--output", tmp_path / "eval.json"]
    assert el.main([str(a) for a in flags]) == 1
    assert "--num-heads" in one_line(capsys.readouterr().err)
    assert el.main([str(a) for a in flags + ["--num-heads", 4]]) == 0  # the flag supplies it
    assert (tmp_path / "eval.json").is_file()
    same_outputs(C.load_backbone(tmp_path / "bare.pth", num_heads=4), vit)


def test_heads_stated_in_each_format_load(tmp_path):
    vit = narrow_heads_vit()
    sd = vit.state_dict()
    formats = {
        "our config": {"teacher": sd, "config": {"arch": "custom", "num_heads": 4}},
        "official args": {"teacher": {"backbone." + k: v for k, v in sd.items()},
                          "args": argparse.Namespace(arch="vit_custom", num_heads=4, patch_size=8)},
        "DeiT / MAE args": {"model": sd, "args": argparse.Namespace(model="my_vit", num_heads=4)},
    }
    for name, ckpt in formats.items():
        torch.save(ckpt, tmp_path / "ckpt.pth")
        loaded = C.load_backbone(tmp_path / "ckpt.pth")
        assert loaded.num_heads == 4, name
        same_outputs(loaded, vit)

    # architecture names give the heads of their width: ours, official iBOT / DINO, DeiT and timm
    torch.manual_seed(0)
    tiny = M.VisionTransformer(img_size=16, patch_size=8, embed_dim=192, depth=1, num_heads=3).eval()
    named = {
        "our arch": {"teacher": tiny.state_dict(), "config": {"arch": "vit_tiny"}},
        "official iBOT / DINO args": {"teacher": tiny.state_dict(), "args": argparse.Namespace(arch="vit_tiny")},
        "DeiT args": {"model": tiny.state_dict(), "args": argparse.Namespace(model="deit_tiny_patch16_224")},
        "timm CheckpointSaver": {"state_dict": tiny.state_dict(), "arch": "vit_tiny_patch16_224.augreg_in21k"},
    }
    for name, ckpt in named.items():
        loaded = C.load_backbone(ckpt)
        assert loaded.num_heads == 3, name
        same_outputs(loaded, tiny)
    assert C.load_backbone(M.IBOT(M.IBOTConfig(arch="vit_nano", patch_size=8, global_size=16, out_dim=32,
                                               head_hidden_dim=32, head_bottleneck_dim=16)).checkpoint()).num_heads == 2


def test_heads_that_disagree_are_one_line(tmp_path):
    vit = narrow_heads_vit()
    with pytest.raises(ValueError, match="num_heads 2 was given, but the checkpoint's num_heads says 4 heads"):
        C.load_backbone({"teacher": vit.state_dict(), "config": {"num_heads": 4}}, num_heads=2)
    with pytest.raises(ValueError, match=r"says arch 'vit_small', a 384 wide ViT, but its weights are 128 wide; "
                                         r"pass num_heads"):
        C.load_backbone({"teacher": vit.state_dict(), "args": argparse.Namespace(arch="vit_small")})
    # the caller's count stands where the name is no guide
    same_outputs(C.load_backbone({"teacher": vit.state_dict(), "args": argparse.Namespace(arch="vit_small")},
                                 num_heads=4), vit)
    with pytest.raises(ValueError, match="3 attention heads do not divide the weights' width 128"):
        C.load_backbone(vit.state_dict(), num_heads=3)


def test_a_non_square_grid_is_read_from_the_img_size_argument():
    torch.manual_seed(0)
    vit = M.VisionTransformer(img_size=(16, 32), patch_size=8, embed_dim=128, depth=1, num_heads=2).eval()
    with pytest.raises(ValueError, match="not a square grid.*pass img_size=\\(height, width\\) to load_backbone"):
        C.load_backbone(vit.state_dict(), num_heads=2)
    loaded = C.load_backbone(vit.state_dict(), num_heads=2, img_size=(16, 32))
    assert loaded.grid == (2, 4)
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), vit(x))
