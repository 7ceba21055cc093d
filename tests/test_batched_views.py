"""The on-device data path (BatchedMultiCrop, batched masks) against the per-image CPU path, Sinkhorn-Knopp
centring, and a CUDA check that runs only where a GPU is present."""

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import batched_views as BV
import ibot_min as M


@pytest.mark.parametrize("side, ratio", [(14, 0.1), (14, 0.3), (8, 0.2), (8, 0.5)])
def test_batched_block_masks_match_the_sequential_distribution(side, ratio):
    gen = torch.Generator().manual_seed(0)
    batched = BV.block_masks_batched(torch.full((2000,), ratio), side, side, gen)
    sequential = torch.stack([M.block_mask(side, side, ratio, gen) for _ in range(600)])
    assert (batched.flatten(1).sum(1) <= ratio * side * side).all()
    assert abs(batched.float().mean() - sequential.float().mean()) < 0.01
    # blocks, not scattered patches: the share of masked 4-neighbours of masked patches agrees too
    def neighbours(m):
        m = m.float()
        n = torch.zeros_like(m)
        n[:, 1:] += m[:, :-1]
        n[:, :-1] += m[:, 1:]
        n[:, :, 1:] += m[:, :, :-1]
        n[:, :, :-1] += m[:, :, 1:]
        return (n * m).sum() / m.sum().clamp(min=1)
    assert abs(neighbours(batched) - neighbours(sequential)) < 0.15


def test_batched_masks_edge_cases():
    gen = torch.Generator().manual_seed(1)
    assert not BV.block_masks_batched(torch.zeros(5), 8, 8, gen).any()
    ratios = torch.tensor([0.0, 0.1, 0.25, 0.49])
    counts = BV.random_masks_batched(ratios, 8, 8, gen).flatten(1).sum(1)
    assert counts.tolist() == [int(r * 64) for r in ratios.tolist()]
    r = BV.sample_ratios(4000, (0.0, 0.3), (0.0, 0.2), gen)
    assert 0.45 < (r == 0).float().mean() < 0.55 and ((r == 0) | ((r >= 0.1) & (r <= 0.5))).all()


@settings(max_examples=20, deadline=None)
@given(b=st.floats(0.6, 1.4), c=st.floats(0.6, 1.4), s=st.floats(0.8, 1.2), h=st.floats(-0.1, 0.1), seed=st.integers(0, 99))
def test_colour_jitter_matches_torchvision(b, c, s, h, seed):
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[0], b), c), s), h)
    ours = BV.colour_jitter(x, torch.tensor([b]), torch.tensor([c]), torch.tensor([s]), torch.tensor([h]))[0]
    assert torch.allclose(ours, ref, atol=1e-4)


def test_gaussian_blur_matches_torchvision_and_keeps_constants():
    x = torch.rand(2, 3, 16, 16)
    sigma = torch.tensor([0.7, 1.5])
    ours = BV.gaussian_blur(x, sigma, radius=4)
    for i in range(2):
        ref = TF.gaussian_blur(x[i], kernel_size=9, sigma=float(sigma[i]))
        assert torch.allclose(ours[i], ref, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(BV.gaussian_blur(flat, torch.tensor([2.0]), radius=3), flat)


def test_crop_boxes_follow_random_resized_crop():
    gen = torch.Generator().manual_seed(2)
    aug = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=2, local_crops=2, patch_size=4, blur=False)
    boxes = BV.BatchedMultiCrop(aug).crop_boxes(4000, 32, 32, (0.14, 1.0), gen, "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    ref = torch.tensor([M.random_resized_crop_params(32, 32, (0.14, 1.0), generator=gen)[2:] for _ in range(4000)],
                       dtype=torch.float)
    area, ref_area = (w * h / 1024), ref[:, 0] * ref[:, 1] / 1024
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    log_aspect, ref_log_aspect = torch.log(w / h), torch.log(ref[:, 1] / ref[:, 0])
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02
    assert abs(log_aspect.std() - ref_log_aspect.std()) < 0.02


def test_batched_multicrop_shapes_statistics_and_seeding():
    aug = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=2, local_crops=3, patch_size=4, blur=True)
    views = BV.BatchedMultiCrop(aug)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    glob, local, masks = views(images, torch.Generator().manual_seed(5))
    assert glob.shape == (16, 3, 32, 32) and local.shape == (24, 3, 16, 16) and masks.shape == (16, 64)
    again = views(images, torch.Generator().manual_seed(5))
    assert torch.equal(glob, again[0]) and torch.equal(local, again[1]) and torch.equal(masks, again[2])
    _, _, no_masks = views(images, torch.Generator().manual_seed(5), masking=False)
    assert not no_masks.any()
    # the same colour statistics as the PIL path over many views of one image (pixel means agree)
    from PIL import Image
    img = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    globals_only = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=1, local_crops=0, patch_size=4,
                                          blur=True)
    gen = torch.Generator().manual_seed(6)
    cpu = torch.stack([globals_only(img, gen)[0][0] for _ in range(300)])
    gpu = BV.BatchedMultiCrop(globals_only)(images[:1].expand(300, -1, -1, -1), torch.Generator().manual_seed(7))[0]
    assert torch.allclose(cpu.mean((0, 2, 3)), gpu.mean((0, 2, 3)), atol=0.08)
    assert torch.allclose(cpu.std((0, 2, 3)), gpu.std((0, 2, 3)), atol=0.08)


def test_sinkhorn_knopp_balances_prototypes():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 16, generator=gen) * 3
    Q = M.sinkhorn_knopp(scores, iterations=30)
    assert torch.allclose(Q.sum(1), torch.ones(64), atol=1e-5)  # each row a distribution
    assert torch.allclose(Q.sum(0), torch.full((16,), 64 / 16), atol=1e-3)  # each prototype used equally
    assert torch.allclose(M.sinkhorn_knopp(scores + 5.0), M.sinkhorn_knopp(scores), atol=1e-6)


def test_sinkhorn_loss_uses_balanced_targets():
    gen = torch.Generator().manual_seed(4)
    B, K, N = 6, 8, 4
    loss = M.IBOTLoss(K, K, 2, 1, centering="sinkhorn")
    s_cls, t_cls = torch.randn(3 * B, K, generator=gen), torch.randn(2 * B, K, generator=gen)
    s_patch, t_patch = torch.randn(2 * B, N, K, generator=gen), torch.randn(2 * B, N, K, generator=gen)
    masks = torch.rand(2 * B, N, generator=gen) < 0.5
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, 0.05, 0.05)
    P = M.sinkhorn_knopp(t_cls / 0.05).view(2, B, K)
    log_s = torch.log_softmax(s_cls / 0.1, -1).view(3, B, K)
    expected = -sum((P[u] * log_s[v]).sum(-1).mean() for u in range(2) for v in range(3) if v != u) / 4
    assert torch.allclose(out["cls"], expected, atol=1e-5)
    Q = M.sinkhorn_knopp(t_patch[masks] / 0.05)
    ce = -(Q * torch.log_softmax(s_patch[masks] / 0.1, -1)).sum(-1)
    per_image = torch.zeros(2 * B).index_add_(0, masks.nonzero()[:, 0], ce) / masks.sum(1).clamp(min=1)
    assert torch.allclose(out["patch"], per_image.mean(), atol=1e-5)
    with pytest.raises(ValueError, match="centering"):
        M.IBOTLoss(K, K, 2, 1, centering="softmax")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_step_matches_cpu_fp32():
    torch.manual_seed(0)
    cfg = M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=32, out_dim=256, patch_out_dim=256, local_crops=2,
                       drop_path=0.0)
    model = M.IBOT(cfg)
    aug = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=2, local_crops=2, patch_size=4, blur=False)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    glob, local, masks = BV.BatchedMultiCrop(aug)(images, torch.Generator().manual_seed(0))
    cpu = model(glob, local, masks, 0.04, 0.04)["loss"]
    model.cuda()
    model.loss.center.zero_()
    model.loss.patch_center.zero_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = model(glob.cuda(), local.cuda(), masks.cuda(), 0.04, 0.04)["loss"]
    assert math.isclose(float(cpu), float(gpu), rel_tol=0.02)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = BV.BatchedMultiCrop(aug)(images.cuda(), gen)
    assert out[0].is_cuda and out[2].shape == (32, 64)
