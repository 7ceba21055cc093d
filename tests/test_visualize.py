"""visualize.py: the pictures of the shipped model (32 px) and of an official-layout iBOT ViT-S/16 (224 px, random
weights, the key names of tests/fixtures/official_ibot_vit_small_keys.json): the PNG's panels, [CLS] attention
rows that are distributions, PCA colours that follow the principal directions, top prototypes of the centred
logits; bad input gives one line and exit code 2."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import checkpoints as C
import ibot_min as M
import visualize as V

pytest.importorskip("matplotlib", reason="visualize.py draws with matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "ibot_vit_nano_cifar10.pth"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PANEL, HEADER = round(V.PANEL_INCHES * V.DPI), round(V.HEADER_INCHES * V.DPI)  # pixels


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """n PNGs of a coloured rectangle on a shaded background, with noise: parts a ViT's tokens can tell apart."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.3, 1, 3)  # a horizontal shade
        image = np.broadcast_to(image, (size, size, 3)).copy()
        top, left = rng.integers(0, size // 2, 2)
        image[top:top + size // 2, left:left + size // 3] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        paths.append(folder / f"image{i}.png")
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def check_pictures(pictures: V.Pictures, n_images: int, heads: int, grid: tuple[int, int], prototypes: int):
    n = grid[0] * grid[1]
    assert pictures.attention.shape == (n_images, heads, 1 + n) and pictures.grid == grid
    assert (pictures.attention >= 0).all()
    torch.testing.assert_close(pictures.attention.sum(-1), torch.ones(n_images, heads))  # a softmax row each
    assert pictures.colours.shape == (n_images, n, 3)
    assert pictures.colours.min() >= 0 and pictures.colours.max() <= 1
    assert (pictures.colours.std(dim=1) > 0.05).all()  # every image: colours that differ across its patches
    assert pictures.prototypes.shape == (n_images, n) and pictures.prototypes.dtype == torch.long
    assert pictures.prototypes.min() >= 0 and pictures.prototypes.max() < prototypes


# ---------------------------------------------------------------------------------------------------
# ---- the shipped model, 32 px ----


def test_shipped_model_pictures(tmp_path, capsys):
    files = write_images(tmp_path / "images", 3, 32)
    out = tmp_path / "look.png"
    assert V.main(["--checkpoint", str(SHIPPED), "--images", str(files[0]), str(tmp_path / "images"),
                   "--max-images", "3", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    # columns: the image, 2 heads, PCA, top prototype; rows: 3 images (a file and a folder, cut at 3)
    assert png_size(out) == (5 * PANEL, 3 * PANEL + HEADER)

    viewed = V.load(SHIPPED)
    assert viewed.head is not None and viewed.patch_center.shape == (1024,)
    pixels, x = V.read_images(files, 32)
    assert pixels.shape == (3, 32, 32, 3) and x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(pixels[0], torch.from_numpy(np.array(Image.open(files[0]))).float() / 255)
    check_pictures(V.look(viewed, pixels, x), 3, heads=2, grid=(8, 8), prototypes=1024)


def test_top_prototypes_are_argmax_of_the_centred_teacher_logits(tmp_path):
    ckpt = torch.load(SHIPPED, weights_only=True)
    ckpt["ibot_loss"]["center2"] = torch.zeros(1, 1, 1024)
    ckpt["ibot_loss"]["center2"][..., 7] = -100.0  # t - c' then puts prototype 7 above every other
    torch.save(ckpt, tmp_path / "centred.pth")
    pixels, x = V.read_images(write_images(tmp_path / "images", 2, 32), 32)
    viewed = V.load(tmp_path / "centred.pth")
    assert (V.look(viewed, pixels, x).prototypes == 7).all()
    with torch.no_grad():
        tokens = viewed.backbone(x)[:, 1:]
        _, logits = viewed.head(viewed.backbone(x))  # the head's own forward: (B, N, K_p)
    plain = V.top_prototypes(viewed.head, tokens, None)
    assert torch.equal(plain, logits.argmax(-1)) and plain.unique().numel() > 1  # without c', the head's argmax


def test_a_backbone_without_a_head_draws_no_prototypes(tmp_path):
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=4, img_size=32)
    torch.save({"state_dict": vit.state_dict(), "config": {"num_heads": 2}}, tmp_path / "export.pth")  # timm-like
    out = tmp_path / "look.png"
    files = write_images(tmp_path / "images", 2, 48)  # any size: cropped to 32
    assert V.main(["--checkpoint", str(tmp_path / "export.pth"), "--images", *map(str, files),
                   "--output", str(out)]) == 0
    assert png_size(out) == (4 * PANEL, 2 * PANEL + HEADER)  # the image, 2 heads, PCA
    viewed = V.load(tmp_path / "export.pth")
    assert viewed.head is None and V.look(viewed, *V.read_images(files, 32)).prototypes is None


# ---------------------------------------------------------------------------------------------------
# ---- an official iBOT ViT-S/16 checkpoint, 224 px ----


def official_vit_s16(path: Path) -> tuple[M.VisionTransformer, M.IBOTHead]:
    """Writes a full official iBOT ViT-S/16 checkpoint of random weights in the fixture's layout: the student
    under module.backbone. / module.head., the teacher under backbone. / head. (its shared prototypes saved as
    both last_layer and last_layer2), ibot_loss's centres and the flags as an argparse Namespace. The student
    holds the teacher's tensors (torch.save writes them once) and its own masked_embed."""
    layout = json.loads((FIXTURES / "official_ibot_vit_small_keys.json").read_text())
    torch.manual_seed(0)
    vit = M.vit_small(patch_size=16, img_size=224, masked_embed=True)
    head = M.IBOTHead(384, 8192, 8192, shared=True)
    with torch.no_grad():
        vit.masked_embed.normal_()
    values = {**{"backbone." + k: v for k, v in vit.state_dict().items()},
              **{"head." + k: v for k, v in head.state_dict().items()},
              **{"head.last_layer2." + k: v for k, v in head.last_layer.state_dict().items()}}
    ckpt = {part: {k: values[k.removeprefix("module.")] for k in layout[part]} for part in ("student", "teacher")}
    for part in ("student", "teacher"):
        assert {k: list(v.shape) for k, v in ckpt[part].items()} == layout[part], part
    ckpt["ibot_loss"] = {"center": torch.zeros(1, 8192), "center2": 0.01 * torch.randn(1, 1, 8192)}
    ckpt["args"] = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8192, shared_head_teacher=True)
    ckpt["epoch"] = 3
    torch.save(ckpt, path)
    return vit, head


@pytest.mark.slow
def test_official_vit_s16_checkpoint_pictures(tmp_path):
    vit, head = official_vit_s16(tmp_path / "checkpoint.pth")
    files = write_images(tmp_path / "images", 1, 256)
    out = tmp_path / "look.png"
    assert V.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--images", str(tmp_path / "images"),
                   "--output", str(out), "--device", "cpu"]) == 0
    assert png_size(out) == (9 * PANEL, PANEL + HEADER)  # the image, 6 heads, PCA, top prototype

    saved = C.read_checkpoint(tmp_path / "checkpoint.pth")
    teacher = V.load(tmp_path / "checkpoint.pth")
    assert teacher.backbone.grid == (14, 14) and teacher.backbone.num_heads == 6
    assert teacher.backbone.masked_embed is None
    torch.testing.assert_close(teacher.patch_center, saved["ibot_loss"]["center2"].flatten())  # Q's centre c'
    torch.testing.assert_close(teacher.head.last_layer2.weight_v, head.last_layer.weight_v)  # shared, saved twice
    student = V.load(tmp_path / "checkpoint.pth", "student")
    assert student.backbone.masked_embed is not None and student.patch_center is None  # predictions: no centre
    torch.testing.assert_close(student.head.mlp[0].weight, head.mlp[0].weight)
    pixels, x = V.read_images(files, 224)  # the size its position embeddings were made for
    pictures = V.look(student, pixels, x)
    check_pictures(pictures, 1, heads=6, grid=(14, 14), prototypes=8192)
    with torch.no_grad():
        torch.testing.assert_close(pictures.attention, vit.get_last_selfattention(x)[:, :, 0])


# ---------------------------------------------------------------------------------------------------
# ---- PCA colours ----


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n_images=st.integers(1, 3), n=st.integers(1, 20), dim=st.integers(2, 12))
def test_pca_colours_are_the_principal_directions_within_images(seed, n_images, n, dim):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_images, n, dim, generator=g) * torch.linspace(3, 0.5, dim)  # distinct variances
    colours = V.pca_colours(tokens)
    assert colours.shape == (n_images, n, 3) and colours.min() >= 0 and colours.max() <= 1
    # each image's mean token is taken out first: shifting an image's tokens changes nothing
    shifted = tokens + torch.randn(n_images, 1, dim, generator=g) * 10
    torch.testing.assert_close(V.pca_colours(shifted), colours, atol=1e-4, rtol=1e-4)
    # channel c is an increasing affine map of the projection on the c-th principal direction (numpy's eigh)
    z = (tokens - tokens.mean(1, keepdim=True)).flatten(0, 1).double().numpy()
    eigenvalues, vectors = np.linalg.eigh(z.T @ z)  # ascending
    for c in range(3):
        channel = colours[..., c].flatten().double().numpy()
        if c >= dim or eigenvalues[-1 - c] <= 1e-6 * max(eigenvalues[-1], 1e-30):
            assert (channel == 0).all()  # fewer than 3 directions vary (few patches): the rest is black
            continue
        below = eigenvalues[-2 - c] if c + 1 < dim else 0.0
        if eigenvalues[-1 - c] - below < 1e-6 * eigenvalues[-1]:
            continue  # a repeated eigenvalue: its direction is not unique
        v = vectors[:, -1 - c]
        v = v * np.sign(v[np.abs(v).argmax()])
        projection = z @ v
        expected = (projection - projection.min()) / (projection.max() - projection.min())
        np.testing.assert_allclose(channel, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# ---- bad input: one line, exit code 2 ----


def bad_inputs(tmp_path: Path) -> dict:
    images = write_images(tmp_path / "images", 1, 32)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(SHIPPED.read_bytes()[:50_000])
    shutil.copy(SHIPPED, tmp_path / "teacher_only.pth")
    ok = ["--checkpoint", str(SHIPPED), "--images", str(images[0])]
    return {  # argv (with --output added) -> what the line must name
        "missing image": ([*ok[:3], str(tmp_path / "nope.png")], "nope.png"),
        "not an image": ([*ok[:3], str(tmp_path / "notes.png")], "notes.png"),
        "folder without images": ([*ok[:3], str(tmp_path / "empty")], "no images"),
        "missing checkpoint": (["--checkpoint", str(tmp_path / "nope.pth"), *ok[2:]], "nope.pth"),
        "damaged checkpoint": (["--checkpoint", str(damaged), *ok[2:]], "damaged.pth"),
        "no student": (["--checkpoint", str(tmp_path / "teacher_only.pth"), *ok[2:], "--which", "student"],
                       "teacher_only.pth"),
        "size": ([*ok, "--size", "30"], "multiple of the patch size 4"),
    }


@pytest.mark.parametrize("case", ["missing image", "not an image", "folder without images", "missing checkpoint",
                                  "damaged checkpoint", "no student", "size"])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys, case):
    argv, named = bad_inputs(tmp_path)[case]
    out = tmp_path / "look.png"
    assert V.main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not out.exists()
