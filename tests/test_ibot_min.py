"""Tests for ibot_min: a slow reference loss written from docs/method.md, properties of the pure functions
(hypothesis, few examples, no deadline), and small end-to-end checks of the networks and loaders.

Everything is seeded; the whole file runs in well under a minute and a half on two CPU cores.
"""

import argparse
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import check_loss
import checkpoints as C
import ibot_min as M

FAST = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=12, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a small shared CPU, intra-op threads cost far more in hand-offs than they save
    (a ViT-nano forward ran ~40x slower with 2 threads than with 1 on the 2-core test machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# ---- helpers ----


def _log_softmax64(x: torch.Tensor) -> torch.Tensor:
    """log softmax of one vector, written out, in float64."""
    x = x.double()
    return x - x.max() - torch.log(torch.exp(x - x.max()).sum())


def _softmax64(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_softmax64(x))


def reference_ibot_loss(s_cls, s_patch, t_cls, t_patch, masks, g, l, tau_t, tau_t_patch, center, patch_center,
                        tau_s=0.1, lambda1=1.0, lambda2=1.0, momentum=0.9):
    """check_loss.reference_loss (the loss as plain loops over the views, shared with the loss checker), in float64.

    s_cls ((g+l)B, K), s_patch (gB, N, Kp), t_cls (gB, K), t_patch (gB, N, Kp), masks (gB, N) bool,
    center (1, K), patch_center (1, 1, Kp). Returns (cls, patch, loss, new center, new patch_center).
    """
    terms, new_c, new_c2 = check_loss.reference_loss(
        s_cls.double(), s_patch.double(), t_cls.double(), t_patch.double(), masks, tau_t, tau_t_patch,
        center.double()[0], patch_center.double()[0, 0], g, student_temp=tau_s, center_momentum=momentum)
    cls, patch = lambda1 * float(terms["cls"]), lambda2 * float(terms["patch"])
    return cls, patch, cls + patch, new_c[None], new_c2[None, None]


def make_inputs(seed, g, l, B, N, K, Kp, p_mask=0.4, empty_row=False, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s_cls = torch.randn((g + l) * B, K, generator=gen) * scale
    s_patch = torch.randn(g * B, N, Kp, generator=gen) * scale
    t_cls = torch.randn(g * B, K, generator=gen) * scale
    t_patch = torch.randn(g * B, N, Kp, generator=gen) * scale
    masks = torch.rand(g * B, N, generator=gen) < p_mask
    if empty_row:
        masks[0] = False
    return s_cls, s_patch, t_cls, t_patch, masks


def make_loss(g, l, K, Kp, seed=0, tau_s=0.1, lambda1=1.0, lambda2=1.0, centred=True):
    loss = M.IBOTLoss(K, Kp, g, l, student_temp=tau_s, lambda1=lambda1, lambda2=lambda2)
    if centred:
        gen = torch.Generator().manual_seed(seed + 1000)
        loss.center.copy_(torch.randn(1, K, generator=gen))
        loss.patch_center.copy_(torch.randn(1, 1, Kp, generator=gen))
    return loss


def close(a, b, atol=1e-4, rtol=1e-4):
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return math.isclose(a, b, abs_tol=atol, rel_tol=rtol)


crop_counts = st.tuples(st.integers(1, 3), st.integers(0, 3)).filter(lambda gl: sum(gl) >= 2)


# ---------------------------------------------------------------------------------------------------
# ---- 1. the loss against the reference formula ----


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(1, 6), K=st.integers(2, 8), Kp=st.integers(2, 8),
       tau_s=st.floats(0.05, 0.3), tau_t=st.floats(0.02, 0.2), tau_tp=st.floats(0.02, 0.2),
       lambda1=st.floats(0.0, 2.0), lambda2=st.floats(0.0, 2.0), p_mask=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       empty_row=st.booleans(), seed=st.integers(0, 2**16))
def test_loss_matches_reference(gl, B, N, K, Kp, tau_s, tau_t, tau_tp, lambda1, lambda2, p_mask, empty_row, seed):
    g, l = gl
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, Kp, p_mask, empty_row)
    loss = make_loss(g, l, K, Kp, seed, tau_s, lambda1, lambda2)
    c0, c2_0 = loss.center.clone(), loss.patch_center.clone()
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, tau_t, tau_tp)
    ref_cls, ref_patch, ref_loss, ref_c, ref_c2 = reference_ibot_loss(
        s_cls, s_patch, t_cls, t_patch, masks, g, l, tau_t, tau_tp, c0, c2_0, tau_s, lambda1, lambda2)
    assert close(out["cls"], ref_cls), (float(out["cls"]), ref_cls)
    assert close(out["patch"], ref_patch), (float(out["patch"]), ref_patch)
    assert close(out["loss"], ref_loss), (float(out["loss"]), ref_loss)
    assert loss.center.shape == (1, K) and loss.patch_center.shape == (1, 1, Kp)
    torch.testing.assert_close(loss.center.double(), ref_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.patch_center.double(), ref_c2, atol=1e-5, rtol=1e-5)


def _tiny_cfg(shared_head: bool, img_size: int = 16, drop_path: float = 0.0) -> M.IBOTConfig:
    return M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=img_size, out_dim=64,
                         patch_out_dim=64 if shared_head else 48, shared_head=shared_head, local_crops=2,
                         drop_path=drop_path, head_hidden_dim=256, head_bottleneck_dim=64)


def _tiny_model(shared_head: bool, seed: int = 0, drop_path: float = 0.0) -> M.IBOT:
    torch.manual_seed(seed)
    model = M.IBOT(_tiny_cfg(shared_head, drop_path=drop_path))
    with torch.no_grad():  # a teacher that is no longer a copy of the student, and centres that are not zero
        for p in model.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.student.backbone.masked_embed.normal_()
        model.loss.center.normal_()
        model.loss.patch_center.normal_()
    return model


def _batch(seed: int, B: int = 2, g: int = 2, l: int = 2, img: int = 16, local: int = 8, p: int = 4):
    gen = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(g * B, 3, img, img, generator=gen)
    local_crops = torch.randn(l * B, 3, local, local, generator=gen)
    side = img // p
    masks = torch.stack([M.block_mask(side, side, 0.4, gen) for _ in range(g * B)])  # (gB, h, w)
    masks[-1] = False  # an image with nothing masked still counts in the batch mean
    masks[0, 0, 0] = True  # and at least one masked patch
    return global_crops, local_crops, masks


def _full_path(model: M.IBOT, loss: M.IBOTLoss, global_crops, local_crops, masks, tt, tpt):
    """The straightforward computation: the head on every token, IBOTLoss.forward on the full tensors."""
    flat = masks.flatten(1)
    with torch.no_grad():
        teacher_cls, teacher_patch = model.teacher.head(model.teacher.backbone(global_crops))
    student_cls_g, student_patch = model.student.head(model.student.backbone(global_crops, mask=flat))
    student_cls_l, _ = model.student.head(model.student.backbone(local_crops))
    return loss(torch.cat([student_cls_g, student_cls_l]), student_patch, teacher_cls, teacher_patch, flat, tt, tpt)


@pytest.mark.parametrize("shared_head, drop_path", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_ibot_forward_matches_full_path_and_gradients(shared_head, drop_path):
    """Drop path on: both paths draw the same per-image keeps (same seed, same order of blocks)."""
    model = _tiny_model(shared_head, drop_path=drop_path)
    global_crops, local_crops, masks = _batch(1)
    tt, tpt = 0.05, 0.06
    loss_copy = copy.deepcopy(model.loss)

    model.zero_grad()
    torch.manual_seed(11)
    fast = model(global_crops, local_crops, masks, tt, tpt)
    fast["loss"].backward()
    fast_grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}

    model.zero_grad()
    torch.manual_seed(11)
    full = _full_path(model, loss_copy, global_crops, local_crops, masks, tt, tpt)
    full["loss"].backward()
    full_grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}

    for key in ("cls", "patch", "loss"):
        assert close(fast[key], full[key], atol=1e-5, rtol=1e-5), (key, float(fast[key]), float(full[key]))
    assert fast["patch"].detach() > 0 and fast["cls"].detach() > 0
    torch.testing.assert_close(model.loss.center, loss_copy.center)
    torch.testing.assert_close(model.loss.patch_center, loss_copy.patch_center)

    assert set(fast_grads) == set(full_grads)
    assert "backbone.masked_embed" in fast_grads and fast_grads["backbone.masked_embed"].abs().sum() > 0
    if not shared_head:
        assert fast_grads["head.last_layer2.weight_v"].abs().sum() > 0
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_ibot_forward_matches_reference_loss():
    """The whole module against the loop formula, on the networks' own outputs (teacher's [CLS] included)."""
    model = _tiny_model(shared_head=False, seed=3)
    global_crops, local_crops, masks = _batch(4)
    c0, c2_0 = model.loss.center.clone(), model.loss.patch_center.clone()
    with torch.no_grad():
        flat = masks.flatten(1)
        t_cls, t_patch = model.teacher.head(model.teacher.backbone(global_crops))
        s_cls_g, s_patch = model.student.head(model.student.backbone(global_crops, mask=flat))
        s_cls_l, _ = model.student.head(model.student.backbone(local_crops))
        out = model(global_crops, local_crops, masks, 0.04, 0.07)
    ref = reference_ibot_loss(torch.cat([s_cls_g, s_cls_l]), s_patch, t_cls, t_patch, flat, 2, 2, 0.04, 0.07, c0, c2_0)
    assert close(out["cls"], ref[0]) and close(out["patch"], ref[1]) and close(out["loss"], ref[2])


# ---------------------------------------------------------------------------------------------------
# ---- 2. properties of the loss ----


def _run(loss, inputs, tt=0.05, tpt=0.07):
    return copy.deepcopy(loss)(*inputs, tt, tpt)


@FAST
@given(B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 10), tau_s=st.floats(0.05, 0.3),
       tau_t=st.floats(0.02, 0.2), seed=st.integers(0, 2**16))
def test_loss_is_at_least_the_target_entropy_with_equality_at_the_target(B, N, K, tau_s, tau_t, seed):
    g, l = 1, 1
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, K, 0.5, scale=1.0)
    masks[:, 0] = True
    loss = make_loss(g, l, K, K, seed, tau_s)
    logP = F.log_softmax((t_cls - loss.center) / tau_t, dim=-1)  # (B, K)
    logQ = F.log_softmax((t_patch - loss.patch_center) / tau_t, dim=-1)  # (B, N, K)
    H_P = -(logP.exp() * logP).sum(-1).mean()
    H_Q = (-(logQ.exp() * logQ).sum(-1) * masks).sum(1) / masks.sum(1)
    out = _run(loss, (s_cls, s_patch, t_cls, t_patch, masks), tau_t, tau_t)
    assert float(out["cls"]) >= float(H_P) - 1e-4
    assert float(out["patch"]) >= float(H_Q.mean()) - 1e-4

    # with g = 1 the [CLS] of the only global crop pairs with no other teacher view: it does not matter
    other = s_cls.clone()
    other[:B] = torch.randn(B, K)
    assert close(_run(loss, (other, s_patch, t_cls, t_patch, masks), tau_t, tau_t)["cls"], out["cls"], 1e-5)

    # softmax(s / tau_s) == P  =>  cross-entropy == entropy
    s_eq = s_cls.clone()
    s_eq[B:] = tau_s * logP
    p_eq = tau_s * logQ
    out_eq = _run(loss, (s_eq, p_eq, t_cls, t_patch, masks), tau_t, tau_t)
    assert close(out_eq["cls"], H_P, 1e-4)
    assert close(out_eq["patch"], H_Q.mean(), 1e-4)


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 8),
       p_mask=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_loss_is_non_negative(gl, B, N, K, p_mask, seed):
    g, l = gl
    inputs = make_inputs(seed, g, l, B, N, K, K, p_mask, scale=5.0)
    out = _run(make_loss(g, l, K, K, seed), inputs)
    assert float(out["cls"]) >= 0 and float(out["patch"]) >= 0 and float(out["loss"]) >= 0


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 8), Kp=st.integers(2, 8),
       seed=st.integers(0, 2**16))
def test_loss_invariant_to_row_constants(gl, B, N, K, Kp, seed):
    g, l = gl
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, Kp)
    loss = make_loss(g, l, K, Kp, seed)
    base = _run(loss, (s_cls, s_patch, t_cls, t_patch, masks))
    gen = torch.Generator().manual_seed(seed + 7)
    shift = lambda x: x + (torch.rand(x.shape[:-1] + (1,), generator=gen) * 10 - 5)  # noqa: E731
    shifted = _run(loss, (shift(s_cls), shift(s_patch), t_cls, t_patch, masks))
    assert close(shifted["loss"], base["loss"], 1e-3, 1e-4) and close(shifted["patch"], base["patch"], 1e-3, 1e-4)
    shifted = _run(loss, (s_cls, s_patch, shift(t_cls), shift(t_patch), masks))
    assert close(shifted["loss"], base["loss"], 1e-3, 1e-4) and close(shifted["patch"], base["patch"], 1e-3, 1e-4)


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 8), Kp=st.integers(2, 8),
       seed=st.integers(0, 2**16))
def test_loss_invariant_to_permuting_prototypes(gl, B, N, K, Kp, seed):
    g, l = gl
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, Kp)
    loss = make_loss(g, l, K, Kp, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    pk, pkp = torch.randperm(K, generator=gen), torch.randperm(Kp, generator=gen)
    loss_a, loss_b = copy.deepcopy(loss), copy.deepcopy(loss)
    loss_b.center.copy_(loss.center[:, pk])
    loss_b.patch_center.copy_(loss.patch_center[..., pkp])
    a = loss_a(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    b = loss_b(s_cls[:, pk], s_patch[..., pkp], t_cls[:, pk], t_patch[..., pkp], masks, 0.05, 0.07)
    assert close(a["cls"], b["cls"], 1e-5) and close(a["patch"], b["patch"], 1e-5)
    torch.testing.assert_close(loss_b.center, loss_a.center[:, pk])
    torch.testing.assert_close(loss_b.patch_center, loss_a.patch_center[..., pkp])


@FAST
@given(gl=crop_counts, B=st.integers(2, 4), N=st.integers(1, 5), K=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_loss_invariant_to_permuting_images(gl, B, N, K, seed):
    g, l = gl
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, K, empty_row=True)
    loss = make_loss(g, l, K, K, seed)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    rows = lambda n_crops: torch.cat([v * B + perm for v in range(n_crops)])  # noqa: E731
    a_loss, b_loss = copy.deepcopy(loss), copy.deepcopy(loss)
    a = a_loss(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    rg = rows(g)
    b = b_loss(s_cls[rows(g + l)], s_patch[rg], t_cls[rg], t_patch[rg], masks[rg], 0.05, 0.07)
    assert close(a["cls"], b["cls"], 1e-5) and close(a["patch"], b["patch"], 1e-5)
    torch.testing.assert_close(a_loss.center, b_loss.center)
    torch.testing.assert_close(a_loss.patch_center, b_loss.patch_center)


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(2, 6), K=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_unmasked_student_patches_are_ignored(gl, B, N, K, seed):
    g, l = gl
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, K, p_mask=0.5)
    loss = make_loss(g, l, K, K, seed)
    s_patch = s_patch.requires_grad_(True)
    out = _run(loss, (s_cls, s_patch, t_cls, t_patch, masks))
    out["loss"].backward()
    assert torch.all(s_patch.grad[~masks] == 0)
    if masks.any():
        assert s_patch.grad[masks].abs().sum() > 0
    other = torch.where(masks[..., None], s_patch.detach(), torch.randn_like(s_patch) * 10)
    again = _run(loss, (s_cls, other, t_cls, t_patch, masks))
    assert torch.equal(again["loss"].detach(), out["loss"].detach())


@FAST
@given(gl=crop_counts, B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_no_masks_no_patch_loss(gl, B, N, K, seed):
    g, l = gl
    inputs = make_inputs(seed, g, l, B, N, K, K, p_mask=0.0)
    out = _run(make_loss(g, l, K, K, seed), inputs)
    assert float(out["patch"]) == 0.0
    assert close(out["loss"], out["cls"], 0, 0)


def test_no_gradient_reaches_the_teacher_inputs():
    """P_u and Q_un are targets: docs/method.md says 'no gradient' (the official code detaches them)."""
    g, l, B, N, K = 2, 2, 3, 4, 6
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(0, g, l, B, N, K, K, p_mask=0.5)
    t_cls.requires_grad_(True)
    t_patch.requires_grad_(True)
    s_cls.requires_grad_(True)
    out = make_loss(g, l, K, K)(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    out["loss"].backward()
    assert s_cls.grad is not None and s_cls.grad.abs().sum() > 0
    for name, t in (("teacher_cls", t_cls), ("teacher_patch", t_patch)):
        leaked = 0.0 if t.grad is None else float(t.grad.abs().sum())
        assert leaked == 0.0, f"gradient flowed into {name} (|grad| sum {leaked:.3g})"


@FAST
@given(l=st.integers(0, 3), B=st.integers(1, 3), N=st.integers(1, 5), K=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_swapping_the_global_views_leaves_the_loss_unchanged(l, B, N, K, seed):
    g = 2
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(seed, g, l, B, N, K, K)
    loss = make_loss(g, l, K, K, seed)
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    swap_all = torch.cat([swap, torch.arange(2 * B, (2 + l) * B)])
    a = _run(loss, (s_cls, s_patch, t_cls, t_patch, masks))
    b = _run(loss, (s_cls[swap_all], s_patch[swap], t_cls[swap], t_patch[swap], masks[swap]))
    assert close(a["cls"], b["cls"], 1e-5) and close(a["patch"], b["patch"], 1e-5)


def test_center_update_is_an_ema_of_all_patches():
    g, l, B, N, K = 2, 1, 3, 5, 4
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(5, g, l, B, N, K, K, p_mask=0.0)
    masks[:, 0] = True  # only one masked position per row: c' must still average every position
    loss = make_loss(g, l, K, K, seed=5)
    c, c2 = loss.center.clone(), loss.patch_center.clone()
    loss(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    expected_c = 0.9 * c + 0.1 * t_cls.mean(0, keepdim=True)
    expected_c2 = 0.9 * c2 + 0.1 * t_patch.mean(1).mean(0).view(1, 1, K)
    torch.testing.assert_close(loss.center, expected_c)
    torch.testing.assert_close(loss.patch_center, expected_c2)
    masked_only = 0.9 * c2 + 0.1 * t_patch[:, 0].mean(0).view(1, 1, K)
    assert not torch.allclose(loss.patch_center, masked_only)


def test_loss_uses_the_centres_from_before_the_call():
    g, l, B, N, K = 2, 2, 2, 3, 5
    inputs = make_inputs(9, g, l, B, N, K, K, p_mask=0.6)
    loss = make_loss(g, l, K, K, seed=9)
    c0, c2_0 = loss.center.clone(), loss.patch_center.clone()
    first = loss(*inputs, 0.05, 0.07)
    second = loss(*inputs, 0.05, 0.07)
    ref1 = reference_ibot_loss(*inputs, g, l, 0.05, 0.07, c0, c2_0)
    ref2 = reference_ibot_loss(*inputs, g, l, 0.05, 0.07, ref1[3], ref1[4])
    assert close(first["loss"], ref1[2]) and close(second["loss"], ref2[2])
    assert not close(first["loss"], second["loss"], 1e-6, 1e-6)  # the centres did move in between
    torch.testing.assert_close(loss.center.double(), ref2[3])
    torch.testing.assert_close(loss.patch_center.double(), ref2[4])


def reference_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-1/n sum_i log(min_{j != i} ||x_i/|x_i| - x_j/|x_j|| + eps), one pair at a time, float64."""
    x = x.double()
    unit = [row / row.norm() for row in x]
    terms = []
    for i in range(len(unit)):
        rho = min((unit[i] - unit[j]).norm() for j in range(len(unit)) if j != i)
        terms.append(torch.log(rho + eps))
    return -torch.stack(terms).mean()


@FAST
@given(n=st.integers(2, 12), D=st.integers(2, 8), seed=st.integers(0, 10**6))
def test_koleo_matches_reference_with_gradients(n, D, seed):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fast_x, ref_x = x.clone().float().requires_grad_(), x.clone().requires_grad_()
    fast, ref = M.koleo_loss(fast_x), reference_koleo(ref_x)
    assert close(fast, ref, atol=1e-4, rtol=1e-4)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(fast_x.grad.double(), ref_x.grad, atol=1e-3, rtol=1e-3)


@FAST
@given(n=st.integers(3, 10), D=st.integers(2, 6), seed=st.integers(0, 10**6))
def test_koleo_ignores_row_order_and_row_scale(n, D, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    scaled = x * (0.1 + 10 * torch.rand(n, 1, generator=gen))  # it sees directions only
    permuted = x[torch.randperm(n, generator=gen)]
    assert close(M.koleo_loss(x), M.koleo_loss(scaled), 1e-4, 1e-4)
    assert close(M.koleo_loss(x), M.koleo_loss(permuted), 1e-5, 1e-5)


def test_koleo_prefers_spread_features_and_its_gradient_spreads_them():
    spread = torch.cat([torch.eye(4), -torch.eye(4)])  # 8 points as far apart as 4-d allows: rho = sqrt(2)
    clustered = torch.ones(8, 4) + 0.05 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert close(M.koleo_loss(spread), -math.log(math.sqrt(2)), 1e-5, 1e-5)
    assert M.koleo_loss(clustered) > M.koleo_loss(spread) + 1.0
    x = clustered.clone().requires_grad_()
    M.koleo_loss(x).backward()
    with torch.no_grad():
        stepped = x - 0.05 * x.grad
    nearest = lambda y: torch.cdist(F.normalize(y, dim=-1), F.normalize(y, dim=-1)).fill_diagonal_(9).min(1).values
    assert nearest(stepped).mean() > nearest(clustered).mean()  # a step down the loss moves neighbours apart
    with pytest.raises(ValueError, match="n >= 2"):
        M.koleo_loss(torch.randn(1, 4))


def test_drop_path_in_bf16_scales_without_bias():
    """x + branch * keep / (1 - p) in bf16: the kept branches are scaled by 1/(1-p) itself, not by its bf16
    rounding (1.109375 for p = 0.1, a 0.16% bias on every kept branch)."""
    p, B = 0.1, 4096
    x = torch.randn(B, 8, 16).bfloat16()
    branch = torch.rand(B, 8, 16).bfloat16() + 0.5  # positive: a biased scale would not average out
    torch.manual_seed(0)
    out = M.add_drop_path(x, branch, p, training=True)
    torch.manual_seed(0)
    keep = torch.empty(B, 1, 1, dtype=torch.bfloat16).bernoulli_(1 - p).double()  # the same draws
    exact = x.double() + branch.double() * keep / (1 - p)
    assert 0.8 < keep.mean() < 0.95 and keep.min() == 0
    error = out.double() - exact
    assert error.abs().max() <= 2 ** -6 * exact.abs().max()  # within bf16 rounding of the result
    assert abs(error[keep.expand_as(error) == 1].mean()) < 1e-4  # no systematic error (the rounded scale: ~2e-3)


def test_ibot_rejects_bad_masks_before_indexing_with_them():
    model = _tiny_model(shared_head=True)
    global_crops, local_crops, masks = _batch(2)
    for bad, why in ((masks.float(), "float"), (masks.long(), "long"), (masks.flatten(1)[:, :-1], "too few patches"),
                     (masks[:-1], "too few images")):
        with pytest.raises(ValueError, match=r"expected bool masks \(gB, N\)"):
            model(global_crops, local_crops, bad, 0.04, 0.04)


def test_ibot_koleo_term_is_an_added_weighted_term():
    global_crops, local_crops, masks = _batch(4)
    plain_model = _tiny_model(shared_head=True, seed=5)
    model = copy.deepcopy(plain_model)  # the same weights and centres, with the KoLeo term on
    model.cfg = dataclasses.replace(model.cfg, koleo=0.3)
    plain = plain_model(global_crops, local_crops, masks, 0.05, 0.06)
    out = model(global_crops, local_crops, masks, 0.05, 0.06)
    assert "koleo" not in plain  # off by default: the loss is iBOT's alone
    cls_tokens = model.student.backbone(global_crops, mask=masks.flatten(1))[:, 0]  # (gB, D), crop-major
    expected = (M.koleo_loss(cls_tokens[:2]) + M.koleo_loss(cls_tokens[2:])) / 2  # per global crop, B = 2
    assert close(out["koleo"], expected, 1e-5, 1e-5)
    assert close(out["cls"], plain["cls"], 1e-5, 1e-5) and close(out["patch"], plain["patch"], 1e-5, 1e-5)
    assert close(out["loss"], plain["loss"] + 0.3 * expected, 1e-5, 1e-5)
    with pytest.raises(ValueError, match="koleo"):
        dataclasses.replace(model.cfg, koleo=-1.0)


# ---------------------------------------------------------------------------------------------------
# ---- 3. masking ----


@FAST
@given(h=st.integers(1, 16), w=st.integers(1, 16), ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_mask_counts(h, w, ratio, seed):
    b = M.block_mask(h, w, ratio, torch.Generator().manual_seed(seed))
    r = M.random_mask(h, w, ratio, torch.Generator().manual_seed(seed))
    assert b.shape == r.shape == (h, w) and b.dtype == r.dtype == torch.bool
    assert int(b.sum()) <= ratio * h * w
    assert int(r.sum()) == int(ratio * h * w)


def test_zero_ratio_gives_empty_masks_and_seeds_repeat():
    assert not M.block_mask(14, 14, 0.0).any() and not M.random_mask(14, 14, 0.0).any()
    for fn in (M.block_mask, M.random_mask):
        a = fn(14, 14, 0.4, torch.Generator().manual_seed(1))
        b = fn(14, 14, 0.4, torch.Generator().manual_seed(1))
        c = fn(14, 14, 0.4, torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("side", [14, 8])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
def test_block_mask_mean_fraction(side, ratio):
    """BEiT masking stays a little below target (official: ~0.09 for 0.1 on 14x14, ~0.19 for 0.2 on 8x8)."""
    gen = torch.Generator().manual_seed(0)
    frac = torch.stack([M.block_mask(side, side, ratio, gen) for _ in range(300)]).float().mean().item()
    assert ratio - 0.025 <= frac <= ratio, frac


def _masked_neighbours(mask: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])[None, None]
    counts = F.conv2d(mask.float()[None, None], kernel, padding=1)[0, 0]
    return counts[mask].mean().item()


def test_block_masks_are_blocks():
    gen = torch.Generator().manual_seed(0)
    block, rand = [], []
    for _ in range(40):
        m = M.block_mask(14, 14, 0.3, gen)
        r = torch.zeros(196, dtype=torch.bool)
        r[torch.randperm(196, generator=gen)[:int(m.sum())]] = True
        block.append(_masked_neighbours(m))
        rand.append(_masked_neighbours(r.view(14, 14)))
    assert np.mean(block) > 2.5 and np.mean(rand) < 1.6, (np.mean(block), np.mean(rand))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio_raises(ratio):
    for fn in (M.block_mask, M.random_mask):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            fn(8, 8, ratio)


def test_sample_ratio_recipe():
    gen = torch.Generator().manual_seed(0)
    draws = np.array([M.sample_ratio([0.0, 0.3], [0.0, 0.2], gen) for _ in range(1000)])
    zero = draws == 0
    assert 0.44 <= zero.mean() <= 0.56
    rest = draws[~zero]
    assert rest.min() >= 0.1 and rest.max() <= 0.5
    assert rest.min() < 0.13 and rest.max() > 0.47 and abs(rest.mean() - 0.3) < 0.02  # U(0.1, 0.5), not a constant


def test_sample_masks_shape():
    gen = torch.Generator().manual_seed(0)
    for shape in ("block", "rand"):
        m = M.sample_masks(3, 6, 5, (0.3,), (0.1,), shape, gen)
        assert m.shape == (3, 6, 5) and m.dtype == torch.bool and m.any()
    with pytest.raises(ValueError, match="block"):
        M.sample_masks(2, 4, 4, shape="grid")


# ---------------------------------------------------------------------------------------------------
# ---- 4. the ViT ----


@pytest.fixture(scope="module")
def student_vit():
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=4, img_size=16, masked_embed=True).eval()
    with torch.no_grad():
        vit.masked_embed.normal_()
    return vit


@FEW
@given(seed=st.integers(0, 2**16))
def test_masked_pixels_do_not_matter_unmasked_ones_do(student_vit, seed):
    gen = torch.Generator().manual_seed(seed)
    p, side = 4, 4
    x = torch.randn(2, 3, 16, 16, generator=gen)
    mask = torch.rand(2, side * side, generator=gen) < 0.4
    mask[:, 5] = True  # patch (1, 1) masked,
    mask[:, 10] = False  # patch (2, 2) not
    with torch.no_grad():
        ref = student_vit(x, mask)
        y = x.clone()
        for b in range(2):
            for n in mask[b].nonzero().flatten().tolist():
                i, j = divmod(n, side)
                y[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = torch.randn(3, p, p, generator=gen) * 5
        assert torch.equal(student_vit(y, mask), ref)
        z = x.clone()
        z[:, :, 2 * p:3 * p, 2 * p:3 * p] += 1.0  # unmasked patch n = 2 * 4 + 2
        assert (student_vit(z, mask) - ref).abs().max() > 1e-3


def test_sdpa_equals_plain_attention(student_vit):
    attn = student_vit.blocks[1].attn
    B, T, D, H = 2, 7, student_vit.embed_dim, student_vit.num_heads
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = attn.qkv(x).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)[2]  # timm's layout: (B, H, T, d)
        a = attn.attention_map(x)
        manual = attn.proj((a @ v).transpose(1, 2).reshape(B, T, D))
        torch.testing.assert_close(attn(x), manual, atol=1e-5, rtol=1e-5)


def test_selfattention_and_intermediate_layers(student_vit):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        att = student_vit.get_last_selfattention(x)
        assert att.shape == (2, student_vit.num_heads, 17, 17)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, student_vit.num_heads, 17))
        layers = student_vit.get_intermediate_layers(x, 2)
        assert len(layers) == 2
        torch.testing.assert_close(layers[-1], student_vit(x))
        assert not torch.allclose(layers[0], layers[1])


def test_position_embeddings_interpolate():
    torch.manual_seed(0)
    vit = M.vit_nano(patch_size=8, img_size=32).eval()
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 36, vit.embed_dim)
        assert vit(torch.randn(1, 3, 32, 48)).shape == (1, 1 + 4 * 6, vit.embed_dim)
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 1 + 16, vit.embed_dim)
        # the [CLS] position is kept, the grid is resampled (bicubic) to the new size
        pos = vit.interpolate_pos_embed(6, 6)
        assert pos.shape == (1, 37, vit.embed_dim) and torch.equal(pos[:, 0], vit.pos_embed[:, 0])
        assert torch.equal(vit.interpolate_pos_embed(4, 4), vit.pos_embed)


def test_vit_input_errors(student_vit):
    with pytest.raises(ValueError, match="divisible"):
        student_vit(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="divisible"):
        M.vit_nano(patch_size=4, img_size=30)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="mask"):
        student_vit(x, torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        student_vit(x, torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="masked_embed"):
        M.vit_nano(patch_size=4, img_size=16)(x, torch.zeros(2, 16, dtype=torch.bool))


@FEW
@given(patch=st.sampled_from([2, 4]), dim=st.sampled_from([16, 40, 128]), seed=st.integers(0, 2**16))
def test_whitened_patch_embedding_decorrelates_the_patches(patch, dim, seed):
    """The first min(2P, D) channels are +-v_i / sqrt(lambda_i + eps), largest lambda first: on the images they
    were fitted to (every patch, stride 1) they have zero mean and covariance lambda_i / (lambda_i + eps), pairs
    are negations, and the other channels keep their initial weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, 12, 12, generator=gen).cumsum(-1) / 3  # neighbouring pixels correlated
    embed = M.PatchEmbed(patch, 3, dim)
    before = embed.proj.weight.detach().clone()
    M.whiten_patch_embed(embed, x)
    P = 3 * patch * patch
    n = min(2 * P, dim)
    y = F.conv2d(x.double(), embed.proj.weight.double(), embed.proj.bias.double())  # every patch, stride 1
    y = y.transpose(0, 1).flatten(1)  # (D, patches)
    torch.testing.assert_close(y[:n].mean(1), torch.zeros(n, dtype=torch.double), atol=1e-4, rtol=0)
    torch.testing.assert_close(embed.proj.weight[1:n:2], -embed.proj.weight[0:n:2])
    patches = F.unfold(x.double(), patch).transpose(1, 2).flatten(0, 1)  # (patches, P)
    lam = torch.linalg.eigvalsh(torch.cov(patches.T, correction=0)).flip(0)[: (n + 1) // 2]
    cov = torch.cov(y[0:n:2], correction=0)  # one channel of each pair
    torch.testing.assert_close(cov, torch.diag(lam / (lam + 5e-4)), atol=1e-4, rtol=1e-4)
    assert torch.equal(embed.proj.weight[n:], before[n:])
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        M.whiten_patch_embed(embed, x[:, :1])


def test_parameter_names_and_drop_path_rates():
    vit = M.vit_nano(patch_size=4, img_size=16, masked_embed=True, drop_path_rate=0.3)
    names = set(dict(vit.named_parameters()))
    for n in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
              "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight",
              "masked_embed"]:
        assert n in names, n
    assert vit.masked_embed.shape == (1, vit.embed_dim)
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.norm.eps == 1e-6
    rates = [blk.drop_path for blk in vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------------------------------
# ---- 5. EMA teacher, schedules, parameter groups ----


def test_ema_update():
    model = _tiny_model(shared_head=False)
    student = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    teacher0 = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    assert "backbone.masked_embed" in student and "backbone.masked_embed" not in teacher0
    assert any(not torch.equal(student[n], teacher0[n]) for n in teacher0)

    M.ema_update(model.teacher, model.student, 1.0)
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher0[n]), n
    M.ema_update(model.teacher, model.student, 0.5)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.5 * teacher0[n] + 0.5 * student[n], msg=n)
    M.ema_update(model.teacher, model.student, 0.0)
    for n, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, student[n], msg=n)
    for n, p in model.student.named_parameters():
        assert torch.equal(p, student[n]), n  # the student is only read


@FAST
@given(base=st.floats(-2, 2), final=st.floats(-2, 2), start=st.floats(-2, 2), total=st.integers(1, 40),
       warmup=st.integers(0, 39))
def test_cosine_schedule(base, final, start, total, warmup):
    s = M.cosine_schedule(base, final, total, warmup, start)
    assert s.shape == (total,)
    if warmup >= total:
        return  # a warm-up longer than the run: see test_cosine_schedule_clipped_warmup
    n = total - warmup
    assert float(s[-1]) == final
    if warmup > 0:
        assert float(s[0]) == start
    if warmup >= 2:  # a straight line from warmup_start that reaches base at the warm-up's last step
        assert math.isclose(float(s[warmup - 1]), base, abs_tol=1e-12)
        steps = s[:warmup].diff()
        assert torch.allclose(steps, torch.full_like(steps, (base - start) / (warmup - 1)), atol=1e-12)
    if n >= 2:
        assert math.isclose(float(s[warmup]), base, abs_tol=1e-12)
        lo, hi = min(base, final), max(base, final)
        assert torch.all((s[warmup:] >= lo - 1e-12) & (s[warmup:] <= hi + 1e-12))
        diffs = s[warmup:].diff() * (1 if final >= base else -1)
        assert torch.all(diffs >= -1e-12)  # monotone from base to final
        mid = (n - 1) / 2
        if float(mid).is_integer():
            assert math.isclose(float(s[warmup + int(mid)]), (base + final) / 2, abs_tol=1e-12)


def test_cosine_schedule_clipped_warmup():
    """docs/method.md: 'clips every warm-up to the run length and ends every schedule exactly at its final value'."""
    s = M.cosine_schedule(1.0, 0.25, total_steps=5, warmup_steps=10, warmup_start=0.0)
    assert s.shape == (5,)  # no crash and the right length (the official code fails its assert here)
    assert float(s[-1]) == 0.25, s.tolist()


@FAST
@given(start=st.floats(0.01, 0.1), end=st.floats(0.01, 0.1), warmup=st.integers(2, 20), total=st.integers(1, 40),
       hold=st.integers(0, 10))
def test_linear_warmup(start, end, warmup, total, hold):
    s = M.linear_warmup(start, end, warmup, total, hold)
    assert s.shape == (total,)
    h = min(hold, total)
    assert torch.all(s[:h] == start)
    ramp = min(warmup, total - h)
    if ramp >= 2:
        assert float(s[h]) == start and float(s[h + ramp - 1]) == end
        steps = s[h:h + ramp].diff()
        assert torch.allclose(steps, torch.full_like(steps, (end - start) / (ramp - 1)), atol=1e-12)
    assert torch.all(s[h + ramp:] == end)
    if warmup <= total - h:
        assert float(s[-1]) == end


def test_linear_warmup_recipe_and_short_runs():
    s = M.linear_warmup(0.04, 0.07, warmup_steps=30, total_steps=100)
    assert float(s[0]) == 0.04 and float(s[29]) == 0.07 and float(s[28]) < 0.07 and torch.all(s[29:] == 0.07)
    held = M.linear_warmup(0.04, 0.07, warmup_steps=30, total_steps=100, hold_steps=10)
    assert torch.all(held[:11] == 0.04) and float(held[39]) == 0.07
    # a run shorter than the ramp is clipped and still ends at its final value (docs/method.md)
    assert float(M.linear_warmup(0.04, 0.07, warmup_steps=30, total_steps=5)[-1]) == 0.07
    assert float(M.linear_warmup(0.04, 0.07, warmup_steps=30, total_steps=1)[-1]) == 0.07


def test_param_groups():
    torch.manual_seed(0)
    model = M.IBOT(_tiny_cfg(shared_head=False))
    decay, no_decay = M.param_groups(model.student)
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    named = dict(model.student.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    decay_names = {name_of[id(p)] for p in decay["params"]}
    no_decay_names = {name_of[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert decay_names | no_decay_names == {n for n, p in named.items() if p.requires_grad}
    for n in ["backbone.cls_token", "backbone.pos_embed", "backbone.masked_embed", "head.last_layer.weight_g",
              "head.last_layer2.weight_g", "backbone.blocks.0.attn.qkv.weight", "head.last_layer.weight_v"]:
        assert n in decay_names, n
    for n in ["backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.norm.weight",
              "backbone.patch_embed.proj.bias", "head.mlp.0.bias"]:
        assert n in no_decay_names, n
    # norm_last_layer freezes the gain: it is not trained, so it is in neither group
    frozen = M.IBOT(M.IBOTConfig(**{**_tiny_cfg(True).__dict__, "norm_last_layer": True}))
    ids = {id(p) for grp in M.param_groups(frozen.student) for p in grp["params"]}
    assert id(frozen.student.head.last_layer.weight_g) not in ids


# ---------------------------------------------------------------------------------------------------
# ---- 6. load_backbone ----


def _outputs_equal(a, b, x, mask=None, atol=1e-6):
    with torch.no_grad():
        ya = a.eval()(x, mask) if mask is not None else a.eval()(x)
        yb = b.eval()(x, mask) if mask is not None else b.eval()(x)
    torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-5)


def test_load_backbone_our_checkpoint(tmp_path):
    model = _tiny_model(shared_head=True)
    path = tmp_path / "ours.pth"
    torch.save(model.checkpoint(), path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True

    teacher = C.load_backbone(path)
    assert teacher.masked_embed is None
    _outputs_equal(teacher, model.teacher.backbone, x)
    student = C.load_backbone(str(path), which="student")
    assert student.masked_embed is not None
    _outputs_equal(student, model.student.backbone, x, mask)
    with torch.no_grad():
        assert not torch.allclose(teacher(x), student(x))  # it did pick the one asked for


def _official_checkpoint(seed=0):
    torch.manual_seed(seed)
    # ViT-S (384 wide, 6 heads of 64, 12 blocks) at 32 px to keep it quick
    student = M.vit_small(patch_size=16, img_size=32, masked_embed=True)
    teacher = M.vit_small(patch_size=16, img_size=32)
    with torch.no_grad():
        student.masked_embed.normal_()
        for p in teacher.parameters():
            p.normal_(0, 0.02)
    head_s, head_t = M.IBOTHead(384, 32, 32, hidden_dim=16, bottleneck_dim=8), M.IBOTHead(384, 32, 32, hidden_dim=16,
                                                                                           bottleneck_dim=8)
    ckpt = {
        "student": {**{"module.backbone." + k: v for k, v in student.state_dict().items()},
                    **{"module.head." + k: v for k, v in head_s.state_dict().items()}},
        "teacher": {**{"backbone." + k: v for k, v in teacher.state_dict().items()},
                    **{"head." + k: v for k, v in head_t.state_dict().items()}},
        "ibot_loss": {"center": torch.zeros(1, 32), "center2": torch.zeros(1, 1, 32)},
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "epoch": 3,
    }
    return ckpt, student, teacher


def test_load_backbone_official_layout(tmp_path):
    ckpt, student, teacher = _official_checkpoint()
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = C.load_backbone(path)
    assert loaded.num_heads == 6 and len(loaded.blocks) == 12 and loaded.masked_embed is None
    _outputs_equal(loaded, teacher, x, atol=1e-5)
    loaded_s = C.load_backbone(path, which="student")
    assert loaded_s.masked_embed is not None
    torch.testing.assert_close(loaded_s.masked_embed, student.masked_embed)
    _outputs_equal(loaded_s, student, x, atol=1e-5)


def test_load_backbone_only_exports(tmp_path):
    torch.manual_seed(1)
    vit = M.vit_nano(patch_size=4, img_size=16, masked_embed=True)
    x = torch.randn(1, 3, 16, 16)
    sd = vit.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    for source in (sd, {"state_dict": sd}, tmp_path / "wrapped.pth"):
        loaded = C.load_backbone(source, num_heads=2)  # a bare state dict does not say its head count
        assert loaded.masked_embed is not None  # student exports keep it
        _outputs_equal(loaded, vit, x)


def test_load_backbone_timm_state_dict():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = C.load_backbone({"arch": "vit_small_patch16_224", "state_dict": ref.state_dict()}).eval()  # timm's saver
    assert ours.num_heads == 6
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_features(x), atol=1e-5, rtol=1e-4)


def test_load_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match="weird_key"):
        C.load_backbone({"weird_key": torch.zeros(3), "other": torch.ones(2)})
    with pytest.raises(FileNotFoundError):
        C.load_backbone(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="which"):
        C.load_backbone({}, which="both")


# ---------------------------------------------------------------------------------------------------
# ---- 7. bad input fails loudly ----


def test_loss_input_errors():
    g, l, B, N, K = 2, 2, 3, 4, 5
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(0, g, l, B, N, K, K)
    loss = make_loss(g, l, K, K)
    with pytest.raises(ValueError, match="student_cls with"):
        loss(s_cls[:-B], s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    with pytest.raises(ValueError, match="student_cls with"):
        make_loss(3, 1, K, K)(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.07)
    with pytest.raises(ValueError, match="masks"):
        loss(s_cls, s_patch, t_cls, t_patch, masks[:, :-1], 0.05, 0.07)
    with pytest.raises(ValueError, match="teacher_patch"):
        loss(s_cls, s_patch, t_cls, t_patch[:, :-1], masks, 0.05, 0.07)
    with pytest.raises(ValueError, match="bool"):
        loss(s_cls, s_patch, t_cls, t_patch, masks.long(), 0.05, 0.07)
    with pytest.raises(ValueError, match="crops"):
        M.IBOTLoss(K, K, 1, 0)


def test_config_errors():
    with pytest.raises(ValueError, match="patch_out_dim"):
        M.IBOTConfig(shared_head=True, out_dim=64, patch_out_dim=32)
    with pytest.raises(ValueError, match="vit_huge.*expected"):
        M.IBOTConfig(arch="vit_huge")
    M.IBOTConfig(shared_head=False, out_dim=64, patch_out_dim=32)  # fine with separate heads


# ---------------------------------------------------------------------------------------------------
# ---- 8. multi-crop views ----


def test_multicrop_augmentation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    aug = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=2, local_crops=3, patch_size=4,
                                   blur=False, mask_ratios=(0.3,), mask_ratio_vars=(0.1,))
    crops, masks = aug(img, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert masks.shape == (2, 8, 8) and masks.dtype == torch.bool and masks.any()
    crops2, masks2 = aug(img, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(crops, crops2)) and torch.equal(masks, masks2)
    crops3, masks3 = aug(img, torch.Generator().manual_seed(1))
    assert not torch.equal(crops[0], crops3[0])
    _, no_masks = aug(img, torch.Generator().manual_seed(0), masking=False)
    assert no_masks.shape == (2, 8, 8) and not no_masks.any()


# ---------------------------------------------------------------------------------------------------
# ---- 9. kNN ----


def test_knn_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=gen), dim=-1)

    def sample(n):
        y = torch.arange(n) % 5
        return F.normalize(centres[y] + 0.05 * torch.randn(n, 16, generator=gen), dim=-1), y

    (xtr, ytr), (xte, yte) = sample(100), sample(50)
    assert M.knn_classify(xtr, ytr, xte, yte, ks=(1, 10, 20, 100)) == {1: 100.0, 10: 100.0, 20: 100.0, 100: 100.0}


def test_knn_random_labels_near_chance():
    gen = torch.Generator().manual_seed(0)
    xtr = F.normalize(torch.randn(2000, 32, generator=gen), dim=-1)
    xte = F.normalize(torch.randn(1000, 32, generator=gen), dim=-1)
    ytr, yte = torch.randint(0, 10, (2000,), generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    acc = M.knn_classify(xtr, ytr, xte, yte, ks=(10, 20), chunk=300)
    assert all(4.0 <= a <= 16.0 for a in acc.values()), acc  # chance 10%, sd ~1%


def test_knn_votes_are_weighted_and_k_is_capped():
    e0, e1, e2, e3 = torch.eye(4)
    unit = lambda sim, other: sim * e0 + math.sqrt(1 - sim**2) * other  # noqa: E731
    bank = torch.stack([unit(0.9, e1), unit(0.8, e2), unit(0.8, e3)])
    labels = torch.tensor([0, 1, 1])
    test, y = e0[None], torch.tensor([0])
    # exp(0.9/0.07) > 2 exp(0.8/0.07): the closest neighbour outvotes the two farther ones
    assert M.knn_classify(bank, labels, test, y, ks=(3,), num_classes=2) == {3: 100.0}
    assert M.knn_classify(bank, labels, test, y, ks=(3,), temperature=10.0, num_classes=2) == {3: 0.0}
    # k beyond the bank is capped at its size, and gives what k = bank size gives
    assert M.knn_classify(bank, labels, test, y, ks=(1, 10, 200), temperature=10.0) == {1: 100.0, 3: 0.0}


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.integers(2, 70), st.integers(0, 1000))
def test_plain_attention_path_equals_sdpa_with_gradients(batch, heads, length, seed):
    # the bf16 CPU path of Attention (matmul + softmax) computes SDPA's attention: values and gradients
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, 16, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    plain = M.Attention.attention_weights(q, k) @ v
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(plain, sdpa, atol=1e-10)
    w = torch.randn(plain.shape, generator=gen, dtype=torch.float64)
    g_plain = torch.autograd.grad((plain * w).sum(), (q, k, v))
    g_sdpa = torch.autograd.grad((sdpa * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_plain, g_sdpa))


def test_attention_picks_the_plain_path_for_bf16_on_cpu_and_agrees_with_fp32():
    torch.manual_seed(0)
    attn = M.Attention(64, 2)
    x = torch.randn(4, 17, 64)
    reference = attn(x)  # fp32: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x)  # bf16 on a CPU: matmul + softmax
    assert fast.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), reference, atol=0.02, rtol=0.05)
    calls = []
    real = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        attn(x)
        assert calls == [1]  # fp32 takes SDPA
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attn(x)
        assert calls == [1]  # bf16 on a CPU does not
    finally:
        F.scaled_dot_product_attention = real


# ---------------------------------------------------------------------------------------------------
# ---- speed-ups: each equal to the plain computation ----


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), training=st.booleans())
def test_tokens_read_are_the_full_outputs_rows(seed, training):
    """tokens_read skips the last block's MLP for the tokens nobody reads: the rows it returns are the full
    output's rows, drop path (the same per-image draws) and gradients included."""
    gen = torch.Generator().manual_seed(seed)
    vit = M.vit_nano(patch_size=4, img_size=16, masked_embed=True, drop_path_rate=0.5).train(training)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    mask = torch.rand(6, 16, generator=gen) < 0.3
    rows = torch.rand(6, 17, generator=gen) < 0.4
    rows[0] = False  # an image with no row read
    torch.manual_seed(seed)
    full = vit(x, mask=mask)[rows]
    (g_full,) = torch.autograd.grad(full.square().sum(), vit.blocks[0].mlp.fc1.weight)
    torch.manual_seed(seed)
    part = M.tokens_read(vit, x, mask, rows)
    (g_part,) = torch.autograd.grad(part.square().sum(), vit.blocks[0].mlp.fc1.weight)
    assert part.shape == (int(rows.sum()), vit.embed_dim)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_part, g_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_head, drop_path", [(True, 0.0), (False, 0.5)])
def test_speedups_give_the_plain_step(shared_head, drop_path):
    """IBOT(speedups=True) against IBOT(speedups=False) with the same weights: loss terms, centres and every
    student gradient, drop path on (both draw the same keeps in the same order)."""
    cfg = _tiny_cfg(shared_head, drop_path=drop_path)
    torch.manual_seed(0)
    fast = M.IBOT(cfg, speedups=True)
    plain = M.IBOT(cfg, speedups=False)
    plain.load_state_dict(fast.state_dict())
    assert type(fast.student) is M.ReadOnlyStudent and type(plain.student) is M.MultiCropStudent
    global_crops, local_crops, masks = _batch(2)
    outs, grads = [], []
    for model in (fast, plain):
        torch.manual_seed(5)
        out = model(global_crops, local_crops, masks, 0.05, 0.06)
        out["loss"].backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.student.named_parameters() if p.grad is not None})
    for key in ("cls", "patch", "loss"):
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss.center, plain.loss.center)
    torch.testing.assert_close(fast.loss.patch_center, plain.loss.patch_center, atol=1e-6, rtol=1e-5)
    assert set(grads[0]) == set(grads[1]) and "backbone.masked_embed" in grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)
