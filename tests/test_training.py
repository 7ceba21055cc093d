"""The training itself, pinned down: one step of train.train_step against AdamW and the EMA written out by hand,
the schedules against their definitions, short real runs (weights move, budgets are used, a non-finite run stops
and keeps the good checkpoint), the backbone's position grid and the official checkpoint layout, and the step's
loss terms and gradients under bf16 against fp32."""

import argparse
import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import batched_views as BV
import checkpoints as C
import data as D
import ibot_min as M
import train

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# vit_nano on 16 px global and 8 px local crops (patch 4: a 4 x 4 grid), a narrow head; fp32, one process
TINY = ["--preset", "cifar10", "--knn-every", "0", "--arch", "vit_nano", "--global-size", "16", "--local-size", "8",
        "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "64", "--head-bottleneck-dim", "32",
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--dataset", "synthetic", "--no-device-augment"]
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which train.setup keeps


B = 4  # images a step in the one-step tests


def tiny_run(*flags: str) -> train.Run:
    return train.setup(train.parse_args(TINY + ["--batch-size", str(B), "--drop-path", "0", *flags]))


def random_batch(run: train.Run, seed: int):
    """(global (2B, 3, 16, 16), local (2B, 3, 8, 8), masks (2B, 16)) with about a third of the patches masked."""
    gen = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * B, 3, 16, 16, generator=gen)
    local_crops = torch.randn(2 * B, 3, 8, 8, generator=gen)
    masks = torch.rand(2 * B, 16, generator=gen) < 0.35
    masks[:, 0] = True  # every image has a masked patch
    return global_crops, local_crops, masks


def image_folder(root: Path, per_class: int) -> Path:
    """Two class folders of random 16 px PNGs."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def schedule_values(**kw) -> dict:
    return dict(lr=1e-2, wd=0.3, momentum=0.7, teacher_temp=0.05, teacher_patch_temp=0.06) | kw


def decayed(name: str, p: torch.Tensor) -> bool:
    """The official rule: weight decay on matrices and the 3-D tokens, not on biases and 1-D (norm) parameters."""
    return not name.endswith(".bias") and p.ndim > 1


class HandAdamW:
    """AdamW written out: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2,
    theta <- theta (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), per parameter, in float64."""

    def __init__(self):
        self.m, self.v, self.t = {}, {}, {}

    def step(self, name: str, theta: torch.Tensor, grad: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
        theta, grad = theta.double(), grad.double()
        t = self.t[name] = self.t.get(name, 0) + 1
        m = self.m[name] = BETAS[0] * self.m.get(name, torch.zeros_like(grad)) + (1 - BETAS[0]) * grad
        v = self.v[name] = BETAS[1] * self.v.get(name, torch.zeros_like(grad)) + (1 - BETAS[1]) * grad ** 2
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        return theta * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + EPS)


def clipped(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    return grad * min(1.0, max_norm / (float(grad.norm()) + 1e-6))  # each parameter's gradient on its own


def reference_gradients(model: M.IBOT, batch, s: dict) -> tuple[dict, dict]:
    """The loss terms and the student's gradients of one forward / backward of a copy of the model."""
    out = model(*batch, s["teacher_temp"], s["teacher_patch_temp"])
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    model.student.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in out.items()}, grads


# ---- one step, written out by hand ----


def test_two_steps_are_adamw_with_the_schedules_values_and_the_teacher_is_their_ema():
    limit = 0.05  # most gradients exceed it, so clipping shows in the second step
    run = tiny_run("--clip-grad", str(limit))
    model = run.model
    with torch.no_grad():  # a teacher apart from the student, so the EMA's two terms can be told apart
        for p in model.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    ref, adam = copy.deepcopy(model), HandAdamW()
    names = dict(model.student.named_parameters())
    n_clipped = 0
    for i, s in enumerate([schedule_values(), schedule_values(lr=3e-3, wd=0.1, momentum=0.9)]):
        batch = random_batch(run, seed=i)
        teacher_before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
        ref_out, grads = reference_gradients(ref, batch, s)
        out = train.train_step(run, batch, s, freeze_last_layer=False)
        for k in ("cls", "patch", "loss"):  # the step runs the loss at this step's tau_t and tau_t'
            torch.testing.assert_close(out[k], ref_out[k], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for n, p in names.items():
                g = clipped(grads[n], limit)
                n_clipped += float(grads[n].norm()) > limit
                expected = adam.step(n, ref.student.get_parameter(n), g, s["lr"], s["wd"] if decayed(n, p) else 0.0)
                torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-7, msg=f"student {n}, step {i}")
                ref.student.get_parameter(n).copy_(p)  # the next step starts from the same weights
            for n, p in model.teacher.named_parameters():  # theta_t <- m theta_t + (1 - m) theta_s
                a, b = s["momentum"] * teacher_before[n].double(), (1 - s["momentum"]) * names[n].double()
                rounding = 2 * torch.finfo(torch.float32).eps * (a.abs() + b.abs())  # of fp32's two operations
                assert bool(((p.double() - (a + b)).abs() <= rounding).all()), f"teacher {n}, step {i}"
                ref.teacher.get_parameter(n).copy_(p)
        torch.testing.assert_close(model.loss.center, ref.loss.center, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(model.loss.patch_center, ref.loss.patch_center, rtol=1e-6, atol=1e-8)
    assert n_clipped > len(names)  # the limit was reached: the test saw clipping at work
    assert "backbone.masked_embed" in names and "backbone.masked_embed" not in dict(model.teacher.named_parameters())


def test_clipping_caps_each_parameters_gradient_norm():
    # AdamW's first moment after one step is (1 - b1) g: the gradient the optimiser was given, after clipping
    s = schedule_values()
    first = tiny_run()
    batch = random_batch(first, seed=3)
    _, grads = reference_gradients(copy.deepcopy(first.model), batch, s)
    limit = float(torch.stack([g.norm() for g in grads.values()]).median())  # half the parameters above it
    run = tiny_run("--clip-grad", str(limit))  # the same initial weights
    train.train_step(run, batch, s, freeze_last_layer=False)
    above = 0
    for n, p in run.model.student.named_parameters():
        given = run.optimizer.state[p]["exp_avg"] / (1 - BETAS[0])
        if float(grads[n].norm()) > limit:
            above += 1
            assert float(given.norm()) == pytest.approx(limit, rel=1e-4), n  # scaled down to the limit ...
            assert F.cosine_similarity(given.flatten(), grads[n].flatten(), dim=0) > 0.9999  # ... direction kept
        else:
            torch.testing.assert_close(given, grads[n], rtol=1e-4, atol=1e-9)  # under the limit: untouched
    assert 0 < above < len(grads)  # both cases occurred


def test_frozen_prototypes_are_neither_updated_nor_decayed():
    run = tiny_run()
    s = schedule_values(wd=0.5)
    before = {n: p.detach().clone() for n, p in run.model.student.named_parameters()}
    frozen = {n: v for n, v in before.items() if "last_layer" in n}
    assert set(frozen) == {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    train.train_step(run, random_batch(run, 0), s, freeze_last_layer=True)
    for n, p in run.model.student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved while frozen"
        else:
            assert not torch.equal(p, before[n]), f"{n} did not move"
    train.train_step(run, random_batch(run, 1), s, freeze_last_layer=False)  # and after the freeze they learn
    assert all(not torch.equal(run.model.student.get_parameter(n), v) for n, v in frozen.items())


def test_weight_decay_reaches_weights_and_not_biases_or_norms():
    model = M.IBOT(M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=16, out_dim=64, head_hidden_dim=64,
                                head_bottleneck_dim=32))
    groups = M.param_groups(model.student)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]  # group 0 takes the schedule's
    for n, p in model.student.named_parameters():
        assert (id(p) in ids[0]) == decayed(n, p) and (id(p) in ids[1]) != decayed(n, p), n
    named = dict(model.student.named_parameters())
    for n in ("backbone.blocks.0.attn.qkv.weight", "backbone.cls_token", "backbone.pos_embed",
              "backbone.masked_embed", "head.last_layer.weight_v", "head.last_layer.weight_g"):
        assert id(named[n]) in ids[0], n  # as the official code: every parameter of more than one dimension
    for n in ("backbone.blocks.0.norm1.weight", "backbone.norm.bias", "head.mlp.0.bias"):
        assert id(named[n]) in ids[1], n


def test_a_short_run_moves_the_student_and_the_teacher_away_from_init(tmp_path):
    argv = TINY + ["--batch-size", "8", "--max-steps", "6", "--lr", "0.32", "--warmup-epochs", "0",
                   "--momentum-teacher", "0.9", "--output-dir", str(tmp_path / "run")]
    init = train.setup(train.parse_args(argv)).model  # the weights a run starts from
    assert train.main(argv) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 6
    student0, teacher0 = init.student.state_dict(), init.teacher.state_dict()
    for n, v in ckpt["teacher"].items():
        moved_s = float((ckpt["student"][n] - student0[n]).abs().max())
        moved_t = float((v - teacher0[n]).abs().max())
        assert moved_s > 1e-3, f"student {n} did not train"  # Adam moves every weight by about lr a step
        assert 0 < moved_t < moved_s, f"teacher {n}: not an EMA lagging behind the student"
    assert float((ckpt["ibot_loss"]["center"]).abs().max()) > 0  # the centres follow the teacher


# ---- schedules ----


def schedules(*flags: str, steps_per_epoch=10, global_batch=64):
    args = train.parse_args(["--preset", "cifar10", *flags])
    return args, train.Schedules(args, args.epochs * steps_per_epoch, steps_per_epoch, global_batch)


def cosine(base: float, final: float, i: int, n: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / (n - 1)))


@pytest.mark.parametrize("global_batch", [64, 512])
def test_peak_lr_is_lr_times_global_batch_over_256_at_the_end_of_warmup(global_batch):
    args, sch = schedules("--epochs", "20", "--warmup-epochs", "4", global_batch=global_batch)
    peak, warm, total = args.lr * global_batch / 256, 40, 200
    lrs = [sch.at(i)["lr"] for i in range(total)]
    assert lrs[warm] == pytest.approx(peak, rel=1e-12) and max(lrs) == pytest.approx(peak, rel=1e-12)
    assert lrs[0] == 0.0 and all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))  # linear from 0 ...
    assert lrs[warm - 1] == pytest.approx(peak, rel=1e-12)  # ... to the peak at the warm-up's last step
    assert lrs[warm // 2] == pytest.approx(peak * (warm // 2) / (warm - 1))
    for i in (warm, 120, total - 1):  # then a cosine to min_lr
        assert lrs[i] == pytest.approx(cosine(peak, args.min_lr, i - warm, total - warm), rel=1e-9)
    assert lrs[-1] == args.min_lr


def test_wsd_warms_up_holds_the_peak_and_decays_linearly_over_the_last_fifth():
    args, sch = schedules("--epochs", "20", "--warmup-epochs", "4", "--lr-schedule", "wsd")
    peak, warm, total, decay = args.lr * 64 / 256, 40, 200, 40
    lrs = [sch.at(i)["lr"] for i in range(total)]
    assert lrs[0] == 0.0 and lrs[warm - 1] == pytest.approx(peak, rel=1e-12)
    assert lrs[warm // 2] == pytest.approx(peak * (warm // 2) / (warm - 1))
    assert lrs[warm - 1:total - decay] == pytest.approx([peak] * (total - decay - warm + 1), rel=1e-12)
    for k in (1, 17, decay):  # k steps into the decay: a straight line from the peak to min_lr
        assert lrs[total - decay - 1 + k] == pytest.approx(peak + (args.min_lr - peak) * k / decay, rel=1e-9)
    assert lrs[-1] == args.min_lr
    # the other schedules do not depend on the lr's shape
    _, cos = schedules("--epochs", "20", "--warmup-epochs", "4")
    for i in (0, 99, total - 1):
        assert {k: v for k, v in sch.at(i).items() if k != "lr"} == {k: v for k, v in cos.at(i).items() if k != "lr"}


@pytest.mark.parametrize("total, warmup", [(1, 0), (2, 5), (5, 4), (7, 0), (1000, 37)])
def test_wsd_has_one_value_per_step_and_ends_at_final(total, warmup):
    lrs = M.wsd_schedule(2.0, 0.1, total, warmup)
    assert lrs.shape == (total,) and float(lrs[-1]) == 0.1 and float(lrs.max()) <= 2.0
    assert float(lrs.min()) >= 0.0


def newton_schulz(g: torch.Tensor, steps: int = 5, abc=(3.4445, -4.775, 2.0315)) -> torch.Tensor:
    """Muon's orthogonalisation in float64: X <- a X + (b A + c A^2) X with A = X X^T, from X = G / ||G||_F
    (wide side first), five times: the singular values of G are pushed towards 1 (Jordan et al. 2024)."""
    a, b, c = abc
    x = g.double().T if g.shape[0] > g.shape[1] else g.double()
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_step_orthogonalises_the_matrices_and_leaves_the_rest_to_adamw():
    run = tiny_run("--optimizer", "muon", "--clip-grad", "0")
    model, s = run.model, schedule_values(lr=1e-2, wd=5.0)  # a decay large enough to show in the step
    muon = {id(p) for g in run.optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in run.optimizer.adamw.param_groups for p in g["params"]}
    names = dict(model.student.named_parameters())
    assert not muon & adamw and muon | adamw == {id(p) for p in names.values()}  # each parameter, once
    for n, p in names.items():  # Muon: the 2-D weights of the blocks and of the head's MLP, nothing else
        expected = p.ndim == 2 and (n.startswith("backbone.blocks.") or n.startswith("head.mlp."))
        assert (id(p) in muon) == expected, n
    # a loss whose gradient is a known random (full-rank) matrix per parameter: sum_p <p, R_p>
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in names.items()}
    before = {n: p.detach().double().clone() for n, p in names.items()}
    model.forward = lambda *_, **__: {"loss": sum((p * grads[n]).sum() for n, p in names.items())}
    train.train_step(run, random_batch(run, seed=0), s, freeze_last_layer=False)
    adam = HandAdamW()
    with torch.no_grad():
        for n, p in names.items():
            theta = before[n]
            if id(p) in muon:  # theta <- theta (1 - lr wd) - lr 0.2 sqrt(max(A, B)) NS(g): RMS matched to AdamW
                step = (theta * (1 - s["lr"] * s["wd"]) - p.double()) / (s["lr"] * 0.2 * math.sqrt(max(p.shape)))
                expected = newton_schulz(grads[n])  # torch iterates in bf16: within about 1.5% on these
                assert float((step - expected).norm() / expected.norm()) < 0.03, n
            else:
                wd = s["wd"] if decayed(n, p) else 0.0
                torch.testing.assert_close(p.double(), adam.step(n, theta, grads[n], s["lr"], wd), rtol=1e-5,
                                           atol=1e-7, msg=n)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_state_survives_a_checkpoint_round_trip():
    a, b = tiny_run("--optimizer", "muon"), tiny_run("--optimizer", "muon")
    train.train_step(a, random_batch(a, 0), schedule_values(), freeze_last_layer=False)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    for run in (a, b):
        train.train_step(run, random_batch(run, 1), schedule_values(lr=3e-3), freeze_last_layer=False)
    for (n, p), q in zip(a.model.student.named_parameters(), b.model.student.parameters()):
        assert torch.equal(p, q), n  # the momentum buffers and AdamW's moments came back exactly


def test_muon_without_torch_muon_says_which_torch_it_needs(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(ValueError, match=r"--optimizer muon needs torch.optim.Muon \(torch >= 2.9\)"):
        train.build(train.TrainConfig, train.parse_args(["--optimizer", "muon"]))


def test_weight_decay_momentum_temperatures_and_freeze_follow_their_definitions():
    args, sch = schedules("--epochs", "20", "--warmup-teacher-temp-epochs", "5", "--freeze-last-layer", "2",
                          "--pred-start-epoch", "3", "--momentum-teacher", "0.99", "--teacher-temp", "0.07",
                          "--warmup-teacher-temp", "0.04")
    total = 200
    for i in (0, 77, 150, total - 1):
        v = sch.at(i)
        assert v["wd"] == pytest.approx(cosine(args.weight_decay, args.weight_decay_end, i, total))
        assert v["momentum"] == pytest.approx(cosine(0.99, 1.0, i, total))
    assert sch.at(total - 1)["momentum"] == 1.0 and sch.at(total - 1)["wd"] == args.weight_decay_end
    # tau_t: linear 0.04 -> 0.07 over the first 5 epochs (50 steps), then held
    tau = [sch.at(i)["teacher_temp"] for i in range(total)]
    assert tau[0] == 0.04 and tau[49:] == pytest.approx([0.07] * (total - 49))
    assert tau[20] == pytest.approx(0.04 + 0.03 * 20 / 49)
    # tau_t': held at 0.04 until pred_start_epoch (30 steps), then the same ramp
    tau_p = [sch.at(i)["teacher_patch_temp"] for i in range(total)]
    assert set(tau_p[:30]) == {0.04} and tau_p[30 + 49:] == pytest.approx([0.07] * (total - 79))
    assert tau_p[30 + 20] == pytest.approx(0.04 + 0.03 * 20 / 49)
    assert sch.freeze_last_layer_steps == 20


def test_no_masks_before_pred_start_epoch():
    for views in ("--no-device-augment", "--device-augment"):
        run = tiny_run("--pred-start-epoch", "1", views)
        for epoch, masked in ((0, False), (1, True)):
            global_crops, _, masks = next(iter(run.epoch_batches(epoch, 0)))
            assert masks.shape[0] == global_crops.shape[0] and bool(masks.any()) == masked, (views, epoch)


def test_loader_batches_are_crop_major_with_each_images_own_views_and_masks():
    # the PIL path's batch against the per-image definition: row c * B + b is crop c of the batch's image b
    flags = ["--seed", "5", "--mask-ratios", "0.3", "--mask-ratio-vars", "0.2"]
    run, args = tiny_run(*flags), train.parse_args(TINY + ["--batch-size", str(B), *flags])
    aug = M.MultiCropAugmentation(**{f.name: getattr(args, f.name) for f in dataclasses.fields(M.MultiCropAugmentation)
                                     if hasattr(args, f.name)})
    per_image = D.MultiCropDataset(run.images, aug, seed=5)
    per_image.epoch = 1
    sampler = train.EpochSampler(len(run.images), B, 0, 1, seed=5)
    sampler.set_epoch(1)
    global_crops, local_crops, masks = next(iter(run.epoch_batches(1, 0)))
    assert masks.shape == (2 * B, 16) and len({tuple(m.tolist()) for m in masks}) > 1  # masks differ
    for b, i in enumerate(list(sampler)[:B]):
        crops, image_masks = per_image[i]  # g + l crops, (g, h, w) masks
        for c in range(2):
            assert torch.equal(global_crops[c * B + b], crops[c]) and torch.equal(local_crops[c * B + b], crops[2 + c])
            assert torch.equal(masks[c * B + b], image_masks[c].flatten())


def flipped(view: torch.Tensor) -> bool:
    """Whether a view of the dark-left, bright-right image below came out mirrored left to right."""
    half = view.shape[-1] // 2
    return bool(view[..., :half].mean() > view[..., half:].mean())


def test_both_view_paths_flip_left_to_right_half_the_time():
    # rows alike, dark left and bright right: an upside-down flip leaves it as it is, a mirror swaps the halves;
    # crops of most of the image keep both halves, and jitter, grey and blur keep which half is the brighter
    pixels = torch.zeros(3, 32, 32, dtype=torch.uint8)
    pixels[:, :, 16:] = 200
    aug = M.MultiCropAugmentation(global_size=16, local_size=8, local_crops=0, patch_size=4, blur=True)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    views = [aug.view(pil, 16, (0.9, 1.0), 0.5, 0.0, torch.Generator().manual_seed(i)) for i in range(64)]
    batched = BV.BatchedMultiCrop(aug).views(pixels[None].expand(64, -1, -1, -1).float() / 255, 16, (0.9, 1.0), 0.5,
                                              0.0, torch.Generator().manual_seed(0))
    for name, vs in (("PIL", views), ("batched", list(batched))):
        share = sum(map(flipped, vs)) / len(vs)
        assert 0.3 < share < 0.7, f"{name}: {share:.2f} of the views mirrored"
        assert all(float((v[..., :8, :] - v[..., 8:, :].flip(-2)).abs().max()) < 0.05 for v in vs), name  # rows alike


def test_global_and_local_crops_are_drawn_from_their_own_scale_ranges(monkeypatch):
    aug = M.MultiCropAugmentation(global_size=16, local_size=8, global_crops=2, local_crops=3, patch_size=4,
                                  global_scale=(0.4, 1.0), local_scale=(0.05, 0.3))
    expected = [(0.4, 1.0)] * 2 + [(0.05, 0.3)] * 3
    seen, pil_crop, batched_boxes = [], M.random_resized_crop_params, BV.BatchedMultiCrop.crop_boxes

    def pil_recording(width, height, scale, *a, **kw):
        seen.append(tuple(scale))
        return pil_crop(width, height, scale, *a, **kw)

    def batched_recording(self, n, height, width, scale, *a, **kw):
        seen.append(tuple(scale))
        return batched_boxes(self, n, height, width, scale, *a, **kw)

    monkeypatch.setattr(M, "random_resized_crop_params", pil_recording)
    crops, masks = aug(Image.new("RGB", (32, 32)), torch.Generator().manual_seed(0))
    assert seen == expected and [c.shape[-1] for c in crops] == [16, 16, 8, 8, 8] and masks.shape == (2, 4, 4)
    seen.clear()
    monkeypatch.setattr(BV.BatchedMultiCrop, "crop_boxes", batched_recording)
    global_crops, local_crops, _ = BV.BatchedMultiCrop(aug)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                                            torch.Generator().manual_seed(0))
    assert seen == expected and global_crops.shape[-1] == 16 and local_crops.shape[-1] == 8


def test_a_budget_is_mostly_used_and_ends_at_the_presets_final_values(tmp_path):
    budget, out = 20.0, tmp_path / "run"
    args = train.parse_args(TINY + ["--batch-size", "8", "--epochs", "1000", "--budget", f"{budget}s",
                                    "--device-augment", "--output-dir", str(out)])
    final = vars(copy.copy(args))  # the preset's values, read before the run changes anything
    summary = train.train(args)
    # neither stopped early nor late: 5 s are kept for the final checkpoint and plot, a step may run past
    assert 0.6 * budget < summary["train_s"] < budget + 4, summary
    assert summary["steps"] == summary["total"] >= 3  # past the steps that measure the rate
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == summary["steps"]
    assert last["lr"] == pytest.approx(final["min_lr"]) and last["wd"] == pytest.approx(final["weight_decay_end"])
    assert last["momentum"] == 1.0 and last["teacher_temp"] == pytest.approx(final["teacher_temp"])
    assert last["teacher_patch_temp"] == pytest.approx(final["teacher_temp"])


# ---- a run that goes non-finite ----


def test_an_inf_pixel_stops_the_run_and_leaves_the_checkpoint_as_it_was(tmp_path, monkeypatch, capsys):
    out, real_step, calls, kept = tmp_path / "run", train.train_step, [], {}

    def step_with_an_inf_pixel_from_step_4(run, batch, s, freeze):
        calls.append(1)
        if len(calls) == 4:  # the first epoch's checkpoint (3 steps of 24 images / 8) is on disk
            kept["bytes"] = (out / "checkpoint.pth").read_bytes()
        if len(calls) >= 4:
            batch = (batch[0].clone().index_put_((torch.tensor(0),) * 4, torch.tensor(math.inf)), *batch[1:])
        return real_step(run, batch, s, freeze)

    monkeypatch.setattr(train, "train_step", step_with_an_inf_pixel_from_step_4)
    argv = TINY + ["--dataset", "imagefolder", "--data-path", str(image_folder(tmp_path / "images", 12)),
                   "--batch-size", "8", "--epochs", "6", "--output-dir", str(out)]
    assert train.main(argv) == 1
    assert len(calls) - 3 <= 10  # stopped within a few steps of the first non-finite one
    assert (out / "checkpoint.pth").read_bytes() == kept["bytes"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: non-finite")


def test_a_huge_lr_stops_the_run_and_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = TINY + ["--dataset", "imagefolder", "--data-path", str(image_folder(tmp_path / "images", 28)),
                   "--batch-size", "8", "--epochs", "2", "--lr", "1e30",
                   "--warmup-epochs", "0", "--output-dir", str(out)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: non-finite")
    assert int(re.search(r"step(?:s up to)? (\d+)", err).group(1)) <= 10  # caught within a few steps
    assert not (out / "checkpoint.pth").exists()


# ---- the backbone ----


@pytest.mark.parametrize("grid, size", [((2, 3), (5, 4)), ((3, 2), (4, 7)), ((2, 3), (4, 6))])
def test_position_embeddings_are_a_bicubic_interpolation_of_the_grid(grid, size):
    torch.manual_seed(0)
    vit = M.VisionTransformer(img_size=(grid[0] * 4, grid[1] * 4), patch_size=4, embed_dim=8, depth=1, num_heads=2)
    pos = vit.pos_embed.detach()  # (1, 1 + h*w, D), patches row-major
    image = pos[:, 1:].reshape(1, *grid, 8).permute(0, 3, 1, 2)  # (1, D, h, w)
    want = F.interpolate(image, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    got = vit.interpolate_pos_embed(*size).detach()
    assert got.shape == (1, 1 + size[0] * size[1], 8) and torch.equal(got[:, :1], pos[:, :1])  # [CLS]'s as it is
    torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=1e-6)
    # and the tokens of an image of that size carry it: zero pixels leave only the patch bias and the position
    with torch.no_grad():
        vit.patch_embed.proj.bias.zero_()
        tokens = vit.prepare_tokens(torch.zeros(1, 3, size[0] * 4, size[1] * 4))
    torch.testing.assert_close(tokens[:, 1:], want, rtol=0, atol=1e-6)


def test_the_teacher_starts_as_an_exact_copy_of_the_student():
    run = tiny_run()
    model = run.model
    student = dict(model.student.named_parameters())
    teacher = dict(model.teacher.named_parameters())
    assert set(student) - set(teacher) == {"backbone.masked_embed"} and set(teacher) <= set(student)
    for n, p in teacher.items():
        assert torch.equal(p, student[n]) and p.data_ptr() != student[n].data_ptr(), n  # equal, not shared
        assert not p.requires_grad
    x = torch.randn(2, 3, 16, 16)
    model.train()
    torch.testing.assert_close(model.teacher.backbone(x), model.student.backbone(x))


def official_checkpoint() -> tuple[dict, dict]:
    """A full official iBOT ViT-S/16 checkpoint built from the fixture's key names and shapes: every tensor filled
    with its own index, so a mix-up of two shows."""
    layout = json.loads((FIXTURES / "official_ibot_vit_small_keys.json").read_text())
    ckpt = {part: {k: torch.full(shape, float(i)) for i, (k, shape) in enumerate(layout[part].items())}
            for part in ("student", "teacher", "ibot_loss")}
    ckpt["args"] = argparse.Namespace(**layout["args"])  # main_ibot.py saves its flags as they were parsed
    return ckpt, layout


def test_official_layout_fixture_matches_our_checkpoint_and_loads():
    ckpt, layout = official_checkpoint()
    cfg = M.IBOTConfig()  # the official ViT-S/16 recipe's networks
    assert (cfg.arch, cfg.patch_size, cfg.out_dim, cfg.shared_head) == ("vit_small", 16, 8192, True)
    ours = M.IBOT(cfg).checkpoint()
    for part in ("student", "teacher"):
        official = {k.removeprefix("module."): v for k, v in layout[part].items()}
        # ours leaves out the shared head's second name for the same prototypes (head.last_layer2 = last_layer)
        shared = {k for k in official if k.startswith("head.last_layer2.")}
        assert {k: list(v.shape) for k, v in ours[part].items()} == {k: v for k, v in official.items()
                                                                     if k not in shared}, part
    assert {k: list(v.shape) for k, v in ours["ibot_loss"].items()} == layout["ibot_loss"]
    for which in ("teacher", "student"):
        backbone = C.load_backbone(ckpt, which)
        assert backbone.embed_dim == 384 and len(backbone.blocks) == 12 and backbone.grid == (14, 14)
        assert (backbone.masked_embed is not None) == (which == "student")
        state = backbone.state_dict()
        for k, v in ckpt[which].items():
            name = k.removeprefix("module.").removeprefix("backbone.")
            if not name.startswith("head."):
                assert torch.equal(state.pop(name), v), f"{which} {k}"
        assert not state  # every backbone tensor came from the file


# ---- bf16 autocast against fp32 ----
# The bf16 step's error on bf16_case, measured on this CPU (2-core AMD EPYC with avx512_bf16, no AMX; torch 2.14.1;
# step_terms_and_gradients(*bf16_case(), "cpu", torch.bfloat16) against the same in fp32): loss terms 6.1e-4
# relative at most (cls 6.1e-4, patch 1.1e-4, loss 2.3e-4, koleo 2.5e-5); the gradients' 1 - cosine 2.3e-4 at most
# (patch_embed) and their norms 6.1e-3. The tolerances are about 3-4x that. Feeding another image's crops or mask
# (the layout bugs below) moves the gradients' 1 - cosine by 1.2e-2 or more: 12x the tolerance.
TERM_RTOL = 2e-3
GRAD_COSINE = 1 - 1e-3
GRAD_NORM_RTOL = 0.02
GRADIENTS = ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.masked_embed",
             "head.mlp.0.weight", "head.last_layer.weight_v")


def step_terms_and_gradients(model: M.IBOT, batch, device: str, dtype) -> tuple[dict, dict]:
    """One step's loss terms and some of the student's gradients, on a copy of the model on `device`."""
    model = copy.deepcopy(model).to(device)
    batch = [t.to(device) for t in batch]
    with torch.autocast(device, dtype=dtype) if dtype else torch.autocast(device, enabled=False):
        out = model(*batch, 0.04, 0.05)
    out["loss"].backward()
    named = dict(model.student.named_parameters())
    return {k: float(v.detach()) for k, v in out.items()}, {n: named[n].grad.float().cpu() for n in GRADIENTS}


def bf16_case() -> tuple[M.IBOT, tuple]:
    """vit_nano at 32 px, 16 images, KoLeo on; weights 3x their initial spread (images then look different to the
    networks, as after some training), a teacher apart from the student and centres away from zero."""
    torch.manual_seed(0)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=32, local_crops=2, out_dim=256, head_hidden_dim=256,
                       head_bottleneck_dim=64, drop_path=0.0, koleo=0.1)
    model = M.IBOT(cfg)
    with torch.no_grad():
        for part in (model.student, model.teacher):
            for n, p in part.named_parameters():
                if p.ndim > 1 and "last_layer" not in n:
                    p.mul_(3.0)
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.loss.center.normal_(0, 0.1)
        model.loss.patch_center.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(1)
    B = 16
    batch = (torch.randn(2 * B, 3, 32, 32, generator=gen), torch.randn(2 * B, 3, 16, 16, generator=gen),
             torch.rand(2 * B, 64, generator=gen) < 0.3)
    return model, batch


def assert_close_to_fp32(terms, grads, ref_terms, ref_grads):
    assert set(terms) == set(ref_terms) == {"cls", "patch", "loss", "koleo"}
    for k, v in ref_terms.items():
        assert terms[k] == pytest.approx(v, rel=TERM_RTOL), k
    for n, g in ref_grads.items():
        assert F.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0) > GRAD_COSINE, n
        assert float(grads[n].norm()) == pytest.approx(float(g.norm()), rel=GRAD_NORM_RTOL), n


def test_bf16_error_is_below_what_a_layout_bug_moves():
    model, batch = bf16_case()
    ref_terms, ref_grads = step_terms_and_gradients(model, batch, "cpu", None)
    assert_close_to_fp32(*step_terms_and_gradients(model, batch, "cpu", torch.bfloat16), ref_terms, ref_grads)
    global_crops, local_crops, masks = batch
    B = global_crops.shape[0] // 2
    for bug in [(torch.cat([global_crops[:B], global_crops[B:].roll(1, 0)]), local_crops, masks),  # crops of
                (global_crops, local_crops.roll(1, 0), masks),  # different images paired as one image's views
                (global_crops, local_crops, masks.roll(1, 0))]:  # another image's mask
        terms, grads = step_terms_and_gradients(model, bug, "cpu", None)
        cosines = [float(F.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0)) for n, g in ref_grads.items()]
        assert 1 - min(cosines) > 10 * (1 - GRAD_COSINE)
        with pytest.raises(AssertionError):
            assert_close_to_fp32(terms, grads, ref_terms, ref_grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_step_matches_cpu_fp32():
    model, batch = bf16_case()
    ref_terms, ref_grads = step_terms_and_gradients(model, batch, "cpu", None)
    assert_close_to_fp32(*step_terms_and_gradients(model, batch, "cuda", torch.bfloat16), ref_terms, ref_grads)
