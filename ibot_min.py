"""ibot_min: iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022) in one file.

A student ViT learns to match an EMA teacher on two tasks at once:
  * [CLS] self-distillation across views (as in DINO), and
  * masked image modeling (MIM): on masked patches of a global view the student predicts the teacher's
    softmax over K prototypes for the *unmasked* view. The teacher is the "online tokenizer".

Read top to bottom: config and architectures, ViT, masking, head, loss, teacher update and schedules,
multi-crop views (per image, with PIL: the definition), the student as one module and the training-step
module, the speed-ups (tested equal to the plain step), kNN evaluation. docs/method.md (or the paper) states
every formula; the symbols in the comments (P_u, Q_un, tau_t, lambda2, ...) are the paper's. Beside it, and not needed to read it:
batched_views.py draws the same views for a whole batch on the device (the fast data path), data.py reads
datasets, train.py / bench.py / eval_linear.py / check_loss.py run it.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from runtime import all_reduce, world_size

# ---------------------------------------------------------------------------------------------------
# ---- config and architectures ----


# width / depth / heads of the standard ViTs; the standard ones use 64-wide heads.
# Parameter counts are for the backbone at patch 16, 224 px (vit_nano: 0.8M at patch 4, 32 px).
ARCHS = {
    "vit_nano": dict(embed_dim=128, depth=4, num_heads=2),  # 0.8M, for CPU tests and smoke runs
    "vit_micro": dict(embed_dim=192, depth=4, num_heads=3),  # 1.8M at patch 4, 32 px: vit_tiny's width, 4 blocks
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),  # 5.5M
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),  # 21.7M
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),  # 85.8M
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),  # 303.3M
}


@dataclass
class IBOTConfig:
    """Everything that shapes the networks and the loss. Defaults: the official ViT-S/16 recipe."""

    arch: str = "vit_small"  # a key of ARCHS
    patch_size: int = 16
    global_size: int = 224  # global crop size; position embeddings are made for it and interpolated otherwise
    drop_path: float = 0.1  # stochastic depth rate of the student's last block; the teacher has none
    out_dim: int = 8192  # K, prototypes for [CLS]
    patch_out_dim: int | None = None  # K_p, prototypes for patches (None: K; must equal K with a shared head)
    shared_head: bool = True  # [CLS] and patches share prototypes, in student and teacher alike
    norm_last_layer: bool = False  # True freezes the weight-norm gain at 1 (DINO's stabiliser)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    global_crops: int = 2  # g
    local_crops: int = 10  # l
    student_temp: float = 0.1  # tau_s
    center_momentum: float = 0.9  # for c and c'
    lambda1: float = 1.0  # weight of L_cls
    lambda2: float = 1.0  # weight of L_mim
    centering: str = "center"  # "center": iBOT's EMA centre; "sinkhorn": DINOv2's Sinkhorn-Knopp (an extension)
    koleo: float = 0.0  # weight of DINOv2's KoLeo term on the student's global [CLS] features (an extension; 0 = off)

    def __post_init__(self):
        if self.patch_out_dim is None:
            self.patch_out_dim = self.out_dim
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {sorted(ARCHS)}")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ValueError(f"a shared head needs patch_out_dim == out_dim, "
                             f"got {self.patch_out_dim} != {self.out_dim}")
        if self.global_crops < 1 or self.global_crops + self.local_crops < 2:
            raise ValueError(f"need >= 1 global crop and >= 2 crops in all, got g={self.global_crops}, "
                             f"l={self.local_crops}")
        if self.koleo < 0:
            raise ValueError(f"koleo is a loss weight and must be >= 0, got {self.koleo}")


# ---------------------------------------------------------------------------------------------------
# ---- vision transformer (timm / DINO parameter names, so public checkpoints load as they are) ----


def add_drop_path(x: torch.Tensor, branch: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x + branch with stochastic depth: in training, the branch of each image is dropped with probability p and
    the kept ones are scaled by 1 / (1 - p). x, branch: (B, T, D)."""
    if p == 0.0 or not training:
        return x + branch
    keep = torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - p)  # 0 or 1 per image
    # x + branch * keep / (1 - p); the scale as a scalar, so a bf16 tensor does not round it
    return torch.addcmul(x, branch, keep, value=1 / (1 - p))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        q, k, v = self._qkv(x)  # each (B, h, T, d)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # bf16 on a CPU: two matmuls and a softmax (AMX tiles) beat SDPA's CPU flash kernel 3-5x at ViT
            # lengths (bench.py --attention prints both); the same attention, within bf16 rounding
            x = self.attention_weights(q, k).to(v.dtype) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels where available
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))

    @staticmethod
    def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (B, h, T, d) x2 -> (B, h, T, T)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # softmax(q k^T / sqrt(d))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, h, T, T)
        """The plain softmax(q k^T / sqrt(d)) that SDPA computes internally, for pictures and tests."""
        q, k, _ = self._qkv(x)
        return self.attention_weights(q, k)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D), pre-norm residual blocks
        x = add_drop_path(x, self.attn(self.norm1(x)), self.drop_path, self.training)
        return add_drop_path(x, self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), patches row-major: n = i * w + j
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"expected images (B, C, H, W) with H and W divisible by the patch size "
                             f"{self.patch_size}, got shape {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


@torch.no_grad()
def whiten_patch_embed(embed: PatchEmbed, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Initialise the patch projection as a whitening of the images' patches (an extension; airbench's first
    layer, Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", applied to a ViT's patch embedding).

    With P = C * p * p pixel values per patch and Sigma = V diag(lambda) V^T the covariance of every p x p patch of
    `images` (B, C, H, W), normalised as the views are: filter i is v_i / sqrt(lambda_i + eps), largest lambda
    first, each followed by its negation, so that the first min(2P, D) output channels are (near) unit-variance,
    decorrelated projections of the centred patch; the rest keep their random initialisation. Biases centre
    the whitened channels (zero mean over the patches). The patches are taken at stride 1 for p < 8 and at
    stride p / 4 above (a ViT-S/16 at 224 px: 2,809 per image). Errors: images of another channel count."""
    if images.ndim != 4 or images.shape[1] != embed.proj.in_channels:
        raise ValueError(f"expected images (B, {embed.proj.in_channels}, H, W) to whiten the patch embedding "
                         f"with, got shape {tuple(images.shape)}")
    p, D = embed.patch_size, embed.proj.out_channels
    stride = max(1, p // 4)  # every patch position for p < 8; for larger patches, every (p/4)-th suffices
    h, w = images.shape[-2:]
    per_image = images.shape[1] * p * p * ((h - p) // stride + 1) * ((w - p) // stride + 1)  # values unfolded
    total, outer, count = 0.0, 0.0, 0
    for chunk in images.split(max(1, 2**24 // per_image)):  # sums over the patches, a few images at a time
        patches = rearrange(F.unfold(chunk.double(), kernel_size=p, stride=stride), "b k l -> (b l) k")  # (b*L, P)
        total, outer, count = total + patches.sum(0), outer + patches.T @ patches, count + patches.shape[0]
    mean = total / count
    lam, V = torch.linalg.eigh(outer / count - torch.outer(mean, mean))  # Sigma's ascending lambda, columns v_i
    W = (V / (lam.clamp(min=0) + eps).sqrt()).T.flip(0)  # (P, P): rows v_i / sqrt(lambda_i + eps), largest first
    W = rearrange(torch.stack([W, -W], dim=1), "k two q -> (k two) q")[:D]  # (min(2P, D), P): +-v_1, +-v_2, ...
    n = W.shape[0]
    weight = embed.proj.weight  # (D, C, p, p)
    weight[:n] = W.view(n, *weight.shape[1:]).to(weight.dtype)
    embed.proj.bias[:n] = -(W @ mean).to(weight.dtype)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 masked_embed: bool = False, in_chans: int = 3):
        super().__init__()
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        if depth < 1:
            raise ValueError(f"a ViT needs at least one block, got depth {depth}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.grid = (height // patch_size, width // patch_size)  # the position embeddings' (h, w) patch grid
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rises over the blocks
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # the student's learned [MASK] token e_[MASK]; zeros as in the official code
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim)) if masked_embed else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:  # -> (1, 1 + h*w, D)
        if (h, w) == self.grid:
            return self.pos_embed
        grid = rearrange(self.pos_embed[:, 1:], "1 (i j) d -> 1 d i j", i=self.grid[0])
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
        return torch.cat([self.pos_embed[:, :1], rearrange(grid, "1 d i j -> 1 (i j) d")], dim=1)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("this ViT has no masked_embed (the teacher's has none); "
                                 "build it with masked_embed=True")
            if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"expected a bool mask of shape {tuple(x.shape[:2])} (B, N), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            x = torch.where(mask[..., None], self.masked_embed.to(x.dtype), x)  # masked patches -> e_[MASK]
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        p = self.patch_size
        return x + self.interpolate_pos_embed(H // p, W // p).to(x.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images, optional (B, N) bool mask -> (B, 1+N, D) tokens after the final norm."""
        x = self.prepare_tokens(x, mask)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:  # -> (B, heads, 1+N, 1+N)
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_map(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Tokens of the last n blocks, each through the final norm (the linear-probe features)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def _vit(name):
    def build(patch_size: int = 16, **overrides) -> VisionTransformer:
        return VisionTransformer(patch_size=patch_size, **{**ARCHS[name], **overrides})
    build.__name__ = name
    build.__doc__ = f"{name}: {ARCHS[name]}; any VisionTransformer argument can be overridden."
    return build


vit_nano, vit_micro, vit_tiny, vit_small, vit_base, vit_large = (_vit(n) for n in ARCHS)


# ---------------------------------------------------------------------------------------------------
# ---- masking (which patches the student sees as [MASK]) ----


def _uniform(a: float, b: float, gen: torch.Generator | None) -> float:
    return a + (b - a) * torch.rand((), generator=gen).item()


def _randint(low: int, high: int, gen: torch.Generator | None) -> int:  # inclusive bounds, like random.randint
    return int(torch.randint(low, high + 1, (), generator=gen))


def block_mask(height: int, width: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT's blockwise masking of about ratio * height * width patches -> (height, width) bool.

    Rectangles of area U(min_area, target - count) and aspect ratio in [0.3, 1/0.3] are laid until the
    count reaches the target, or 10 attempts in a row add nothing; the count may stay below target.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    mask = torch.zeros(height, width, dtype=torch.bool)
    target = ratio * height * width  # a float, as in the official code
    min_area = (min(height, width) // 3) ** 2
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    count = 0
    while count < target:
        room, added = target - count, 0
        for _ in range(10):
            area = _uniform(min_area, room, generator)  # U(a, b) with b < a is fine: it draws from [b, a]
            aspect = math.exp(_uniform(*log_aspect, generator))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                top, left = _randint(0, height - h, generator), _randint(0, width - w, generator)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def random_mask(height: int, width: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly int(ratio * height * width) patches chosen uniformly -> (height, width) bool."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    n = height * width
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:int(ratio * n)]] = True
    return mask.view(height, width)


def check_mask_ratios(ratios, ratio_vars) -> None:
    """Every draw of U(ratio - var, ratio + var) must be a ratio in [0, 1): one var per ratio, var <= ratio,
    ratio + var < 1."""
    if len(ratios) != len(ratio_vars) or not ratios:
        raise ValueError(f"ratios and ratio_vars must be non-empty and of equal length (one var per ratio), "
                         f"got {tuple(ratios)} and {tuple(ratio_vars)}")
    for r, v in zip(ratios, ratio_vars):
        if not (0 <= v <= r and r + v < 1):
            raise ValueError(f"need 0 <= var <= ratio and ratio + var < 1, got ratio {r}, var {v}")


def sample_ratio(ratios=(0.0, 0.3), ratio_vars=(0.0, 0.2), generator: torch.Generator | None = None) -> float:
    """r_i ~ U(ratio_i - var_i, ratio_i + var_i) for each pair, then one of them at random."""
    check_mask_ratios(ratios, ratio_vars)
    draws = [_uniform(r - v, r + v, generator) if v > 0 else r for r, v in zip(ratios, ratio_vars)]
    return draws[_randint(0, len(draws) - 1, generator)]


def sample_masks(n_crops: int, height: int, width: int, ratios=(0.0, 0.3), ratio_vars=(0.0, 0.2),
                 shape: str = "block", generator: torch.Generator | None = None) -> torch.Tensor:
    """One mask per global crop, each with its own ratio -> (n_crops, height, width) bool."""
    if shape not in ("block", "rand"):
        raise ValueError(f"mask shape must be 'block' or 'rand', got {shape!r}")
    fn = block_mask if shape == "block" else random_mask
    return torch.stack([fn(height, width, sample_ratio(ratios, ratio_vars, generator), generator)
                        for _ in range(n_crops)])


# ---------------------------------------------------------------------------------------------------
# ---- projection head: MLP, L2 norm, weight-normalised prototypes ----


class WeightNormLinear(nn.Module):
    """W = g * V / ||V|| (row-wise), no bias. The official parameter names weight_g and weight_v."""

    def __init__(self, in_dim: int, out_dim: int, freeze_gain: bool):
        super().__init__()
        self.weight_v = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, in_dim), std=0.02))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_gain)

    def forward(self, x):  # in fp32 under any autocast: the logits are cosines that tau_t = 0.04 magnifies 25x
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight_g * F.normalize(self.weight_v, dim=1))


class IBOTHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, shared: bool = True,
                 norm_last_layer: bool = False, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = None if shared else WeightNormLinear(bottleneck_dim, patch_out_dim, norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., bottleneck), unit length
        return F.normalize(self.mlp(x), dim=-1)

    def cls_logits(self, z: torch.Tensor) -> torch.Tensor:  # projected [CLS] tokens -> (..., K)
        return self.last_layer(z)

    def patch_logits(self, z: torch.Tensor) -> torch.Tensor:  # projected patch tokens -> (..., K_p)
        return (self.last_layer if self.last_layer2 is None else self.last_layer2)(z)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1+N, D) -> ((B, K) [CLS] logits, (B, N, K_p) patch logits)."""
        z = self.project(tokens)
        return self.cls_logits(z[:, 0]), self.patch_logits(z[:, 1:])


# ---------------------------------------------------------------------------------------------------
# ---- loss: [CLS] self-distillation + masked image modeling against the online tokenizer ----


class IBOTLoss(nn.Module):
    """L = lambda1 * L_cls + lambda2 * L_mim, with centred, sharpened teacher targets (docs/method.md, "The loss").

    Inputs are crop-major (all images of crop 0, then crop 1, ...; global crops first), patches row-major.
    The loss runs in fp32, uses the centres as they were before the call, then updates them by EMA.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, n_global_crops: int, n_local_crops: int,
                 student_temp: float = 0.1, center_momentum: float = 0.9, patch_center_momentum: float = 0.9,
                 lambda1: float = 1.0, lambda2: float = 1.0, centering: str = "center"):
        super().__init__()
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        self.centering = centering
        if n_global_crops < 1 or n_global_crops + n_local_crops < 2:
            raise ValueError(f"need >= 1 global crop and >= 2 crops in all, got g={n_global_crops}, l={n_local_crops}")
        self.g, self.n_crops = n_global_crops, n_global_crops + n_local_crops
        self.student_temp, self.lambda1, self.lambda2 = student_temp, lambda1, lambda2
        self.center_momentum, self.patch_center_momentum = center_momentum, patch_center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # c
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_out_dim))  # c' (official: center2)

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp,
                teacher_patch_temp) -> dict[str, torch.Tensor]:
        """The loss on every patch's logits, as the paper writes it -> {"cls", "patch", "loss"}.
        student_cls ((g+l)B, K), student_patch (gB, N, K_p), teacher_cls (gB, K), teacher_patch (gB, N, K_p),
        masks (gB, N) bool (True: masked for the student); tau_t = teacher_temp, tau_t' = teacher_patch_temp."""
        g, V = self.g, self.n_crops
        gB = teacher_cls.shape[0]
        if gB % g or student_cls.shape[0] != gB // g * V:
            raise ValueError(f"expected student_cls with (g+l)*B = {V}*B rows and teacher_cls with g*B = {g}*B rows, "
                             f"got {student_cls.shape[0]} and {gB}")
        if masks.dtype != torch.bool or masks.ndim != 2 or masks.shape[0] != gB:
            raise ValueError(f"expected bool masks (gB, N) with gB = {gB}, got {masks.dtype} {tuple(masks.shape)}")
        for name, t in (("student_patch", student_patch), ("teacher_patch", teacher_patch)):
            if t.ndim != 3 or t.shape[:2] != masks.shape:
                raise ValueError(f"expected {name} (gB, N, K_p) with (gB, N) = {tuple(masks.shape)} as the masks, "
                                 f"got {tuple(t.shape)}")
        return self.forward_masked(student_cls, student_patch[masks], teacher_cls, teacher_patch[masks],
                                   teacher_patch.mean(1), masks, teacher_temp, teacher_patch_temp)

    def forward_masked(self, student_cls, student_patch_masked, teacher_cls, teacher_patch_masked,
                       teacher_patch_mean, masks, teacher_temp, teacher_patch_temp) -> dict[str, torch.Tensor]:
        """The same loss from what it reads: the patch logits at masked positions only, student_patch_masked and
        teacher_patch_masked (M, K_p) in row-major order of masks (M = masks.sum()), and each image's mean teacher
        patch logits over all N patches, teacher_patch_mean (gB, K_p), which the centre c' follows. The training
        step calls this form; the shapes are those forward checks."""
        g, V = self.g, self.n_crops
        teacher_cls, teacher_patch_masked = teacher_cls.detach(), teacher_patch_masked.detach()  # targets: no gradient

        # L_cls: the teacher's target on global view u against the student on every other view v, both [CLS]
        log_s = F.log_softmax(student_cls.float() / self.student_temp, dim=-1).chunk(V)  # log softmax(s_v / tau_s)
        P = self.teacher_targets(teacher_cls.float(), self.center, teacher_temp).chunk(g)  # P_u, each (B, K)
        pairs = [(u, v) for u in range(g) for v in range(V) if v != u]  # g (V - 1) pairs
        loss_cls = sum(-(P[u] * log_s[v]).sum(-1).mean() for u, v in pairs) / len(pairs)

        # L_mim: on each masked patch n of global view u, the teacher's target Q_un for the unmasked view against
        # the student's prediction; averaged over each image's masked patches, then over the images
        log_s_patch = F.log_softmax(student_patch_masked.float() / self.student_temp, dim=-1)  # (M, K_p)
        Q = self.teacher_targets(teacher_patch_masked.float(), self.patch_center[0], teacher_patch_temp)  # (M, K_p)
        per_patch = torch.zeros(masks.shape, device=Q.device)  # (gB, N); no masked patch (M = 0): L_mim is 0
        per_patch[masks] = -(Q * log_s_patch).sum(-1)  # cross-entropy H(Q_un, s_un) at each masked patch
        per_image = per_patch.sum(1) / masks.sum(1).clamp(min=1)  # (gB,); an image without masks adds 0
        loss_mim = per_image.mean()  # = 1/g sum_u (mean over the batch)

        self.update_center(teacher_cls, teacher_patch_mean.detach())
        loss_cls, loss_mim = self.lambda1 * loss_cls, self.lambda2 * loss_mim
        return {"cls": loss_cls, "patch": loss_mim, "loss": loss_cls + loss_mim}

    def teacher_targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """(rows, K) teacher logits -> (rows, K) targets: softmax((t - c) / tau_t), or with centering="sinkhorn"
        (DINOv2's option, not iBOT's) a Sinkhorn-Knopp balancing of exp(t / tau_t) over all rows of all ranks."""
        if self.centering == "center":
            return F.softmax((logits - center) / temp, dim=-1)
        return sinkhorn_knopp(logits / temp)

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch_mean: torch.Tensor) -> None:
        """c <- m c + (1-m) mean_rows t_u ;  c' <- m' c' + (1-m') mean_rows mean_n t_un  (all ranks, all patches).
        teacher_cls (gB, K); teacher_patch_mean (gB, K_p), each image's mean_n t_un."""
        cls_sum = teacher_cls.float().sum(0, keepdim=True)  # (1, K)
        patch_sum = teacher_patch_mean.float().sum(0, keepdim=True)  # (1, K_p)
        all_reduce(cls_sum)  # over every rank
        all_reduce(patch_sum)
        rows = teacher_cls.shape[0] * world_size()
        self.center.mul_(self.center_momentum).add_(cls_sum / rows, alpha=1 - self.center_momentum)
        self.patch_center.mul_(self.patch_center_momentum).add_(patch_sum[None] / rows,
                                                                alpha=1 - self.patch_center_momentum)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """(rows, K) scores -> (rows, K) targets, each row summing to 1, each prototype used about equally over all
    rows of all ranks: a stronger guard against collapse than the running centre on small or short runs.
    A rank may hold no rows (no masked patch): it joins the all-reduces and gets (0, K) targets.

    Named deviation: DINOv2 scales Q = exp(scores); the same iterations run here on log Q, so scores that span
    more than ~100 (a cold teacher, features near one prototype) cannot underflow to 0 / 0 = NaN. DINOv2's
    first division by the total of Q is left out: the first prototype normalisation cancels it."""
    def logsumexp_over_all_rows(log_q):  # (K, rows) -> (K, 1), over the rows of every rank
        peak = log_q.amax(1, keepdim=True) if log_q.shape[1] else log_q.new_full((log_q.shape[0], 1), -math.inf)
        peak = all_reduce(peak, dist.ReduceOp.MAX)  # finite unless no rank has rows (then log_q is empty)
        return peak + all_reduce((log_q - peak).exp().sum(1, keepdim=True)).log()

    log_rows = all_reduce(torch.tensor([float(scores.shape[0])], device=scores.device)).log()  # over all ranks
    log_q = scores.T  # (K, rows): log Q, up to a constant
    K = log_q.shape[0]
    for _ in range(iterations):
        log_q = log_q - logsumexp_over_all_rows(log_q) - math.log(K)  # each prototype gets 1/K of the mass
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_rows  # each row gets 1/rows
    return (log_q + log_rows).exp().T


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2's regulariser): (n, D) features -> -1/n sum_i log(rho_i), where
    rho_i = min_{j != i} ||x_i - x_j|| over the L2-normalised rows. It spreads the features over the sphere:
    the Kozachenko-Leonenko entropy estimate, up to constants. Needs n >= 2."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs (n >= 2, D) features, got {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=-1)
    with torch.no_grad():  # the nearest neighbour of each row; the distance to it carries the gradient
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(1)
    rho = (x - x[nearest]).norm(dim=-1)  # (n,)
    return -torch.log(rho + eps).mean()


# ---------------------------------------------------------------------------------------------------
# ---- teacher update and schedules ----


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s over the parameters both have by name (the student's
    masked_embed has no teacher twin). One multi-tensor call instead of a Python loop per tensor."""
    s = dict(student.named_parameters())
    pairs = [(p, s[n]) for n, p in teacher.named_parameters() if n in s]
    t_params, s_params = [p for p, _ in pairs], [q.detach() for _, q in pairs]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """Linear warm-up from warmup_start to base, then cosine from base to final -> (total_steps,) float64.
    Deviation from the official code (named): the warm-up is clipped to the run and the last value is exactly
    `final` (the official cosine stops one step short of it)."""
    if total_steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps - 1)  # the last step is always `final`
    warm = torch.linspace(warmup_start, base, warmup_steps, dtype=torch.float64)
    n = total_steps - warmup_steps
    t = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    if n == 1:
        cos[:] = final
    return torch.cat([warm, cos])


def wsd_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                 decay_fraction: float = 0.2) -> torch.Tensor:
    """Warmup-stable-decay: a linear warm-up from 0 to base, base held, then a linear decay to `final` over the
    last decay_fraction of the steps -> (total_steps,) float64 (Hu et al. 2024, MiniCPM; Hägele et al. 2024).
    A short run spends most of its steps at the peak rate where a cosine has already begun to fall."""
    if total_steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    decay = max(1, round(decay_fraction * total_steps))
    warmup_steps = min(warmup_steps, total_steps - decay)
    return torch.cat([torch.linspace(0.0, base, warmup_steps, dtype=torch.float64),
                      torch.full((total_steps - warmup_steps - decay,), base, dtype=torch.float64),
                      torch.linspace(base, final, decay + 1, dtype=torch.float64)[1:]])


def linear_warmup(start: float, end: float, warmup_steps: int, total_steps: int, hold_steps: int = 0) -> torch.Tensor:
    """`start` for hold_steps, a linear ramp to `end` (reached at the ramp's last step), then `end`.
    The teacher temperatures: tau_t 0.04 -> 0.07, tau_t' likewise, held until pred_start_epoch."""
    hold = min(hold_steps, total_steps)
    ramp = min(warmup_steps, total_steps - hold)
    return torch.cat([torch.full((hold,), start, dtype=torch.float64),
                      torch.linspace(start, end, ramp, dtype=torch.float64) if ramp > 1 else
                      torch.full((ramp,), end, dtype=torch.float64),
                      torch.full((total_steps - hold - ramp,), end, dtype=torch.float64)])


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on every parameter except biases and 1-D ones (cls_token, pos_embed, masked_embed and
    the weight-norm gain are decayed, as in the official code)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------
# ---- multi-crop views (BYOL / DINO augmentations) and their masks ----

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_resized_crop_params(width: int, height: int, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision's RandomResizedCrop draw (10 tries, then a centre crop), with an explicit generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(*log_ratio, generator))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class MultiCropAugmentation:
    """PIL image -> (g global + l local crops as normalised tensors, (g, h, w) bool masks of the global crops).
    Its fields are the views' whole configuration (train.py makes a flag of each).

    Every random draw comes from the generator passed in, so a (seed, epoch, index) generator redraws the
    same views. Blur probabilities: 1.0 on the first global crop, 0.1 on the others, 0.5 on locals;
    solarisation (p 0.2) on the global crops after the first only.
    """

    global_size: int = 224  # pixels
    local_size: int = 96
    global_crops: int = 2  # g
    local_crops: int = 10  # l
    global_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop's area range (the published ViT-S/16
    local_scale: tuple[float, float] = (0.05, 0.25)  # command's; main_ibot.py's own defaults are (0.14, 1), (0.05, 0.4))
    blur: bool = True
    patch_size: int = 16  # the masks' grid is global_size / patch_size
    mask_ratios: tuple[float, ...] = (0.0, 0.3)  # r ~ U(ratio - var, ratio + var) for one pair chosen at random
    mask_ratio_vars: tuple[float, ...] = (0.0, 0.2)
    mask_shape: str = "block"  # "block" (BEiT's blockwise) or "rand"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):  # checked once here, before a run starts, for the PIL and the on-device views alike
        if self.global_size % self.patch_size:
            raise ValueError(f"global_size {self.global_size} is not divisible by patch_size {self.patch_size}")
        if self.local_crops and self.local_size % self.patch_size:  # the ViT cuts local crops into patches too
            raise ValueError(f"local_size {self.local_size} is not divisible by patch_size {self.patch_size}")
        self.global_scale, self.local_scale = tuple(self.global_scale), tuple(self.local_scale)
        for name, scale in (("global_scale", self.global_scale), ("local_scale", self.local_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} takes the smallest and largest share of the image a crop covers, "
                                 f"0 < min <= max <= 1; got {' '.join(map(str, scale))}")
        self.mask_ratios, self.mask_ratio_vars = tuple(self.mask_ratios), tuple(self.mask_ratio_vars)
        try:
            check_mask_ratios(self.mask_ratios, self.mask_ratio_vars)
        except ValueError as e:
            raise ValueError(f"bad mask_ratios {self.mask_ratios} with mask_ratio_vars {self.mask_ratio_vars}: {e}") from None
        if self.mask_shape not in ("block", "rand"):
            raise ValueError(f"mask_shape must be 'block' or 'rand', got {self.mask_shape!r}")
        self.grid = self.global_size // self.patch_size

    def view(self, img: Image.Image, size: int, scale, p_blur: float, p_solarize: float, gen) -> torch.Tensor:
        top, left, h, w = random_resized_crop_params(*img.size, scale, generator=gen)
        img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
        if _uniform(0, 1, gen) < 0.5:
            img = TF.hflip(img)
        if _uniform(0, 1, gen) < 0.8:  # colour jitter (0.4, 0.4, 0.2, 0.1) in random order
            for op in torch.randperm(4, generator=gen).tolist():
                if op == 0:
                    img = TF.adjust_brightness(img, _uniform(0.6, 1.4, gen))
                elif op == 1:
                    img = TF.adjust_contrast(img, _uniform(0.6, 1.4, gen))
                elif op == 2:
                    img = TF.adjust_saturation(img, _uniform(0.8, 1.2, gen))
                else:
                    img = TF.adjust_hue(img, _uniform(-0.1, 0.1, gen))
        if _uniform(0, 1, gen) < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if self.blur and _uniform(0, 1, gen) < p_blur:
            img = img.filter(ImageFilter.GaussianBlur(radius=_uniform(0.1, 2.0, gen)))
        if _uniform(0, 1, gen) < p_solarize:
            img = TF.solarize(img, 128)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None,
                 masking: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """masking=False (before pred_start_epoch) gives empty masks."""
        img, gen = img.convert("RGB"), generator
        crops = [self.view(img, self.global_size, self.global_scale, p_blur=1.0 if i == 0 else 0.1,
                           p_solarize=0.0 if i == 0 else 0.2, gen=gen) for i in range(self.global_crops)]
        crops += [self.view(img, self.local_size, self.local_scale, 0.5, 0.0, gen) for _ in range(self.local_crops)]
        if masking:
            masks = sample_masks(self.global_crops, self.grid, self.grid, self.mask_ratios, self.mask_ratio_vars,
                                 self.mask_shape, gen)
        else:
            masks = torch.zeros(self.global_crops, self.grid, self.grid, dtype=torch.bool)
        return crops, masks


# ---------------------------------------------------------------------------------------------------
# ---- the training-step module: student, teacher (the online tokenizer), loss ----


class MultiCropStudent(nn.Module):
    """The student side of a step as one module (as DINO's MultiCropWrapper), so DistributedDataParallel can
    wrap it: the backbone on the masked global crops and on the local crops, the head where the loss reads it."""

    def __init__(self, backbone: VisionTransformer, head: IBOTHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor):
        """global_crops (gB, C, H, W), local_crops (lB, C, h, w) or None, masks (gB, N) bool ->
        [CLS] logits ((g+l)B, K), masked patch logits (M, K_p) in row-major order of masks (M = masks.sum()),
        and the global crops' backbone [CLS] tokens (gB, D)."""
        tokens = self.backbone(global_crops, mask=masks)  # (gB, 1+N, D): masked patches enter as e_[MASK]
        cls_tokens = [tokens[:, 0]]
        if local_crops is not None and local_crops.numel():
            cls_tokens.append(self.backbone(local_crops)[:, 0])  # (lB, D): the loss reads only [CLS] of local crops
        cls_tokens = torch.cat(cls_tokens)  # ((g+l)B, D)
        masked_tokens = tokens[:, 1:][masks]  # (M, D)
        # The head runs only where the loss reads it: every [CLS] and the masked patches (named deviation: the
        # official code projects every token; the loss is the same). One pass through its MLP for both.
        z = self.head.project(torch.cat([cls_tokens, masked_tokens]))
        return self.head.cls_logits(z[:len(cls_tokens)]), self.head.patch_logits(z[len(cls_tokens):]), tokens[:, 0]


@torch.no_grad()
def teacher_logits(teacher: nn.ModuleDict, global_crops: torch.Tensor, masks: torch.Tensor):
    """The teacher's head on every token of the unmasked global crops (gB, C, H, W) -> [CLS] logits (gB, K),
    patch logits at the masked positions (M, K_p), and each image's mean patch logits (gB, K_p) for c'."""
    teacher_cls, teacher_patch = teacher.head(teacher.backbone(global_crops))  # (gB, K), (gB, N, K_p)
    return teacher_cls, teacher_patch[masks], teacher_patch.mean(1)


class IBOT(nn.Module):
    """student = {backbone, head}, teacher = the same without drop path or mask token, and the loss."""

    def __init__(self, cfg: IBOTConfig, speedups: bool = True):
        """speedups: the student's last block only on the tokens the loss reads (ReadOnlyStudent, in the
        "speed-ups" section below): the same loss and gradients as the plain computation (speedups=False)."""
        super().__init__()
        self.cfg, self.speedups = cfg, speedups
        student = ReadOnlyStudent if speedups else MultiCropStudent
        self.student = student(self._backbone(cfg, cfg.drop_path, masked_embed=True), self._head(cfg))
        self.teacher = nn.ModuleDict(dict(backbone=self._backbone(cfg, 0.0, masked_embed=False), head=self._head(cfg)))
        ema_update(self.teacher, self.student, 0.0)  # the teacher starts as a copy of the student
        self.teacher.requires_grad_(False)
        self.loss = IBOTLoss(out_dim=cfg.out_dim, patch_out_dim=cfg.patch_out_dim, n_global_crops=cfg.global_crops,
                             n_local_crops=cfg.local_crops, student_temp=cfg.student_temp,
                             center_momentum=cfg.center_momentum, patch_center_momentum=cfg.center_momentum,
                             lambda1=cfg.lambda1, lambda2=cfg.lambda2, centering=cfg.centering)

    @staticmethod
    def _backbone(cfg: IBOTConfig, drop_path: float, masked_embed: bool) -> VisionTransformer:
        return VisionTransformer(img_size=cfg.global_size, patch_size=cfg.patch_size, drop_path_rate=drop_path,
                                 masked_embed=masked_embed, **ARCHS[cfg.arch])

    @staticmethod
    def _head(cfg: IBOTConfig) -> "IBOTHead":
        return IBOTHead(ARCHS[cfg.arch]["embed_dim"], out_dim=cfg.out_dim, patch_out_dim=cfg.patch_out_dim,
                        shared=cfg.shared_head, norm_last_layer=cfg.norm_last_layer, hidden_dim=cfg.head_hidden_dim,
                        bottleneck_dim=cfg.head_bottleneck_dim)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
                teacher_temp: float, teacher_patch_temp: float, student: nn.Module | None = None
                ) -> dict[str, torch.Tensor]:
        """One training step's loss -> {"cls", "patch", "loss"} (+ "koleo" when on).
        global_crops (g*B, C, H, W), local_crops (l*B, C, h, w) or None, masks (g*B, N) bool; crop-major.
        `student`: the module to run as the student, such as a DistributedDataParallel wrapper of
        self.student (default: self.student itself)."""
        if masks.ndim == 3:  # (gB, h, w) -> (gB, N), row-major
            masks = masks.flatten(1)
        p = self.cfg.patch_size
        shape = (global_crops.shape[0], (global_crops.shape[-2] // p) * (global_crops.shape[-1] // p))
        if masks.dtype != torch.bool or masks.shape != shape:  # checked before the teacher indexes with it
            raise ValueError(f"expected bool masks (gB, N) = {shape} (or (gB, h, w)) for global crops of shape "
                             f"{tuple(global_crops.shape)}, got {masks.dtype} {tuple(masks.shape)}")
        with torch.no_grad():  # the online tokenizer: the teacher sees the unmasked global crops
            teacher_cls, teacher_patch_masked, teacher_patch_mean = teacher_logits(self.teacher, global_crops, masks)
        student = self.student if student is None else student
        student_cls, student_patch, global_cls_tokens = student(global_crops, local_crops, masks)
        out = self.loss.forward_masked(student_cls, student_patch, teacher_cls, teacher_patch_masked,
                                       teacher_patch_mean, masks, teacher_temp, teacher_patch_temp)
        if self.cfg.koleo:  # optional: each global crop's batch of backbone [CLS] features spread apart
            g = self.cfg.global_crops
            out["koleo"] = sum(koleo_loss(c) for c in global_cls_tokens.chunk(g)) / g
            out["loss"] = out["loss"] + self.cfg.koleo * out["koleo"]
        return out

    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)

    def checkpoint(self) -> dict:
        """The official layout (student / teacher with backbone. and head. prefixes, ibot_loss centres) plus
        our plain-dict config, so official tools read our files and ours read theirs."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "ibot_loss": {"center": self.loss.center, "center2": self.loss.patch_center},
                "config": {**asdict(self.cfg), **ARCHS[self.cfg.arch]}}

    def load_checkpoint(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        self.loss.center.copy_(ckpt["ibot_loss"]["center"])
        self.loss.patch_center.copy_(ckpt["ibot_loss"]["center2"])


# ---------------------------------------------------------------------------------------------------
# ---- speed-ups: the same step, computing only the tokens the loss reads (IBOT(speedups=True)) ----
# Tested equal to the plain computation above, drop path and gradients included (tests/test_ibot_min.py,
# "speed-ups"). At the CPU preset it makes the step 11% faster (docs/performance.md).


def tokens_read(vit: VisionTransformer, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """vit(x, mask)[rows] -> (R, D), R = rows.sum(), for a (B, 1+N) bool `rows` of the tokens wanted, row-major.
    Past the last block's attention a token depends on no other, so that block's MLP (and the final norm) run on
    the R rows alone. Drop path draws the same per-image keeps as Block.forward, in the same order."""
    x = vit.prepare_tokens(x, mask)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    x = add_drop_path(x, last.attn(last.norm1(x)), last.drop_path, last.training)  # (B, 1+N, D)
    x = x[rows]  # (R, D)
    branch = last.mlp(last.norm2(x))
    if last.drop_path and last.training:
        keep = torch.empty(rows.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - last.drop_path)
        x = torch.addcmul(x, branch, keep.expand(-1, rows.shape[1], -1)[rows], value=1 / (1 - last.drop_path))
    else:
        x = x + branch
    return vit.norm(x)


class ReadOnlyStudent(MultiCropStudent):
    """MultiCropStudent with the last block's MLP run only on the tokens the loss reads: every [CLS] and the
    masked patches of the global crops (tokens_read). The same outputs."""

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor):
        cls_column = torch.ones_like(masks[:, :1])  # (gB, 1)
        read = torch.cat([cls_column, masks], dim=1)  # (gB, 1+N): [CLS] and the masked patches
        tokens = tokens_read(self.backbone, global_crops, masks, read)  # (gB + M, D), row-major
        is_cls = torch.cat([cls_column, torch.zeros_like(masks)], dim=1)[read]  # (gB + M,)
        global_cls, masked_tokens = tokens[is_cls], tokens[~is_cls]  # (gB, D), (M, D)
        cls_tokens = [global_cls]
        if local_crops is not None and local_crops.numel():
            p = self.backbone.patch_size
            only_cls = torch.zeros(len(local_crops), 1 + (local_crops.shape[-2] // p) * (local_crops.shape[-1] // p),
                                   dtype=torch.bool, device=local_crops.device)
            only_cls[:, 0] = True
            cls_tokens.append(tokens_read(self.backbone, local_crops, None, only_cls))  # (lB, D)
        cls_tokens = torch.cat(cls_tokens)
        z = self.head.project(torch.cat([cls_tokens, masked_tokens]))
        return self.head.cls_logits(z[:len(cls_tokens)]), self.head.patch_logits(z[len(cls_tokens):]), global_cls


# ---------------------------------------------------------------------------------------------------
# ---- evaluation: weighted kNN on L2-normalised [CLS] features (the DINO / iBOT protocol) ----


@torch.no_grad()
def extract_features(backbone: VisionTransformer, batches, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Iterable of (images (B, C, H, W), labels (B,)) -> (features (N, D) L2-normalised final [CLS], labels (N,))."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in batches:
        feats.append(F.normalize(backbone(x.to(device, non_blocking=True))[:, 0].float(), dim=-1))
        labels.append(torch.as_tensor(y).to(device))
    backbone.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks=(10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> dict[int, float]:
    """Top-1 accuracy (%) of a kNN vote for each k: the k most cosine-similar training features vote for
    their label with weight exp(sim / T). k is capped at the bank size. Features must be L2-normalised."""
    n_train = train_features.shape[0]
    if n_train == 0 or test_features.shape[0] == 0:
        raise ValueError(f"kNN needs training and test features, got {n_train} and {test_features.shape[0]}")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted({min(k, n_train) for k in ks})
    correct = dict.fromkeys(ks, 0)
    for i in range(0, test_features.shape[0], chunk):
        sim, idx = (test_features[i:i + chunk] @ train_features.T).topk(ks[-1], dim=1)  # (b, k_max)
        votes_from = train_labels[idx]  # (b, k_max)
        weight = (sim / temperature).exp()
        for k in ks:
            votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            votes.scatter_add_(1, votes_from[:, :k], weight[:, :k])
            correct[k] += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return {k: 100.0 * c / test_features.shape[0] for k, c in correct.items()}
