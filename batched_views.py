"""Multi-crop views and masks for a whole batch at once, on the images' device: the fast data path.

ibot_min.MultiCropAugmentation and ibot_min.block_mask define the distributions (per image, with PIL); this
module draws from the same distributions for a batch of decoded uint8 images in a few tensor ops, so small
images (CIFAR) need no CPU loader workers. tests/test_batched_views.py compares the two.

Named deviations: crops are resized by bilinear roi_align rather than bicubic, the colour-jitter operations run
in a fixed order rather than a random one, and the blur is a sampled Gaussian kernel rather than PIL's.
"""

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ibot_min import MultiCropAugmentation

# ---------------------------------------------------------------------------------------------------
# ---- masks for a batch of crops (ibot_min.sample_ratio / block_mask / random_mask, vectorised) ----


def sample_ratios(n: int, ratios=(0.0, 0.3), ratio_vars=(0.0, 0.2), generator: torch.Generator | None = None,
                  device="cpu") -> torch.Tensor:
    """sample_ratio for n crops at once -> (n,) float."""
    lo = torch.tensor([r - v for r, v in zip(ratios, ratio_vars)], device=device)
    hi = torch.tensor([r + v for r, v in zip(ratios, ratio_vars)], device=device)
    pick = torch.randint(len(ratios), (n,), generator=generator, device=device)
    return lo[pick] + (hi[pick] - lo[pick]) * torch.rand(n, generator=generator, device=device)


def block_masks_batched(ratios: torch.Tensor, height: int, width: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """block_mask for a batch of crops at once, on the ratios' device -> (n, height, width) bool.

    The same distribution as block_mask: each round tries 10 rectangles per mask against the same mask, so
    they are drawn together and the first that fits is kept (failed tries change nothing, so order is kept)."""
    n, dev = ratios.shape[0], ratios.device
    mask = torch.zeros(n, height, width, dtype=torch.bool, device=dev)
    target, count = ratios.float() * height * width, torch.zeros(n, device=dev)
    min_area = (min(height, width) // 3) ** 2
    rows = torch.arange(height, device=dev)[None, :, None]
    cols = torch.arange(width, device=dev)[None, None, :]

    def rand():
        return torch.rand(n, 10, generator=generator, device=dev)

    active = count < target
    while bool(active.any()):  # one round per rectangle; a few rounds per batch
        room = (target - count)[:, None]  # (n, 1)
        area = min_area + (room - min_area) * rand()
        aspect = torch.exp(math.log(0.3) + 2 * math.log(1 / 0.3) * rand())
        bh, bw = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
        fits = (bh < height) & (bw < width)
        top = (rand() * (height - bh + 1).clamp(min=1)).long()
        left = (rand() * (width - bw + 1).clamp(min=1)).long()
        # patches already masked inside each rectangle, from an integral image: (n, 10)
        integral = F.pad(mask.long().cumsum(1).cumsum(2), (1, 0, 1, 0))
        bottom, right = (top + bh).clamp(max=height), (left + bw).clamp(max=width)

        def at(i, j):
            return integral.flatten(1).gather(1, i * (width + 1) + j)

        new = bh * bw - (at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left))
        ok = fits & (new > 0) & (new <= room) & active[:, None]
        first = ok.float().argmax(1, keepdim=True)  # the first try that fits
        added = ok.any(1)

        def pick(t):
            return t.gather(1, first)[:, :, None]  # (n, 1, 1)

        rect = (rows >= pick(top)) & (rows < pick(bottom)) & (cols >= pick(left)) & (cols < pick(right))
        mask |= rect & added[:, None, None]
        count += torch.where(added, new.gather(1, first)[:, 0], 0).float()
        active = added & (count < target)
    return mask


def random_masks_batched(ratios: torch.Tensor, height: int, width: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """random_mask for a batch: exactly int(r * h * w) patches each -> (n, height, width) bool."""
    n, N = ratios.shape[0], height * width
    rank = torch.rand(n, N, generator=generator, device=ratios.device).argsort(1).argsort(1)
    return (rank < (ratios * N).long()[:, None]).view(n, height, width)


# ---------------------------------------------------------------------------------------------------
# ---- colour operations and the batched multi-crop ----


def _gray(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma as torchvision
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by shift (B,) turns, through HSV."""
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    red, green, blue = x.unbind(1)
    h = torch.where(maxc == red, (green - blue) / safe,
                    torch.where(maxc == green, 2 + (blue - red) / safe, 4 + (red - green) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift[:, None, None]) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    k = (torch.stack([5.0 + 6 * h, 3.0 + 6 * h, 1.0 + 6 * h], 1)) % 6  # HSV -> RGB without branches
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def colour_jitter(x, brightness, contrast, saturation, hue):
    """torchvision's four jitter operations with per-image factors (B,), in this fixed order."""
    def blend(a, b, f):
        return (f[:, None, None, None] * a + (1 - f[:, None, None, None]) * b).clamp(0, 1)

    x = (x * brightness[:, None, None, None]).clamp(0, 1)
    x = blend(x, _gray(x).mean((1, 2, 3), keepdim=True), contrast)
    x = blend(x, _gray(x), saturation)
    return _shift_hue(x, hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (B,); reflect padding."""
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    return F.conv2d(y, k[:, None, :, None], groups=B * C).view(B, C, H, W)


class BatchedMultiCrop:
    """MultiCropAugmentation for a whole batch of uint8 images at once, on their device (the GPU data path).

    The same distributions, drawn from one generator. Named deviations: crops are resized by bilinear
    roi_align rather than bicubic, the colour-jitter operations run in a fixed order rather than a random one,
    and the blur is a sampled Gaussian kernel of radius 3 sigma_max rather than PIL's."""

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug

    def _uniform(self, n, a, b, gen, device):
        return a + (b - a) * torch.rand(n, generator=gen, device=device)

    def crop_boxes(self, n: int, height: int, width: int, scale, gen, device) -> torch.Tensor:
        """random_resized_crop_params for n crops -> (n, 4) boxes (x1, y1, x2, y2) in pixels."""
        area = height * width
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=gen, device=device)
        log_r = math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, 10, generator=gen, device=device)
        w = torch.round(torch.sqrt(area * s * log_r.exp()))
        h = torch.round(torch.sqrt(area * s / log_r.exp()))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.float().argmax(1, keepdim=True)
        # no try fits: the whole image (the centre-crop fallback for images of aspect ratio within [3/4, 4/3])
        w = torch.where(ok.any(1), w.gather(1, first)[:, 0], float(width))
        h = torch.where(ok.any(1), h.gather(1, first)[:, 0], float(height))
        top = torch.floor(torch.rand(n, generator=gen, device=device) * (height - h + 1))
        left = torch.floor(torch.rand(n, generator=gen, device=device) * (width - w + 1))
        return torch.stack([left, top, left + w, top + h], 1)

    def views(self, x: torch.Tensor, size: int, scale, p_blur: float, p_solarize: float, gen) -> torch.Tensor:
        """float images in [0, 1] (B, 3, H, W) -> one augmented view each, (B, 3, size, size), not yet normalised."""
        B, dev = x.shape[0], x.device
        boxes = self.crop_boxes(B, x.shape[-2], x.shape[-1], scale, gen, dev)
        rois = torch.cat([torch.arange(B, device=dev, dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
        v = roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)  # (B, 3, S, S)

        def coin(p):
            return torch.rand(B, generator=gen, device=dev) < p

        v = torch.where(coin(0.5)[:, None, None, None], v.flip(-1), v)
        jitter = coin(0.8)  # a neutral factor leaves an image unchanged
        ones = torch.ones(B, device=dev)
        v = colour_jitter(v, torch.where(jitter, self._uniform(B, 0.6, 1.4, gen, dev), ones),
                          torch.where(jitter, self._uniform(B, 0.6, 1.4, gen, dev), ones),
                          torch.where(jitter, self._uniform(B, 0.8, 1.2, gen, dev), ones),
                          torch.where(jitter, self._uniform(B, -0.1, 0.1, gen, dev), 0 * ones))
        v = torch.where(coin(0.2)[:, None, None, None], _gray(v).expand_as(v), v)
        if self.aug.blur and p_blur > 0:
            blurred = gaussian_blur(v, self._uniform(B, 0.1, 2.0, gen, dev), radius=min(6, size // 2 - 1))
            v = torch.where(coin(p_blur)[:, None, None, None], blurred, v)
        if p_solarize > 0:
            v = torch.where(coin(p_solarize)[:, None, None, None] & (v >= 128 / 255), 1 - v, v)
        return v

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, masking: bool = True):
        """uint8 images (B, 3, H, W) -> global (g*B, 3, G, G), local (l*B, 3, L, L) or None, masks (g*B, N);
        crop-major, as the loader's collate gives them."""
        a, gen = self.aug, generator
        x = images.float() / 255
        mean = torch.tensor(a.mean, device=x.device)[None, :, None, None]
        std = torch.tensor(a.std, device=x.device)[None, :, None, None]
        glob = torch.cat([self.views(x, a.global_size, a.global_scale, 1.0 if i == 0 else 0.1,
                                     0.0 if i == 0 else 0.2, gen) for i in range(a.global_crops)])
        glob = (glob - mean) / std
        local = (torch.cat([self.views(x, a.local_size, a.local_scale, 0.5, 0.0, gen) for _ in range(a.local_crops)])
                 - mean) / std if a.local_crops else None
        n = glob.shape[0]
        ratios = sample_ratios(n, a.mask_ratios, a.mask_ratio_vars, gen, x.device)
        if not masking:
            ratios = torch.zeros_like(ratios)
        make = block_masks_batched if a.mask_shape == "block" else random_masks_batched
        return glob, local, make(ratios, a.grid, a.grid, gen).flatten(1)
