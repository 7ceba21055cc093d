"""bench.py: the step's JSON line, its profile and matmul floor, its flags beside train.py's, and the loader's rate."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data as D

# a CPU-sized run on synthetic images: vit_nano, 16 px crops, a narrow head
TINY = ["--preset", "cifar10", "--dataset", "synthetic", "--arch", "vit_nano", "--global-size", "16", "--local-size", "8",
        "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--workers", "0", "--device", "cpu",
        "--batch-size", "4"]
# the ImageNet preset's views (2 global + 10 local crops, blur, masks) at a tenth of their size
SMALL_IMAGENET = ["--preset", "imagenet-vit-s16", "--global-size", "32", "--local-size", "16", "--batch-size", "2"]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_prints_json_line_with_the_run_flags_and_its_own_step_count(capsys):
    assert bench.main(TINY + ["--steps", "2"]) == 0
    result = last_json(capsys)
    assert result["img_per_s"] > 0 and result["steps"] == 2 and result["device"] == "cpu"
    assert (result["arch"], result["batch_size"]) == ("vit_nano", 4)  # train.py's flags set up the run
    assert result["precision"] in ("fp32", "bf16")
    # the CPU's roofline beside the step's rate: a real measurement, and a tiny step reaches only part of it
    assert result["matmul_tflop_per_s"] > 1e-3 and result["tflop_per_s"] > 0
    assert 0 < result["of_matmul"] < 1


def test_bench_profile_prints_the_step_operators_and_the_benchmark(capsys):
    assert bench.main(TINY + ["--steps", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "aten::addmm" in out and "Self CPU" in out  # the profiled step's operator table
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 1  # the profiled step is not among the timed ones


def test_bench_matmul_floor_sees_every_matrix_product(capsys):
    args = bench.train.parse_args(TINY + ["--precision", "bf16"])
    step = bench.benchmark(args, 1)
    floor = bench.matmul_floor(args, step["step_s"])
    # bf16 on a CPU: attention is two matmuls too, so the recorded products hold all the step's FLOPs but the
    # patch embedding's convolution (a few percent at this size)
    assert 0.9 < floor["matmul_gflop_per_img"] / step["gflop_per_img"] <= 1.0
    assert floor["matmul_calls"] >= floor["matmul_shapes"] > 10 and floor["matmul_floor_s"] > 0
    assert floor["step_over_floor"] == pytest.approx(step["step_s"] / floor["matmul_floor_s"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),  # a train.py flag, checked by train.py
])
def test_bad_flags_give_one_line(capsys, argv, message):
    assert bench.main(TINY + argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_unknown_flag_is_refused_by_train_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(TINY + ["--benchmark", "3"])
    assert stop.value.code == 2 and "--benchmark" in capsys.readouterr().err


def test_help_lists_bench_flags_then_train_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out.index("--loader") < out.index("--global-size")  # bench.py's own first, then every train.py flag


def test_synthesised_images_are_imagenet_sized_photographs_not_flat_or_noise(tmp_path):
    bench.synthesise_jpegs(tmp_path, 2)
    files = sorted((tmp_path / "synthetic").glob("*.jpg"))
    assert len(files) == 2
    pixels = np.asarray(Image.open(files[0]))
    assert Image.open(files[0]).size == bench.SYNTHETIC_SIZE and pixels.shape == (375, 500, 3)
    assert pixels.std() > 20  # not flat
    # smooth: neighbouring pixels differ far less than the image varies (pure noise would differ as much)
    assert np.abs(np.diff(pixels.astype(float), axis=1)).mean() < 0.5 * pixels.std()
    assert not np.array_equal(pixels, np.asarray(Image.open(files[1])))


def test_loader_times_the_preset_views_on_one_core_then_restores_threads(capsys, monkeypatch):
    threads, seen, real_collate = torch.get_num_threads(), [], D.collate_crops

    def collate(batch):
        seen.append((torch.get_num_threads(), len(batch), batch[0][0][0].shape[-1], len(batch[0][0])))
        return real_collate(batch)

    monkeypatch.setattr(D, "collate_crops", collate)
    assert bench.main(SMALL_IMAGENET + ["--loader", "--steps", "2"]) == 0
    result = last_json(capsys)
    assert seen == [(1, 2, 32, 12)] * 3  # one warm-up and two timed batches, each of 2 images x 12 views
    assert torch.get_num_threads() == threads
    assert result["views"] == "2x32 + 10x16" and result["blur"] and result["batches"] == 2
    assert result["images"] == "synthesised 500x375 JPEG" and 20 < result["mean_file_kib"] < 300
    assert result["loader_img_per_s_per_core"] == pytest.approx(2 / result["batch_cpu_s"])
    assert result["wall_img_per_s"] == pytest.approx(2 / result["batch_s"])


def test_loader_reads_the_folder_it_is_given(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    assert bench.main(SMALL_IMAGENET + ["--loader", "--steps", "1", "--data-path", str(tmp_path)]) == 0
    result = last_json(capsys)
    assert result["images"] == f"imagefolder {tmp_path}" and result["loader_img_per_s_per_core"] > 0
