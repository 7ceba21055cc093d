"""What a cluster job meets: preemption by SIGTERM, a folder two runs would share, collectives on the backend's
device, the published ImageNet recipe, starting from other weights, and the presets' flags."""

import ast
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_folder

import checkpoints as C
import data as D
import ibot_min as M
import runtime
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "cifar10", "--dataset", "imagefolder", "--arch", "vit_nano", "--global-size", "16",
        "--local-size", "8", "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--workers", "0",
        "--device", "cpu", "--holdout-per-class", "0", "--batch-size", "8"]


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def signal_at_step(monkeypatch, n: int, sig=signal.SIGTERM):
    """train_step that sends this process `sig` during its n-th call (as a cluster's scheduler would)."""
    real_step, calls = train.train_step, []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "train_step", step)
    return real_step


# ---- preemption ----


def test_sigterm_mid_epoch_saves_the_step_and_the_same_command_resumes_exactly(folder, tmp_path, monkeypatch, capsys):
    common = TINY + ["--data-path", str(folder), "--epochs", "3", "--seed", "5"]  # 3 epochs of 4 steps
    assert train.main(common + ["--output-dir", str(tmp_path / "straight")]) == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)

    real_step = signal_at_step(monkeypatch, 6)  # in the middle of the second epoch
    assert train.main(common + ["--output-dir", str(tmp_path / "cut")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM: saved" in capsys.readouterr().out
    saved = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert saved["step"] == 6 and saved["epoch"] == 1  # the step it was at, not the last epoch end
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(common + ["--output-dir", str(tmp_path / "cut")]) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert resumed["step"] == straight["step"] == 12
    for part in ("student", "teacher"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after the SIGTERM and resume"
    assert torch.equal(straight["ibot_loss"]["center2"], resumed["ibot_loss"]["center2"])


def test_ctrl_c_saves_and_a_second_one_stops_at_once():
    with train.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"  # the first only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_checkpoints_also_every_few_minutes(folder, tmp_path, monkeypatch):
    saved = []
    real_save = train.save_atomic
    monkeypatch.setattr(train, "save_atomic", lambda obj, path: (saved.append(obj["step"]), real_save(obj, path)))
    argv = TINY + ["--data-path", str(folder), "--epochs", "5", "--ckpt-every", "100", "--output-dir", str(tmp_path)]
    assert train.main(argv + ["--ckpt-every-minutes", "0"]) == 0
    assert saved == [20]  # only at the end: no epoch save is due in 100 epochs
    saved.clear()
    assert train.main(argv + ["--no-resume", "--ckpt-every-minutes", "1e-6"]) == 0
    assert saved == [10, 20]  # mid-epoch 3, at the first step every rank checks, and at the end


# ---- the output folder ----


def test_a_second_live_run_into_one_folder_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "run.lock", "w") as held:  # another live run holds the lock
        held.write("pid 4242 on node7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(TINY + ["--data-path", str(folder), "--epochs", "1", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another run (pid 4242 on node7) is writing to") and "\n" not in err
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.pth").exists()
    # the same file left behind by a killed run holds no lock: it does not block
    assert train.main(TINY + ["--data-path", str(folder), "--epochs", "1", "--output-dir", str(out)]) == 0
    assert f"pid {os.getpid()}" in (out / "run.lock").read_text()


def test_an_output_dir_that_cannot_be_written_is_named_before_any_image_is_read(folder, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read = []
    monkeypatch.setattr(D, "build_dataset", lambda *a, **kw: read.append(1))
    assert train.main(TINY + ["--data-path", str(folder), "--output-dir", str(blocker / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output-dir") and "cannot be written" in err and "\n" not in err
    assert not read


# ---- collectives ----

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "gather", "scatter", "all_gather_object", "broadcast_object_list"}


def test_every_collective_goes_through_runtime():
    """A collective called elsewhere could hand NCCL a CPU tensor (which it refuses); runtime's put every tensor on
    the backend's device."""
    offenders = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                offenders.append(f"{path.name}:{node.lineno} dist.{node.func.attr}")
    assert not offenders


def test_backend_device_is_the_gpu_under_nccl_and_the_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(runtime.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runtime.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(runtime.dist, "get_backend", lambda: "gloo")
    assert runtime.backend_device() == torch.device("cpu")


def test_collectives_move_tensors_to_the_backend_and_back(monkeypatch):
    """A stand-in backend that, like NCCL, refuses tensors not on its device: runtime's collectives hand it only
    tensors there, and return the result on the caller's device."""
    seen = []

    def strict_all_reduce(t, op=None):
        if t.dtype != torch.float64:  # the stand-in's own "device": float64 copies, as .to(device) makes them
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append(t.dtype)
        t.mul_(2)  # two ranks holding the same value

    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    monkeypatch.setattr(runtime, "backend_device", lambda: torch.float64)  # Tensor.to takes a dtype the same way
    monkeypatch.setattr(runtime.dist, "all_reduce", strict_all_reduce)
    x = torch.tensor([1.0, 2.0])
    assert runtime.all_reduce(x) is x and x.tolist() == [2.0, 4.0] and x.dtype == torch.float32
    assert seen == [torch.float64]
    with pytest.raises(RuntimeError, match="No backend type"):
        runtime.dist.all_reduce(torch.tensor([1.0]))  # what a direct call would meet


def _strict_backend_worker(rank: int, world: int, port: int, argv: list, codes):
    """One rank of a 2-process gloo run behind a stand-in backend that, as NCCL does with CPU tensors, refuses every
    tensor not on its "device": here float64, the dtype runtime.backend_device() is made to return (Tensor.to takes
    a dtype as it takes a device), so a collective that skips runtime's move fails the run."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    real = {name: getattr(torch.distributed, name) for name in ("all_reduce", "all_gather")}

    def strict(name):
        def collective(*tensors, **kw):
            for t in (x for arg in tensors for x in (arg if isinstance(arg, list) else [arg])):
                if torch.is_tensor(t) and t.dtype != torch.float64:
                    raise RuntimeError(f"No backend type associated with {t.dtype} ({name})")
            return real[name](*tensors, **kw)
        return collective

    for name in real:
        setattr(torch.distributed, name, strict(name))
    runtime.backend_device = lambda: torch.float64
    codes[rank] = train.main(argv)


@pytest.mark.slow
def test_two_ranks_behind_a_backend_that_refuses_other_devices(folder, tmp_path):
    """Budget pacing, the NaN and stop checks, both centres, Sinkhorn, the kNN monitor and the rank check, all
    under a stand-in backend that refuses tensors not on its device."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = TINY + ["--data-path", str(folder), "--batch-size", "4", "--epochs", "100", "--budget", "20s",
                   "--centering", "sinkhorn", "--holdout-per-class", "4", "--knn-every", "1000",
                   "--output-dir", str(tmp_path / "run")]
    codes = mp.Manager().dict()
    mp.spawn(_strict_backend_worker, args=(2, port, argv, codes), nprocs=2, join=True)
    assert dict(codes) == {0: 0, 1: 0}
    rows = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "knn_top1" in rows[0] and "knn_top1" in rows[-1] and rows[-1]["step"] >= 3


# ---- the published recipe ----

# bytedance/ibot README, "iBOT Pre-Training with ViTs", the ViT-S/16 command (75.2 kNN, 77.9 linear):
PUBLISHED_VIT_S16 = dict(arch="vit_small", patch_size=16, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                         norm_last_layer=False, epochs=800, batch_size=64, shared_head=True, out_dim=8192,
                         local_crops=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), mask_ratios=(0.0, 0.3),
                         mask_ratio_vars=(0.0, 0.2))
# main_ibot.py's argparse defaults, where the command says nothing
MAIN_IBOT_DEFAULTS = dict(lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                          momentum_teacher=0.996, warmup_teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=1,
                          drop_path=0.1, global_size=224, local_size=96, global_crops=2, lambda1=1.0, lambda2=1.0,
                          student_temp=0.1, center_momentum=0.9, head_hidden_dim=2048, head_bottleneck_dim=256,
                          blur=True, mask_shape="block", pred_start_epoch=0, patch_out_dim=None, koleo=0.0,
                          centering="center")


def test_imagenet_preset_is_the_published_command_over_main_ibot_defaults():
    args = train.parse_args(["--preset", "imagenet-vit-s16", "--data-path", "/data/imagenet"])
    wrong = {k: (getattr(args, k), v) for k, v in {**MAIN_IBOT_DEFAULTS, **PUBLISHED_VIT_S16}.items()
             if (tuple(getattr(args, k)) if isinstance(v, tuple) else getattr(args, k)) != v}
    assert not wrong
    assert M.IBOTConfig(**{k: getattr(args, k) for k in ("arch", "out_dim", "patch_out_dim")}).patch_out_dim == 8192


def test_presets_hold_only_what_differs_from_the_defaults():
    defaults = {f.name: f.default for cls in train.CONFIGS for f in train.dataclasses.fields(cls)}
    for name, preset in train.PRESETS.items():
        parent = train.PRESETS["cifar10"] if name in ("cifar10-cpu", "cifar100") else {}
        restated = {k for k, v in preset.items() if v == defaults[k] and parent.get(k, v) == v}  # not an override
        assert not restated, (name, restated)


def test_help_shows_the_value_the_run_will_use(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "cifar10-cpu", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR 0.001 (preset cifar10-cpu)" in text and "--min-lr MIN_LR 1e-06 (TrainConfig)" in text
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "imagenet-vit-s16", "--help"])
    assert "--lr LR 0.0005 (TrainConfig)" in " ".join(capsys.readouterr().out.split())


# ---- diagnostics and starting weights ----


def test_diagnostics_run_the_head_on_cls_only():
    model = M.IBOT(M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=16, out_dim=32, head_hidden_dim=32,
                                local_crops=2))

    def no_patch_logits(*a):
        raise AssertionError("the diagnostics built the teacher's (gB, N, K) patch logits")

    model.teacher.head.patch_logits = no_patch_logits
    d = train.diagnostics(model, torch.randn(6, 3, 16, 16), 0.04)
    assert 0 <= d["target_entropy"] <= d["ln_K"] + 1e-6 and 0 < d["prototypes_used"] <= 1


def test_load_from_our_checkpoint_at_another_resolution(folder, tmp_path):
    first = tmp_path / "first"
    assert train.main(TINY + ["--data-path", str(folder), "--epochs", "1", "--output-dir", str(first)]) == 0
    source = torch.load(first / "checkpoint.pth", weights_only=True)
    args = train.parse_args(TINY + ["--data-path", str(make_folder(tmp_path / "big", size=32)), "--global-size", "32",
                                    "--load-from", str(first / "checkpoint.pth"), "--output-dir", str(tmp_path / "b")])
    run = train.setup(args)
    for side, net in (("student", run.model.student), ("teacher", run.model.teacher)):
        for k, v in net.backbone.state_dict().items():
            if k == "pos_embed":
                assert v.shape == (1, 1 + 8 * 8, 128) and source[side]["backbone.pos_embed"].shape == (1, 1 + 16, 128)
            else:
                assert torch.equal(v, source[side][f"backbone.{k}"]), (side, k)
        for k, v in net.head.state_dict().items():  # the heads fit: loaded too
            assert torch.equal(v, source[side][f"head.{k}"]), (side, k)
    # a file that is no checkpoint: one line naming it
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        train.load_weights(run.model, str(bad))


# ---- a 2-process torchrun of the ImageNet preset, through SIGTERM and resume ----


@pytest.mark.slow
def test_torchrun_imagenet_preset_survives_sigterm_and_resumes(tmp_path):
    images = tmp_path / "imagenet" / "train"
    make_folder(images, classes=2, per_class=8, size=224)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--preset", "imagenet-vit-s16", "--arch", "vit_nano", "--data-path", str(images),
           "--batch-size", "2", "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--epochs", "8",
           "--workers", "0", "--device", "cpu", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # SIGTERM to torchrun once training is under way, as a scheduler sends it
        lines.append(line)
        if " step 10/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert "stopped by SIGTERM: saved" in text, text[-3000:]
    step = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    assert step in (10, 20, 30)  # both ranks stopped at one shared check, before the end
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at step {step}" in done.stdout
    assert "2 ranks agree on the teacher weights and loss centres" in done.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 32  # 16 images / (2 x 2) x 8 epochs
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 32 and all(np.isfinite(r["loss"]) for r in rows)


def test_a_budget_too_short_for_the_final_knn_score_skips_it_and_ends_on_time(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "knn_monitor", lambda *a: (time.sleep(3), 50.0)[1])  # a slow CPU's kNN: 3 s a score
    out = tmp_path / "run"
    summary = train.train(train.parse_args(TINY + ["--data-path", str(folder), "--holdout-per-class", "4",
                                                   "--epochs", "1000", "--budget", "8s", "--knn-every", "1000",
                                                   "--output-dir", str(out)]))
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert "knn_top1" in rows[0] and "knn_top1" not in rows[-1]  # the first score, and no second one past the budget
    assert "too few for the final kNN score" in capsys.readouterr().out
    assert summary["train_s"] < 8 + 2.5 and rows[-1]["step"] == summary["total"]
