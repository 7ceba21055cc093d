"""Bad input and faults that users really hit: each ends in one line that names the file or flag,
with exit code 1 and no good file changed, or is handled correctly. One section per kind of fault."""

import argparse
import gc
import hashlib
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_checkpoints import our_checkpoint
from test_train import TINY, make_folder

import data as D
import eval_linear as el
import checkpoints as C
import ibot_min as M
import train

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def good_checkpoint(out: Path) -> Path:
    """A file standing for a good checkpoint of an earlier run, which a run started with --no-resume would write
    over at its first save: a fault found before then must leave it as it was."""
    out.mkdir(parents=True)
    torch.save({"step": 7, "student": {"w": torch.ones(3)}}, out / "checkpoint.pth")
    return out / "checkpoint.pth"


def truncate(path: Path) -> None:
    """Cut an image file in half: its header reads, its pixels do not (a copy that stopped half-way)."""
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


# ---------------------------------------------------------------------------------------------------
# ---- 4. Sinkhorn-Knopp: batches with no masked patch, and scores that span hundreds ----


def reference_sinkhorn(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """DINOv2's DINOLoss.sinkhorn_knopp_teacher (dinov2/loss/dino_clstoken_loss.py) on one process, in float64;
    scores = teacher_output / teacher_temp."""
    Q = torch.exp(scores.double()).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


@pytest.mark.parametrize("rows, K, spread, seed", [(50, 16, 1 / 0.07, 0), (7, 64, 1 / 0.04, 1), (300, 8, 3.0, 2)])
def test_sinkhorn_equals_the_plain_reference_on_ordinary_scores(rows, K, spread, seed):
    scores = spread * torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(M.sinkhorn_knopp(scores).double(), reference_sinkhorn(scores), atol=1e-6, rtol=1e-5)


def test_sinkhorn_stays_finite_when_scores_span_hundreds():
    # a teacher at tau_t = 0.01 with features near one prototype: cosines in [-1, 1] / 0.01 span up to 200,
    # and one prototype is far below every row's best: float32 exp() underflows to 0, and 0 / 0 is NaN
    g = torch.Generator().manual_seed(0)
    scores = (0.6 + 0.4 * torch.rand(40, 32, generator=g)) / 0.01
    scores[:, 5] = -1.0 / 0.01  # a prototype no feature is near: 200 below the others
    assert scores.max() - scores.min() > 190
    Q = M.sinkhorn_knopp(scores)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.double(), reference_sinkhorn(scores), atol=1e-6, rtol=1e-5)  # float64 is finite
    torch.testing.assert_close(Q.sum(1), torch.ones(40))


def test_sinkhorn_on_no_rows_gives_no_targets():
    assert M.sinkhorn_knopp(torch.empty(0, 16)).shape == (0, 16)


def _sinkhorn_rank(rank: int, init_file: str, shardings: list, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save([M.sinkhorn_knopp(shards[rank]) for shards in shardings], Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sinkhorn_over_two_ranks_equals_one_process_on_all_rows(tmp_path):
    # every rank's rows are balanced together (sums over ranks), and a rank may hold none (no masked patch)
    scores = torch.randn(9, 6, generator=torch.Generator().manual_seed(0)) / 0.05
    shardings = [[scores[:4], scores[4:]], [scores[:0], scores]]
    mp.start_processes(_sinkhorn_rank, args=(str(tmp_path / "init"), shardings, str(tmp_path)), nprocs=2,
                       start_method="fork")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i in range(len(shardings)):
        torch.testing.assert_close(torch.cat([per_rank[0][i], per_rank[1][i]]), M.sinkhorn_knopp(scores))


def test_sinkhorn_loss_without_masked_patches_has_no_patch_term():
    g, l, B, N, K = 2, 1, 3, 4, 8
    gen = torch.Generator().manual_seed(0)
    s_cls, t_cls = torch.randn((g + l) * B, K, generator=gen), torch.randn(g * B, K, generator=gen)
    s_patch, t_patch = torch.randn(g * B, N, K, generator=gen), torch.randn(g * B, N, K, generator=gen)
    no_masks = torch.zeros(g * B, N, dtype=torch.bool)
    sinkhorn, centre = M.IBOTLoss(K, K, g, l, centering="sinkhorn"), M.IBOTLoss(K, K, g, l)
    out = sinkhorn(s_cls, s_patch, t_cls, t_patch, no_masks, 0.04, 0.04)
    assert out["patch"] == 0 and torch.isfinite(out["loss"]) and out["loss"] == out["cls"]
    assert centre(s_cls, s_patch, t_cls, t_patch, no_masks, 0.04, 0.04)["patch"] == 0  # as the default centring


@pytest.mark.parametrize("argv", [
    ["--pred-start-epoch", "1", "--no-device-augment"],  # no masks in the first epoch
    ["--mask-ratios", "0", "0", "--mask-ratio-vars", "0", "0", "--device-augment"],  # no masks ever
    ["--batch-size", "1", "--koleo", "0", "--max-steps", "8", "--no-device-augment"],  # both crops draw ratio 0
])
def test_sinkhorn_training_without_masked_patches(tmp_path, argv):
    folder = make_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "run"
    summary = train.train(train.parse_args(TINY + ["--data-path", str(folder), "--batch-size", "4", "--epochs", "1",
                                                   "--centering", "sinkhorn", "--output-dir", str(out)] + argv))
    assert summary["steps"] >= 2 and math.isfinite(summary["last"]["loss"])


# ---------------------------------------------------------------------------------------------------
# ---- 5. a class folder without images, in the train/ + val/ layout ----


def test_empty_class_folder_in_train_val_layout_is_named(tmp_path, capsys):
    make_folder(tmp_path / "data" / "train")
    make_folder(tmp_path / "data" / "val", per_class=2)
    (tmp_path / "data" / "train" / "class2").mkdir()  # made, never filled
    assert train.main(TINY + ["--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert "class2" in err and str(tmp_path / "data" / "train") in err
    assert not (tmp_path / "run").exists()
    ckpt = our_checkpoint(tmp_path / "ckpt.pth")
    assert el.main([str(a) for a in ["--checkpoint", ckpt, "--data-path", tmp_path / "data", "--knn",
                                     "--workers", 0, "--device", "cpu"]]) == 1
    assert "class2" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------
# ---- 6. a truncated image read by loader workers ----


def assert_workers_already_freed():
    # torch's re-raise of a worker's error leaves a reference cycle; a loader left to the garbage collector
    # waits 5 s per worker before it kills them, so main() frees it at once
    t0 = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - t0 < 2.5


@pytest.mark.parametrize("path", ["--no-device-augment", "--device-augment"])  # per-step loader, decode_all
def test_truncated_image_with_loader_workers_is_one_line_in_train(tmp_path, capsys, path):
    folder = make_folder(tmp_path / "images", per_class=12)
    truncate(folder / "class1" / "0010.png")  # the 23rd image: decoded by a worker, never in the main process
    checkpoint = good_checkpoint(tmp_path / "run")
    before = digest(checkpoint)
    rc = train.main(TINY + ["--workers", "2", "--data-path", str(folder), "--batch-size", "4", "--epochs", "1",
                            "--no-resume", "--output-dir", str(tmp_path / "run"), path])
    assert rc == 1
    err = one_line_error(capsys)
    assert str(folder / "class1" / "0010.png") in err and "truncated" in err
    assert digest(checkpoint) == before
    assert_workers_already_freed()


def test_truncated_image_with_loader_workers_is_one_line_in_eval(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", per_class=8)
    truncate(folder / "class0" / "0006.png")
    ckpt, out = our_checkpoint(tmp_path / "ckpt.pth"), tmp_path / "eval.json"
    assert el.main([str(a) for a in ["--checkpoint", ckpt, "--data-path", folder, "--holdout-per-class", 2, "--knn",
                                     "--workers", 2, "--device", "cpu", "--output", out]]) == 1
    assert str(folder / "class0" / "0006.png") in one_line_error(capsys)
    assert not out.exists()
    assert_workers_already_freed()


def test_bad_image_message_survives_the_worker_re_raise():
    # torch re-makes a worker's exception in the main process from its whole traceback text
    with pytest.raises(D.BadImage) as caught:
        next(iter(torch.utils.data.DataLoader(D.Transformed([("x", 0)], lambda _: D.read_image("/no/such.png")),
                                              num_workers=1)))
    assert str(caught.value).startswith("cannot read image /no/such.png: ") and "\n" not in str(caught.value)
    traceback.clear_frames(caught.tb)  # frees the loader's worker now (see assert_workers_already_freed)


# ---------------------------------------------------------------------------------------------------
# ---- 7. 16-bit images ----


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    ramp = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint16)  # every 16-bit value once
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    rgb = np.asarray(D.read_image(str(tmp_path / "ramp.png")))
    assert rgb.shape == (256, 256, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))  # 65535 -> 255
    assert (rgb == 255).mean() < 0.002 and abs(rgb.mean() - 127.5) < 0.1  # not 99.6% white, as clipping gave


def test_images_without_an_8_or_16_bit_range_are_refused(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "deep.tif")
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(D.BadImage, match=r"deep\.tif: mode I holds values 70000\.\.70000"):
        D.read_image(str(tmp_path / "deep.tif"))
    with pytest.raises(D.BadImage, match=r"float\.tif: .*mode F"):
        D.read_image(str(tmp_path / "float.tif"))


# ---------------------------------------------------------------------------------------------------
# ---- 8. images of mixed sizes with --device-augment ----


def test_odd_sized_image_anywhere_is_named_with_device_augment_and_the_run_goes_on(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")  # 2 x 16 images of 16 px
    odd = folder / "class1" / "0004.png"  # the 21st image: past the first 16 a first-batch check would read
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(odd)
    assert train.main(TINY + ["--device-augment", "--data-path", str(folder), "--batch-size", "4", "--epochs", "1",
                              "--no-resume", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "each image stored as" in line)  # said once, with its cost
    assert str(odd) in line and "20 x 20" in line and "16 x 16" in line and "32 x 32 pixels" in line
    with pytest.raises(D.BadImage, match="pass --no-device-augment"):  # no crop size to store them at: one line
        D.decode_all(D.build_dataset("imagefolder", str(folder)), 0)


# ---------------------------------------------------------------------------------------------------
# ---- 9. a one-channel checkpoint in eval_linear.py ----


def test_one_channel_checkpoint_is_fed_grayscale_images(tmp_path, capsys):
    for c, level in enumerate([40, 200]):  # two classes of flat grayscale images, +-3 levels of noise
        (tmp_path / "gray" / f"class{c}").mkdir(parents=True)
        rng = np.random.default_rng(c)
        for i in range(6):
            pixels = (level + rng.integers(-3, 4, (16, 16))).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "gray" / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=4, img_size=16, in_chans=1)
    torch.save({"state_dict": vit.state_dict(), "config": {"num_heads": 2}}, tmp_path / "gray.pth")
    out = tmp_path / "eval.json"
    rc = el.main([str(a) for a in ["--checkpoint", tmp_path / "gray.pth", "--data-path", tmp_path / "gray",
                                   "--holdout-per-class", 2, "--image-size", 16, "--knn", "--ks", 1, "--workers", 0,
                                   "--device", "cpu", "--output", out]])
    assert rc == 0, capsys.readouterr().err
    assert '"1": 100.0' in out.read_text()  # flat images of two grey levels: the nearest one is of the same class

    torch.save({"state_dict": M.vit_nano(patch_size=4, img_size=16, in_chans=2).state_dict(), "config": {"num_heads": 2}},
               tmp_path / "two.pth")
    assert el.main([str(a) for a in ["--checkpoint", tmp_path / "two.pth", "--data-path", tmp_path / "gray",
                                     "--holdout-per-class", 2, "--workers", 0, "--device", "cpu"]]) == 1
    assert "2-channel" in one_line_error(capsys)


def test_grayscale_transform_feeds_the_luma_normalised():
    img = Image.fromarray(np.full((8, 8, 3), (200, 100, 50), dtype=np.uint8))
    x = D.eval_transform(8, channels=1)(img)
    luma = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601, as PIL's convert("L")
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x, torch.full((1, 8, 8), (luma / 255 - D.GRAY_MEAN[0]) / D.GRAY_STD[0]))


# ---------------------------------------------------------------------------------------------------
# ---- 10. a checkpoint trained on non-square images ----


def test_non_square_position_grid_is_read_from_the_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=8, img_size=(64, 96)).eval()  # an 8 x 12 grid: 96 positions, no square
    x = torch.randn(1, 3, 64, 96)
    for ckpt in ({"state_dict": vit.state_dict(), "config": {"img_size": [64, 96], "num_heads": 2}},
                 {"model": vit.state_dict(), "args": argparse.Namespace(img_size=None, input_size=[3, 64, 96],
                                                                       num_heads=2)}):
        loaded = C.load_backbone(ckpt).eval()
        assert loaded.grid == (8, 12)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), vit(x))
    with pytest.raises(ValueError, match="96 patch positions, not a square grid, and it does not say its image size"):
        C.load_backbone(vit.state_dict(), num_heads=2)
    with pytest.raises(ValueError, match="says image size 96 x 96 .* 144 patches, but its pos_embed holds 96"):
        C.load_backbone({"state_dict": vit.state_dict(), "config": {"img_size": 96, "num_heads": 2}})

    torch.save({"state_dict": vit.state_dict(), "config": {"img_size": [64, 96], "num_heads": 2}}, tmp_path / "wide.pth")
    folder = make_folder(tmp_path / "images", per_class=4)
    rc = el.main([str(a) for a in ["--checkpoint", tmp_path / "wide.pth", "--data-path", folder,
                                   "--holdout-per-class", 1, "--knn", "--image-size", 32, "--workers", 0,
                                   "--device", "cpu", "--output", tmp_path / "eval.json"]])
    assert rc == 0, capsys.readouterr().err
    torch.save(vit.state_dict(), tmp_path / "bare.pth")
    assert el.main([str(a) for a in ["--checkpoint", tmp_path / "bare.pth", "--data-path", folder,
                                     "--holdout-per-class", 1, "--workers", 0, "--device", "cpu"]]) == 1
    assert "not a square grid" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------
# ---- 11. fewer evaluation images than processes ----


def test_fewer_eval_images_than_processes_stops_every_rank_in_one_line(tmp_path):
    make_folder(tmp_path / "train", classes=1, per_class=4)
    make_folder(tmp_path / "val", classes=1, per_class=1)
    ckpt, out = our_checkpoint(tmp_path / "ckpt.pth"), tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "eval_linear.py"), "--checkpoint", str(ckpt), "--train-path", str(tmp_path / "train"),
           "--val-path", str(tmp_path / "val"), "--knn", "--workers", "0", "--device", "cpu", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]  # the same one line from each rank
    assert "the val split has fewer images (1) than processes (2)" in errors[0]
    assert "eval_linear.py\", line" not in proc.stderr and "gloo" not in proc.stderr.lower()  # no traceback of ours
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# ---- 12. invalid mask ratios, a local crop size the patch does not divide, KoLeo on one image ----


@pytest.mark.parametrize("ratios, ratio_vars, message", [
    ((0.5,), (0.6,), "var <= ratio"),  # draws below 0: an index error on the device path
    ((0.9,), (0.2,), "ratio \\+ var < 1"),  # draws above 1: crops masked 100% on the device path
    ((0.3,), (0.1, 0.2), "one var per ratio"),  # the device path cut the second var silently
])
def test_invalid_mask_ratios_are_refused_before_training(tmp_path, capsys, ratios, ratio_vars, message):
    with pytest.raises(ValueError, match=message):
        M.MultiCropAugmentation(mask_ratios=ratios, mask_ratio_vars=ratio_vars)
    argv = ["--mask-ratios", *map(str, ratios), "--mask-ratio-vars", *map(str, ratio_vars)]
    assert train.main(TINY + ["--device-augment", "--data-path", str(make_folder(tmp_path / "images")),
                              "--output-dir", str(tmp_path / "run")] + argv) == 1
    err = one_line_error(capsys)
    assert "--mask-ratios" in err and "--mask-ratio-vars" in err
    assert not (tmp_path / "run").exists()


def test_local_crop_size_not_divisible_by_the_patch_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="local_size 10 is not divisible by patch_size 4"):
        M.MultiCropAugmentation(global_size=16, local_size=10, patch_size=4)
    M.MultiCropAugmentation(global_size=16, local_size=10, patch_size=4, local_crops=0)  # no local crops: unused
    assert train.main(TINY + ["--local-size", "10", "--data-path", str(make_folder(tmp_path / "images")),
                              "--output-dir", str(tmp_path / "run")]) == 1
    assert "--local-size" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_koleo_at_batch_size_one_names_the_flags(tmp_path, capsys):
    assert train.main(TINY + ["--koleo", "1", "--batch-size", "1", "--max-steps", "1", "--no-device-augment",
                              "--data-path", str(make_folder(tmp_path / "images", per_class=2)),
                              "--output-dir", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys)
    assert "--koleo" in err and "--batch-size" in err
