"""Several processes compute what one does: two gloo processes with half the batch each against one process with
the whole batch (train.py's step, weights and both centres), the sampler's shards, and eval_linear.py's kNN."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import eval_linear
import ibot_min as M
import train

# fp32 and settings where the two must agree: no drop path (its draws differ per rank), no KoLeo (its nearest
# neighbours are taken within each process's batch), the views given to the step rather than drawn per rank
TINY = ["--preset", "cifar10", "--knn-every", "0", "--arch", "vit_nano", "--global-size", "16", "--local-size", "8",
        "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--head-bottleneck-dim", "32",
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--dataset", "synthetic", "--no-device-augment",
        "--drop-path", "0", "--koleo", "0", "--clip-grad", "0.3"]
B = 8  # the global batch; each of two processes takes 4 of its images
STEPS = [dict(lr=1e-3, wd=0.04, momentum=0.9, teacher_temp=0.04, teacher_patch_temp=0.05),
         dict(lr=2e-3, wd=0.05, momentum=0.95, teacher_temp=0.05, teacher_patch_temp=0.06)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_processes(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives each process, so runtime.setup_distributed starts gloo as under torchrun."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def batches() -> list[tuple]:
    """Two global batches of B images: global (2B, 3, 16, 16), local (2B, 3, 8, 8), masks (2B, 16); crop-major."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in STEPS:
        masks = torch.rand(2 * B, 16, generator=gen) < 0.35
        masks[:, 0] = True
        out.append((torch.randn(2 * B, 3, 16, 16, generator=gen), torch.randn(2 * B, 3, 8, 8, generator=gen), masks))
    return out


def shard(batch: tuple, rank: int, world: int) -> tuple:
    """This rank's images of a crop-major batch: the same images in every crop."""
    per = B // world
    return tuple(t.unflatten(0, (-1, B))[:, rank * per:(rank + 1) * per].flatten(0, 1) for t in batch)


def train_steps(rank: int, world: int) -> dict:
    run = train.setup(train.parse_args(TINY + ["--batch-size", str(B // world)]))
    for batch, s in zip(batches(), STEPS):
        train.train_step(run, shard(batch, rank, world), s, freeze_last_layer=False)
    model = run.model
    return dict(student={k: v.clone() for k, v in model.student.state_dict().items()},
                teacher={k: v.clone() for k, v in model.teacher.state_dict().items()},
                center=model.loss.center.clone(), patch_center=model.loss.patch_center.clone())


def train_worker(rank: int, world: int, port: int, out: str) -> None:
    join_processes(rank, world, port)
    torch.save(train_steps(rank, world), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_with_half_the_batch_equal_one_with_all_of_it(tmp_path):
    mp.spawn(train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one = train_steps(0, 1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    init = train.setup(train.parse_args(TINY + ["--batch-size", str(B)])).model.student.state_dict()
    for part in ("student", "teacher"):
        for k, v in one[part].items():
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), f"ranks differ on {part} {k}"
            # 5e-5 is 2% of two steps' movement: Adam scales a gradient of rounding noise (the key bias has none
            # in exact arithmetic, softmax ignores it) up to a step, so a few entries differ by 1e-5 (measured)
            torch.testing.assert_close(ranks[0][part][k], v, rtol=1e-4, atol=5e-5, msg=f"{part} {k}")
            assert not torch.equal(v, init[k]), f"{part} {k} never moved"  # the comparison is not of two inits
    for k in ("center", "patch_center"):
        assert torch.equal(ranks[0][k], ranks[1][k])
        torch.testing.assert_close(ranks[0][k], one[k], rtol=1e-5, atol=1e-7, msg=k)
        assert float(one[k].abs().max()) > 0


# ---- the sampler ----


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), batch_size=st.integers(1, 16), world=st.integers(1, 5), seed=st.integers(0, 99),
       epoch=st.integers(0, 5))
def test_sampler_shards_are_disjoint_whole_batches_that_cover_the_data(n, batch_size, world, seed, epoch):
    shards = []
    for rank in range(world):
        sampler = train.EpochSampler(n, batch_size, rank, world, seed)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1 and sizes.pop() % batch_size == 0  # whole batches, alike on every rank
    seen = [i for s in shards for i in s]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))  # disjoint, and only the data's images
    assert len(seen) == n // (batch_size * world) * batch_size * world  # all but less than one global batch


def at_epoch(sampler: train.EpochSampler, epoch: int, start_batch: int = 0) -> list[int]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_starts_at_any_batch_and_covers_every_image_over_epochs():
    n, batch_size, world = 45, 4, 2  # 40 images an epoch: 5 left out, other ones each time
    samplers = [train.EpochSampler(n, batch_size, rank, world, seed=3) for rank in range(world)]
    covered = set()
    for epoch in range(6):
        full = [at_epoch(s, epoch) for s in samplers]
        for s, mine in zip(samplers, full):  # a resumed epoch: the batches it had left, and nothing else
            assert at_epoch(s, epoch, start_batch=2) == mine[2 * batch_size:] and len(s) == len(mine) - 8
        covered |= set(full[0]) | set(full[1])
    assert at_epoch(samplers[0], 0) != at_epoch(samplers[0], 1)  # a new shuffle each epoch
    assert covered == set(range(n))


# ---- eval_linear.py's kNN ----


def image_folder(root: Path, classes=3, per_class=12) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 40, (16, 16, 3)), 0, 255).astype(np.uint8)  # classes differ
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}.png")
    return root


def eval_argv(tmp_path: Path, output: str) -> list[str]:
    # 3 classes x 12 images, the last 5 of each held out: 21 training and 15 val images, odd both
    return ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--dataset", "imagefolder", "--data-path",
            str(tmp_path / "images"), "--holdout-per-class", "5", "--knn", "--ks", "1", "3", "5", "10", "20",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--output", str(tmp_path / output)]


def knn_inputs(record: Path):
    """ibot_min.knn_classify, saving what it was given (the gathered features and labels) to `record`."""
    real = M.knn_classify

    def recording(train_features, train_labels, test_features, test_labels, *a, **kw):
        torch.save(dict(bank=train_features, bank_y=train_labels, test=test_features, test_y=test_labels), record)
        return real(train_features, train_labels, test_features, test_labels, *a, **kw)
    return recording


def eval_worker(rank: int, world: int, port: int, tmp: str) -> None:
    join_processes(rank, world, port)
    M.knn_classify = knn_inputs(Path(tmp) / f"knn{rank}.pt")
    assert eval_linear.main(eval_argv(Path(tmp), "two.json")) == 0


def rows(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, D) features and (n,) labels as rows in a fixed order, to compare two orders of the same images."""
    table = torch.cat([labels[:, None].to(features.dtype), features], 1)
    return table[torch.from_numpy(np.lexsort(table.T.flip(0).numpy()))]


def test_knn_on_two_ranks_with_odd_splits_equals_one_rank(tmp_path, monkeypatch):
    image_folder(tmp_path / "images")
    torch.manual_seed(0)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=16, out_dim=64, head_hidden_dim=64,
                       head_bottleneck_dim=32)
    torch.save(M.IBOT(cfg).checkpoint(), tmp_path / "checkpoint.pth")
    monkeypatch.setattr(M, "knn_classify", knn_inputs(tmp_path / "knn_one.pt"))
    assert eval_linear.main(eval_argv(tmp_path, "one.json")) == 0
    mp.spawn(eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["config"]["val_images"] == 15 and one["config"]["train_images"] == 21
    assert two["hardware"]["world_size"] == 2 and one["hardware"]["world_size"] == 1
    assert two["knn"] == one["knn"] and len(one["knn"]) == 5
    seen = torch.load(tmp_path / "knn_one.pt", weights_only=True)
    assert len(seen["bank"]) == 21 and len(seen["test"]) == 15
    for r in range(2):  # every rank scores all the images: the same rows as one process, in another order
        got = torch.load(tmp_path / f"knn{r}.pt", weights_only=True)
        for f, y in (("bank", "bank_y"), ("test", "test_y")):
            torch.testing.assert_close(rows(got[f], got[y]), rows(seen[f], seen[y]), rtol=1e-5, atol=1e-6)
