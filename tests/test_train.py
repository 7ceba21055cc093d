"""End-to-end runs of train.py on tiny data: real CIFAR PNGs, exact resume, failure handling, bad input, torchrun."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data as D
import ibot_min as M
import runtime
import train

ROOT = Path(__file__).resolve().parents[1]
# a CPU-sized model: vit_nano, 16 px crops, a narrow head (the default 2048-wide head dominates nano's time);
# the cifar10 preset, so the PIL loader path (the GPU default) is the one these runs cover
TINY = ["--preset", "cifar10", "--dataset", "imagefolder", "--arch", "vit_nano", "--global-size", "16", "--local-size", "8", "--local-crops", "2", "--out-dim", "64",
        "--head-hidden-dim", "64", "--workers", "0", "--device", "cpu", "--holdout-per-class", "0"]


def make_folder(root: Path, classes=2, per_class=16, size=16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i:04d}.png")
    return root


def run(argv) -> dict:
    return train.train(train.parse_args(argv))


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def test_end_to_end_on_real_cifar(cifar_train, tmp_path):
    out = tmp_path / "run"
    summary = run(TINY + ["--global-size", "32", "--local-size", "16", "--data-path", str(cifar_train),
                          "--limit-per-class", "20", "--holdout-per-class", "10", "--batch-size", "50", "--epochs", "2",
                          "--knn-every", "1", "--koleo", "0.5", "--output-dir", str(out)])
    init, *rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert init["step"] == 0 and 0 <= init["knn_top1"] <= 100  # the random-init baseline comes first
    assert [r["epoch"] for r in rows] == [1, 2] and summary["steps"] == 8
    assert all(np.isfinite([r["loss"], r["cls"], r["patch"], r["koleo"]]).all() for r in rows)  # --koleo is on
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["config"]["arch"] == "vit_nano"
    assert {"student", "teacher", "ibot_loss", "optimizer", "rng"} <= set(ckpt)


@pytest.mark.parametrize("views", ["--no-device-augment", "--device-augment"])
def test_exact_resume_across_epochs_and_mid_epoch(folder, tmp_path, monkeypatch, views):
    common = TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "2", "--seed", "3", views]
    run(common + ["--output-dir", str(tmp_path / "straight")])  # 2 epochs of 4 steps
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)

    # the same run stopped by Ctrl-C after 3 steps (mid-epoch 0), then resumed by running it again
    real_step, calls = train.train_step, []

    def interrupted_step(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    first = run(common + ["--output-dir", str(tmp_path / "resumed")])
    assert first["interrupted"] and first["steps"] == 3
    monkeypatch.setattr(train, "train_step", real_step)
    run(common + ["--output-dir", str(tmp_path / "resumed")])
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert resumed["step"] == straight["step"] == 8
    for part in ("student", "teacher"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after resume"
    assert torch.equal(straight["ibot_loss"]["center"], resumed["ibot_loss"]["center"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def nan_from_step_5(*a, **kw):
        out = real_step(*a, **kw)
        calls.append(1)
        return {k: v * float("nan") for k, v in out.items()} if len(calls) >= 5 else out

    monkeypatch.setattr(train, "train_step", nan_from_step_5)
    out = tmp_path / "run"
    code = train.main(TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "3", "--output-dir", str(out)])
    assert code == 1
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)  # written after epoch 1 (step 4), loadable
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    train.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def crash_midway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        train.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--data-path", "/nonexistent/folder"], "is not a folder"),
    (["--dataset", "mnist"], "unknown dataset"),
    (["--batch-size", "64"], "fewer than one global batch"),
    (["--budget", "soon"], "--budget must be a positive duration such as 90s, 5m, 1.5h"),
    (["--budget", "0s"], "--budget must be a positive duration"),
    (["--budget=-5m"], "--budget must be a positive duration"),
    (["--koleo", "-1", "--batch-size", "8"], "koleo is a loss weight"),
    (["--global-scale", "0.5", "0.3"], "--global-scale takes"),
    (["--local-scale", "0", "0.3"], "--local-scale takes"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
])
def test_bad_input_gives_one_line_error(folder, tmp_path, capsys, argv, message):
    base = TINY + ["--data-path", str(folder), "--output-dir", str(tmp_path / "run")]
    assert train.main(base + argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_empty_folder_and_unreadable_image_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(TINY + ["--data-path", str(tmp_path / "empty")]) == 1
    assert "no images found" in capsys.readouterr().err
    folder = make_folder(tmp_path / "images", per_class=8)
    (folder / "class0" / "0003.png").write_bytes(b"not a png")
    assert train.main(TINY + ["--data-path", str(folder), "--batch-size", "4", "--epochs", "1",
                              "--output-dir", str(tmp_path / "run")]) == 1
    assert "0003.png" in capsys.readouterr().err


def test_unknown_preset_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--preset", "imagenet-vit-h"])
    assert e.value.code != 0 and "unknown preset" in capsys.readouterr().err


def test_resume_with_incompatible_config_is_refused(folder, tmp_path, capsys):
    argv = TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "1", "--output-dir", str(tmp_path)]
    assert train.main(argv) == 0
    assert train.main(argv + ["--out-dim", "32"]) == 1
    assert "cannot resume" in capsys.readouterr().err


def test_cifar10_download_path_reads_a_local_copy(tmp_path, monkeypatch):
    # torchvision's CIFAR10 layout (cifar-10-batches-py) made here; its integrity check is what a real
    # download would satisfy, so it is bypassed for this hand-made copy
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    import pickle
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(D.torchvision.datasets.cifar, "check_integrity", lambda *a, **kw: True)
    ds = D.build_dataset("cifar10", str(tmp_path), "train", download=True)
    assert len(ds) == 20 and ds[0][0].size == (32, 32)
    assert len(D.build_dataset("cifar10", str(tmp_path), "val")) == 4
    limited = D.build_dataset("cifar10", str(tmp_path), "train", limit_per_class=2)  # the kNN bank's limit too
    assert len(limited) == 8 and sorted(limited.targets) == [0, 0, 1, 1, 2, 2, 3, 3]
    monkeypatch.setattr(D.torchvision.datasets.cifar, "check_integrity", lambda *a, **kw: False)
    with pytest.raises(ValueError, match="--download"):
        D.build_dataset("cifar10", str(tmp_path), "train")


def test_budget_stops_on_time_with_schedules_at_their_end(folder, tmp_path):
    out = tmp_path / "run"
    summary = run(TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "1000", "--budget", "10s",
                          "--output-dir", str(out)])
    assert summary["train_s"] < 10 + 3  # one step past the budget at most, plus its epoch's bookkeeping
    assert summary["steps"] == summary["total"] >= 3  # past the steps that measure the rate
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    args = train.parse_args(TINY)  # the final values the preset and the defaults give
    assert last["lr"] == pytest.approx(args.min_lr) and last["wd"] == pytest.approx(args.weight_decay_end)
    assert last["momentum"] == pytest.approx(1.0) and last["teacher_temp"] == pytest.approx(args.teacher_temp)


def test_torchrun_two_processes_agree(folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py")] + TINY + ["--data-path", str(folder), "--batch-size", "4", "--epochs", "2",
                                             "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks agree on the teacher weights and loss centres" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 8  # 32 images / (2 ranks x 4) = 4 steps an epoch


def test_gradients_are_clipped_per_parameter():
    params = [torch.nn.Parameter(torch.zeros(10)) for _ in range(3)]
    for p, scale in zip(params, [0.1, 1.0, 10.0]):
        p.grad = torch.full((10,), scale)
    train.clip_gradients(params, 3.0)
    norms = [float(p.grad.norm()) for p in params]
    assert norms[0] == pytest.approx(0.1 * 10 ** 0.5)  # below the limit: untouched
    assert norms[1] == pytest.approx(3.0, rel=1e-5) and norms[2] == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(params[2].grad, torch.full((10,), 3.0 / 10 ** 0.5), atol=1e-5)  # direction kept


def test_knn_monitor_spares_the_global_rng(folder):
    # a kNN score between epochs must not shift the drop-path draws, or a resumed run would differ
    args = train.parse_args(TINY + ["--data-path", str(folder), "--holdout-per-class", "4"])
    args.device, args.precision = "cpu", "fp32"
    model = M.IBOT(train.build(M.IBOTConfig, args))
    before = torch.get_rng_state()
    score = train.knn_monitor(model, args, "cpu")
    assert 0 <= score <= 100 and torch.equal(before, torch.get_rng_state())


def test_patch_whitening_starts_student_and_teacher_from_the_same_whitened_embedding(folder):
    tiny = TINY + ["--data-path", str(folder), "--batch-size", "8", "--device", "cpu", "--precision", "fp32"]
    args = train.parse_args(tiny + ["--patch-whitening"])
    plain = train.setup(train.parse_args(tiny))
    run = train.setup(args)
    student, teacher = run.model.student.backbone, run.model.teacher.backbone
    assert torch.equal(student.patch_embed.proj.weight, teacher.patch_embed.proj.weight)
    assert torch.equal(student.patch_embed.proj.bias, teacher.patch_embed.proj.bias)
    assert not torch.equal(student.patch_embed.proj.weight, plain.model.student.backbone.patch_embed.proj.weight)
    # the whitened channels' outputs on the training images' patches are decorrelated with unit-bounded variance
    images = torch.stack([D.eval_transform(args.global_size)(img) for img, _ in run.images])
    y = F.conv2d(images, student.patch_embed.proj.weight, student.patch_embed.proj.bias)[:, 0::2]
    y = y[:, : 3 * args.patch_size ** 2].transpose(0, 1).flatten(1)
    var = y.var(1)
    assert (var < 1.01).all() and var[0] > 0.9  # lambda_i / (lambda_i + eps): the leading direction near 1


# ---- the main job on the machine a user has, and nothing lost on faults ----


@pytest.mark.parametrize("cuda, preset, arch", [(True, "cifar10", "vit_tiny"), (False, "cifar10-cpu", "vit_nano")])
def test_default_preset_follows_the_device(monkeypatch, cuda, preset, arch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = train.parse_args([])
    assert args.arch == arch and args.notes[0].startswith(f"preset {preset}:")
    assert "--preset" in args.notes[0]  # it says how to override
    assert not [n for n in train.parse_args(["--preset", "cifar10"]).notes if n.startswith("preset")]


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_cpu_precision_is_bf16_where_the_cpu_has_bf16_matrix_instructions(monkeypatch, amx, avx512_bf16, expected):
    # AMX (Intel Xeon) or AVX-512 BF16 alone (AMD EPYC) run bf16 matmuls faster than fp32; AVX-512 alone does not
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert runtime.pick_precision(None, "cpu") == expected
    assert runtime.pick_precision("fp32", "cpu") == "fp32"  # a flag wins
    assert runtime.pick_precision(None, "mps") == "fp32"


def test_default_data_is_torchvision_cifar10_or_the_folder_the_environment_names(monkeypatch, tmp_path):
    monkeypatch.delenv(train.CIFAR10_DIR_ENV, raising=False)
    args = train.parse_args(["--preset", "cifar10-cpu"])
    assert (args.dataset, args.data_path, args.download, args.holdout_per_class) == ("cifar10", "data/", True, 0)
    assert any("torchvision's CIFAR10" in n and train.CIFAR10_DIR_ENV in n for n in args.notes)
    assert D.has_val_split(args.dataset, args.data_path, args.holdout_per_class)  # its test set scores kNN
    monkeypatch.setenv(train.CIFAR10_DIR_ENV, str(tmp_path))
    args = train.parse_args(["--preset", "cifar10-cpu"])
    assert (args.dataset, args.data_path, args.download, args.holdout_per_class) == (
        "imagefolder", str(tmp_path), False, 500)
    assert any(str(tmp_path) in n and "held out" in n for n in args.notes)
    # an explicit --data-path is never replaced, and alone it names a folder of the user's images
    explicit = train.parse_args(["--preset", "cifar10-cpu", "--data-path", "elsewhere"])
    assert (explicit.dataset, explicit.data_path, explicit.download) == ("imagefolder", "elsewhere", False)
    assert train.parse_args(["--dataset", "cifar10", "--data-path", "d/"]).dataset == "cifar10"
    monkeypatch.setenv(train.CIFAR10_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "cifar10-cpu"])


def test_offline_download_is_one_line(monkeypatch, tmp_path, capsys):
    import urllib.error

    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D.torchvision.datasets, "CIFAR10", offline)
    assert train.main(TINY + ["--dataset", "cifar10", "--data-path", str(tmp_path), "--download"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "could not download cifar10" in err and "--data-path" in err


def test_budget_bounds_the_whole_command_with_knn_at_both_ends(folder, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    summary = run(TINY + ["--data-path", str(folder), "--holdout-per-class", "4", "--batch-size", "4",
                          "--epochs", "1000", "--budget", "15s", "--knn-every", "1000", "--log-every", "5",
                          "--output-dir", str(out)])
    wall = time.perf_counter() - t0
    assert wall < 15 + 3, f"a 15 s budget took {wall:.1f} s"  # start-up, both kNN scores and the checkpoint
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "knn_top1" in rows[0] and "knn_top1" in rows[-1]
    assert rows[-1]["step"] == summary["steps"] == summary["total"] and rows[-1]["lr"] == pytest.approx(1e-6)
    steps = [r["step"] for r in rows[1:]]
    assert steps == sorted(steps) and len(steps) >= 2  # a row every 5 steps and at each epoch end
    for key in ("target_entropy", "batch_entropy", "feature_cosine", "prototypes_used"):
        assert all(math.isfinite(r[key]) for r in rows[1:])
    assert all(0 <= r["target_entropy"] <= r["ln_K"] + 1e-4 for r in rows[1:])
    assert (out / "checkpoint.pth").is_file() and (out / "curves.png").is_file()


def test_plot_draws_every_row(folder, tmp_path):
    import plot_run
    out = tmp_path / "run"
    run(TINY + ["--data-path", str(folder), "--holdout-per-class", "4", "--batch-size", "4", "--epochs", "3",
                "--knn-every", "1", "--output-dir", str(out)])
    rows = plot_run.read_log(out)
    fig = plot_run.figure(rows)
    loss_axis, knn_axis = fig.axes[0], fig.axes[1]
    assert len(loss_axis.lines[0].get_xdata()) == 3  # one point a row: 3 epochs
    assert len(knn_axis.lines[0].get_xdata()) == 4  # the random-init score, then one an epoch
    assert list(knn_axis.lines[0].get_ydata()) == [r["knn_top1"] for r in rows]
    by_minutes = fig.axes[2].lines[0].get_xdata()  # the same scores against wall time, in order
    assert len(by_minutes) == 4 and list(by_minutes) == sorted(by_minutes)
    path = plot_run.plot(out)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_run.main([str(tmp_path / "nothing-here")]) == 1


def test_nan_then_ctrl_c_keeps_the_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    argv = TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "3", "--output-dir", str(tmp_path)]
    real_step, calls = train.train_step, []

    def poison_then_interrupt(run_, *a, **kw):
        calls.append(1)
        if len(calls) == 6:  # in epoch 2: the weights go non-finite, then the user presses Ctrl-C
            with torch.no_grad():
                next(run_.model.student.parameters()).fill_(float("nan"))
            raise KeyboardInterrupt
        return real_step(run_, *a, **kw)

    monkeypatch.setattr(train, "train_step", poison_then_interrupt)
    assert train.main(argv) == 130  # 128 + SIGINT: stopped, not finished
    out = capsys.readouterr().out
    assert "nothing saved" in out and "run the same command again" not in out
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["student"].values())


def test_nan_before_any_checkpoint_says_so(folder, tmp_path, monkeypatch, capsys):
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step",
                        lambda *a, **kw: {k: v * float("nan") for k, v in real_step(*a, **kw).items()})
    assert train.main(TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "1",
                              "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no checkpoint had been written yet" in err and "\n" not in err
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.parametrize("size", [0, 20_000, 200_000])
def test_damaged_checkpoint_is_one_line(folder, tmp_path, capsys, size):
    argv = TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "1", "--output-dir", str(tmp_path)]
    assert train.main(argv) == 0
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(path.read_bytes()[:size])
    damaged = path.read_bytes()
    capsys.readouterr()
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "--no-resume" in err
    assert path.read_bytes() == damaged  # left for the user to inspect
    assert train.main(argv + ["--no-resume"]) == 0


@pytest.mark.parametrize("change", [["--limit-per-class", "8"], ["--holdout-per-class", "2"],
                                    ["--warmup-teacher-temp", "0.02"], ["--data-path", "OTHER"]])
def test_resume_with_other_data_or_schedules_is_refused(folder, tmp_path, capsys, change):
    other = make_folder(tmp_path / "other")
    change = [str(other) if c == "OTHER" else c for c in change]
    argv = TINY + ["--data-path", str(folder), "--batch-size", "8", "--epochs", "2", "--output-dir", str(tmp_path / "r")]
    assert train.main(argv + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert train.main(argv + ["--max-steps", "1"] + change) == 1
    err = capsys.readouterr().err.strip()
    flag = change[0].removeprefix("--").replace("-", "_")
    assert "\n" not in err and "cannot resume" in err and flag in err


def test_torchrun_budget_is_sized_alike_on_every_rank(folder, tmp_path):
    # each rank measures its own clock; the schedules and the stop must still agree, or DDP hangs
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py")] + TINY + ["--data-path", str(folder), "--batch-size", "4", "--epochs", "1000",
                                             "--budget", "20s", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks agree on the teacher weights and loss centres" in proc.stdout
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == pytest.approx(1e-6) and last["momentum"] == pytest.approx(1.0)


def test_compare_draws_one_line_per_run_one_colour_per_recipe(tmp_path):
    import plot_run
    rows = lambda knn: [dict(step=0, images_seen=0, knn_top1=knn[0], elapsed_s=12.0),  # noqa: E731
                        dict(step=100, images_seen=6400, loss=9.0, knn_top1=knn[1], elapsed_s=72.0)]
    runs = {"cold-s0": rows([27, 33]), "cold-s1": rows([26, 34]), "base-s0": rows([27, 31])}
    fig = plot_run.compare_figure(runs)
    by_images, by_minutes = fig.axes
    assert [list(line.get_ydata()) for line in by_images.lines] == [[27, 33], [26, 34], [27, 31]]
    assert list(by_minutes.lines[0].get_xdata()) == [0.2, 1.2]  # minutes
    colours = [line.get_color() for line in by_images.lines]
    assert colours[0] == colours[1] != colours[2]  # seeds of a recipe share a colour
    assert [t.get_text() for t in by_images.get_legend().get_texts()] == ["cold", "base"]
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("\n".join(json.dumps(x) for x in r))
    out = tmp_path / "knn.png"
    assert plot_run.main(["--compare", str(out), *(str(tmp_path / n) for n in runs)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_run.main(["--compare", str(out)]) == 2


def test_ab_step_times_two_trees_in_turn():
    """scripts/ab_step.py: the same tree twice gives two timings and their ratio, from the flags after --."""
    flags = TINY + ["--dataset", "synthetic", "--batch-size", "8"]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_step.py"), str(ROOT), str(ROOT), "--rounds", "2",
                          "--", *flags], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    a, b, summary = rows[-3:]
    assert a["tree"] == b["tree"] == str(ROOT)
    assert 0 < a["min_step_s"] <= a["step_s"] and 0 < b["min_step_s"] <= b["step_s"]
    assert summary["rounds"] == 2 and summary["b_over_a"] == pytest.approx(a["step_s"] / b["step_s"], rel=1e-2)
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_step.py"), str(ROOT), str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "no train.py" in bad.stderr
