# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # iBOT, step by step, on CIFAR-10
#
# **iBOT** (Zhou et al., *iBOT: Image BERT Pre-Training with Online Tokenizer*, ICLR 2022) trains a Vision
# Transformer (ViT) on images without labels. Two copies of the network play different roles:
#
# * the **student** is trained by gradient descent;
# * the **teacher** is never trained directly: after every step its weights become an exponential moving
#   average (EMA) of the student's. It produces the targets the student learns to predict.
#
# The student learns two things at once:
#
# 1. **[CLS] self-distillation** (as in DINO): from one augmented *view* of an image, predict the teacher's
#    output for *another* view of the same image. This makes the image-level [CLS] token invariant to crops,
#    colours and flips.
# 2. **Masked image modeling (MIM)**: some patches of the student's input are replaced by a learned `[MASK]`
#    token; at those positions the student must predict what the teacher outputs for the *unmasked* patch.
#    The teacher's output is a probability distribution over $K$ learned *prototypes*, a soft "visual word"
#    for each patch. BEiT got such words from a separately trained tokenizer (DALL-E's dVAE); in iBOT the teacher
#    **is** the tokenizer, learned online together with the student. Hence "online tokenizer".
#
# This notebook walks through every piece on real CIFAR-10 images, using the code in
# [`ibot_min.py`](../ibot_min.py) (imported, never copied) and the data helpers of [`data.py`](../data.py).
# The formulas follow [`docs/method.md`](../docs/method.md) and the paper; the symbols are the paper's:
# $P_u$, $Q_{u,n}$, $\tau_t$, $\tau_s$, $\lambda_1$, $\lambda_2$, $c$, $c'$.
#
# | part | what you see |
# | --- | --- |
# | 1 | multi-crop views: global and local crops and their augmentations |
# | 2 | block masks, random masks, and how often and how much the recipe masks |
# | 3 | the ViT forward pass with a mask: where the `[MASK]` embedding enters, token shapes |
# | 4 | the online tokenizer: the teacher's softmax over prototypes; centring and sharpening |
# | 5 | the two loss terms by hand, next to `IBOTLoss` |
# | 6 | a short training run on CPU with the CPU recipe: losses, target entropies, kNN accuracy before and after |
# | 7 | what the teacher looks at: [CLS] attention, patch tokens grouped, the prototype of each patch |
#
# It runs top to bottom in about six minutes on two CPU cores with bf16 instructions (nine in fp32); everything
# random is seeded.
#
# *Editing it:* this notebook is paired by [jupytext](https://jupytext.readthedocs.io) with the plain script
# [`ibot_walkthrough.py`](ibot_walkthrough.py), which is what to edit and review. From the repository root,
# `jupytext --sync notebooks/ibot_walkthrough.py` carries the edits into the notebook and
# `jupyter execute --inplace notebooks/ibot_walkthrough.ipynb` runs it and saves its outputs.

# %%
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

# The repository root is the folder above us that holds ibot_min.py, wherever Jupyter was started.
ROOT = Path.cwd().resolve()
while not (ROOT / "ibot_min.py").is_file():
    if ROOT.parent == ROOT:
        raise FileNotFoundError(f"no ibot_min.py in {Path.cwd()} or any folder above it; open the notebook "
                                "from inside the repository")
    ROOT = ROOT.parent
sys.path.insert(0, str(ROOT))

import batched_views as BV  # noqa: E402  the views of a whole batch at once
import data as D  # noqa: E402  datasets and the multi-crop loader
import ibot_min as M  # noqa: E402  the method
import train as T  # noqa: E402  the CPU recipe and the per-parameter gradient clipping of the training script
from runtime import pick_precision  # noqa: E402  bf16 where the CPU multiplies it faster than fp32

torch.manual_seed(0)
# A ViT-nano step is made of many small matrix products: on a 2-core machine one thread is faster than two.
torch.set_num_threads(1 if (os.cpu_count() or 1) <= 2 else min(8, os.cpu_count()))
plt.rcParams.update({"figure.dpi": 72, "font.size": 9, "axes.titlesize": 9})
print(f"repository: {ROOT}\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s)")

# %% [markdown]
# ### The data
#
# Real CIFAR-10 images (32×32 pixels, 10 classes): the PNG files of a folder of class folders when the
# environment variable `IBOT_CIFAR10_DIR` names one (as for `train.py`), otherwise torchvision's CIFAR-10,
# downloaded once into `data/`. In a folder the last 500 images of every class are held out as a validation
# split; torchvision's test split plays that part otherwise. The labels are only used to *measure* the features
# with a kNN classifier, never to train.

# %%
DATA = os.environ.get("IBOT_CIFAR10_DIR")  # a folder of CIFAR-10's class folders, or None
if DATA:
    print(f"CIFAR-10 from {DATA}")
    train_all = D.build_dataset("imagefolder", DATA, "train", holdout_per_class=500)
    val_all = D.build_dataset("imagefolder", DATA, "val", holdout_per_class=500)
else:
    print(f"IBOT_CIFAR10_DIR is not set: CIFAR-10 from torchvision in {ROOT / 'data'} (a 170 MB download, "
          "once); its test split stands in for the validation split")
    train_all = D.build_dataset("cifar10", str(ROOT / "data"), "train", download=True)
    val_all = D.build_dataset("cifar10", str(ROOT / "data"), "val", download=True)
CLASSES = train_all.classes


def per_class(dataset, n):
    # The first n images of every class, as a Subset of (PIL image, label) pairs.
    seen, keep = {}, []
    for i, label in enumerate(dataset.targets):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            keep.append(i)
    return torch.utils.data.Subset(dataset, keep)


print(f"{len(train_all)} training and {len(val_all)} held-out images; classes: {', '.join(CLASSES)}")

# %% [markdown]
# ## 1. Multi-crop views
#
# Every image is turned into several random **views**:
#
# * $g = 2$ **global crops** cover a large part of the image (here 25-100 % of its area, resized to 32 px;
#   on ImageNet 14-100 % resized to 224 px);
# * $l$ **local crops** cover a small part (here 5-25 %, resized to 16 px; on ImageNet 5-40 %, 96 px; the
#   ViT-S/B recipe uses $l = 10$, this notebook 4 to stay fast).
#
# Each view then goes through the BYOL/DINO augmentations: horizontal flip, colour jitter (brightness,
# contrast, saturation, hue) with probability 0.8, grayscale with probability 0.2, solarisation (invert every
# pixel above 128) with probability 0.2 on the second global crop, and Gaussian blur (left out here: a 32-px
# image has little detail to blur). Finally each view is normalised with the ImageNet mean and standard
# deviation.
#
# Why: the [CLS] loss asks the student to give the *same* answer for a local crop (a wheel) as the teacher
# gives for a global crop (the whole car). Solving that needs a representation of *what* is in the image that
# ignores *where* the crop was taken and how it was coloured. The teacher only ever sees the global crops;
# the student sees all of them.
#
# `MultiCropAugmentation` draws every random number from the `torch.Generator` it is given, so a view can be
# redrawn exactly.

# %%
N_LOCAL = 4
aug = M.MultiCropAugmentation(global_size=32, local_size=16, global_crops=2, local_crops=N_LOCAL,
                              global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), blur=False, patch_size=4)
MEAN, STD = torch.tensor(M.IMAGENET_MEAN)[:, None, None], torch.tensor(M.IMAGENET_STD)[:, None, None]


def to_image(x):
    # A normalised (3, H, W) tensor -> an (H, W, 3) array in [0, 1] for imshow.
    return (x * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy()


examples = [train_all.targets.index(c) + 7 for c in (1, 2, 7, 8)]  # a car, a bird, a horse, a ship
fig, axes = plt.subplots(len(examples), 3 + N_LOCAL, figsize=(1.25 * (3 + N_LOCAL), 1.35 * len(examples)))
for row, index in zip(axes, examples):
    image, label = train_all[index]
    crops, masks = aug(image, torch.Generator().manual_seed(index))
    row[0].imshow(image)
    row[0].set_title(f"original: {CLASSES[label]}")
    for j, (ax, crop) in enumerate(zip(row[1:], crops)):
        ax.imshow(to_image(crop))
        ax.set_title(f"global {j + 1}" if j < 2 else f"local {j - 1}")
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()
print("views of one image:", [tuple(c.shape) for c in crops], "  masks:", tuple(masks.shape))


# %% [markdown]
# The local crops are shown at the same size as the global ones, but they hold a quarter of the pixels
# (16×16). The same call also returned `masks`: one boolean mask per **global** crop over its grid of
# $8 \times 8$ patches (32 px / patch size 4). Local crops are never masked. Masks are next.

# %% [markdown]
# ## 2. Masks: which patches the student sees as `[MASK]`
#
# A ViT cuts an image into patches (here 4×4 pixels, an $h \times w = 8 \times 8$ grid; on ImageNet 16×16
# pixels, a $14 \times 14$ grid). Patches are numbered row by row, $n = i \cdot w + j$. For each global crop
# $u$ a mask $m_{u,n} \in \{0, 1\}$ marks the patches the student will not see.
#
# **How many.** The recipe draws a *prediction ratio* $r$ per crop: with `ratios = [0, 0.3]` and
# `vars = [0, 0.2]` it draws $r_i \sim U(\text{ratio}_i - \text{var}_i, \text{ratio}_i + \text{var}_i)$ for each
# pair and keeps one of them at random. So half of the global crops are not masked at all (their [CLS] still
# feeds the [CLS] loss) and the other half mask $U(0.1, 0.5)$ of their patches.
#
# **Which.** *Blockwise* masking (from BEiT) lays random rectangles (aspect ratio between 0.3 and 1/0.3,
# area drawn between $(\min(h, w) // 3)^2$ patches and what is left of the target) until about
# $r \cdot h \cdot w$ patches are covered. *Random* masking picks exactly $\lfloor r \cdot h \cdot w \rfloor$
# patches anywhere. Blocks make the task harder in a useful
# way: an isolated masked patch can be guessed by copying its neighbours, a masked block must be inferred from
# what the rest of the object looks like.

# %%
def shade(image, mask):
    # Paint the masked patches of an (H, W, 3) image dark grey; mask is (h, w) bool.
    size = image.shape[0] // mask.shape[0]
    pixels = np.kron(mask.numpy(), np.ones((size, size), dtype=bool))[..., None]
    return np.where(pixels, 0.25, image)


image = np.asarray(train_all[examples[0]][0]) / 255  # the car, as it is
ratios = [0.1, 0.2, 0.3, 0.5]
fig, axes = plt.subplots(3, len(ratios), figsize=(1.8 * len(ratios), 5.6))
for k, r in enumerate(ratios):
    gen = torch.Generator().manual_seed(k)
    block, rand = M.block_mask(8, 8, r, generator=gen), M.random_mask(8, 8, r, generator=gen)
    big = M.block_mask(14, 14, r, generator=gen)
    axes[0, k].imshow(shade(image, block))
    axes[0, k].set_title(f"block, r={r}: {int(block.sum())}/64")
    axes[1, k].imshow(shade(image, rand))
    axes[1, k].set_title(f"random, r={r}: {int(rand.sum())}/64")
    axes[2, k].imshow(big, cmap="gray_r", vmin=0, vmax=1.4)
    axes[2, k].set_title(f"14x14, r={r}: {int(big.sum())}/196")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()

# %% [markdown]
# Top: blocks on our $8 \times 8$ grid. Middle: random masks of the same ratio. Bottom: blocks on the
# $14 \times 14$ grid of a 224-px ImageNet crop, where their shape is easier to see.
#
# Now the recipe's distribution: how much of a crop ends up masked when $r$ is drawn as above. The block
# sampler stops when no rectangle fits the remaining budget, so it usually stays a little *below* its
# target.

# %%
gen = torch.Generator().manual_seed(0)
fractions = {side: torch.tensor([M.sample_masks(1, side, side, generator=gen).float().mean().item()
                                 for _ in range(1500)]) for side in (8, 14)}
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
for side, f in fractions.items():
    axes[0].hist(f[f > 0].numpy(), bins=np.linspace(0, 0.55, 23), alpha=0.6,
                 label=f"{side}x{side} grid ({100 * (f == 0).float().mean():.0f}% not masked)")
axes[0].set_xlabel("masked fraction of a global crop (masked crops only)")
axes[0].set_ylabel("crops (of 1500)")
axes[0].legend(fontsize=7)
axes[0].set_title("ratio drawn as in the recipe")

targets = [0.1, 0.2, 0.3, 0.4, 0.5]
for side in (8, 14):
    mean_block = [torch.stack([M.block_mask(side, side, r, gen) for _ in range(100)]).float().mean().item()
                  for r in targets]
    axes[1].plot(targets, mean_block, "o-", label=f"block, {side}x{side}")
axes[1].plot(targets, targets, "k--", lw=1, label="target r")
axes[1].set_xlabel("target ratio r")
axes[1].set_ylabel("mean masked fraction")
axes[1].set_title("blocks stay a little below target")
axes[1].legend()
fig.tight_layout()
plt.show()
for side, f in fractions.items():
    masked = f[f > 0]
    print(f"{side}x{side}: {100 * (f == 0).float().mean():.0f}% of crops unmasked; the others mask "
          f"{masked.mean():.3f} of their patches on average (target: mean of U(0.1, 0.5) = 0.3)")

# %% [markdown]
# ## 3. The ViT forward pass with a mask
#
# The backbone is a standard ViT (timm/DINO parameter names). With a mask, one thing changes, before
# anything else happens: the embedding of every masked patch is **replaced** by a single learned vector
# $e_{[\mathrm{MASK}]}$ (`masked_embed`, shape $(1, D)$). The [CLS] token and the position embeddings are
# added afterwards, so a masked token still knows *where* it is, only not *what* was there. Only the student
# has `masked_embed`; the teacher always sees the full crop.
#
# We use the smallest architecture of `ARCHS`, `vit_nano` ($D = 128$, 4 blocks, 2 heads), with 4-pixel patches. Below, the
# steps of `VisionTransformer.prepare_tokens` and `forward` are called one at a time to print the shapes, and
# checked against the module's own forward pass.

# %%
cfg = M.IBOTConfig(arch="vit_nano", patch_size=4, global_size=32, out_dim=1024, patch_out_dim=1024,
                   head_hidden_dim=512, head_bottleneck_dim=128, local_crops=N_LOCAL)
torch.manual_seed(0)
model = M.IBOT(cfg)
count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
print(f"student backbone {count(model.student.backbone) / 1e6:.2f}M parameters, head "
      f"{count(model.student.head) / 1e6:.2f}M; the teacher is a copy without masked_embed")

batch = [aug(train_all[i][0], torch.Generator().manual_seed(i)) for i in examples]
x = torch.stack([crops[0] for crops, _ in batch])  # the first global crop of 4 images: (B, 3, 32, 32)
mask = torch.stack([masks[0] for _, masks in batch]).flatten(1)  # (B, h*w) = (B, 64), row-major
mask[:, 18:22] = mask[:, 26:30] = True  # make sure every image has masked patches for this demo

vit = model.student.backbone.eval()  # eval: no drop path, so the two computations below agree exactly
B = x.shape[0]
patches = vit.patch_embed(x)
print(f"images                       {tuple(x.shape)}   (B, C, H, W)")
print(f"patch embeddings             {tuple(patches.shape)}   (B, N, D), N = (32/4)^2")
tokens = torch.where(mask[..., None], vit.masked_embed, patches)  # masked positions -> e_[MASK]
print(f"after masked_embed           {tuple(tokens.shape)}   {int(mask.sum())} of {mask.numel()} replaced")
tokens = torch.cat([vit.cls_token.expand(B, -1, -1), tokens], dim=1)
print(f"with [CLS] in front          {tuple(tokens.shape)}   (B, 1+N, D)")
tokens = tokens + vit.interpolate_pos_embed(8, 8)
print(f"plus position embeddings     {tuple(tokens.shape)}")
assert torch.equal(tokens, vit.prepare_tokens(x, mask))
for i, block in enumerate(vit.blocks):
    tokens = block(tokens)
    print(f"after block {i}                {tuple(tokens.shape)}")
tokens = vit.norm(tokens)
print(f"final LayerNorm              {tuple(tokens.shape)}   token 0 is [CLS], tokens 1.. the patches")
print("same as vit(x, mask=mask):", torch.allclose(tokens, vit(x, mask=mask), atol=1e-6))

cls_logits, patch_logits = model.student.head(tokens)
print(f"head: [CLS] logits {tuple(cls_logits.shape)} (B, K), patch logits {tuple(patch_logits.shape)} (B, N, K)")
local = torch.stack([crops[2] for crops, _ in batch])
print(f"a local crop {tuple(local.shape)} gives {tuple(vit(local).shape)} tokens: a 4x4 grid, position "
      "embeddings interpolated")
_ = vit.train()


# %% [markdown]
# The **head** maps every output token to $K$ logits: an MLP to a 128-d bottleneck (256 in the paper),
# L2 normalisation, then a weight-normalised linear layer whose $K$ rows are the **prototypes**. A logit is
# thus (up to a learned scale) the cosine between a token and a prototype. With the shared head used here
# (the paper's recipe) the [CLS] token and the patch tokens are scored against the same prototypes. We use
# $K = 1024$ and a 512-wide MLP instead of 8192 and 2048, to fit a CPU.
#
# During training (`IBOT.forward`) the teacher runs on the unmasked global crops, the student runs on the
# masked global crops and, separately, on the local crops (only their [CLS] is used).

# %% [markdown]
# ## 4. The online tokenizer: centring and sharpening
#
# The teacher turns its logits into targets with a softmax at a **low temperature**:
#
# $$P_u = \mathrm{softmax}\big((t_u - c)/\tau_t\big), \qquad Q_{u,n} = \mathrm{softmax}\big((t_{u,n} - c')/\tau_t'\big)$$
#
# $t_u$ is the teacher's [CLS] logit vector for global crop $u$, $t_{u,n}$ the one of patch $n$.
# $Q_{u,n}$ is the **visual token** of patch $n$: a soft choice among the $K$ prototypes. The student's
# predictions use a higher temperature, $\mathrm{softmax}(s/\tau_s)$ with $\tau_s = 0.1$.
#
# Two forces keep the targets informative; without them student and teacher can agree trivially:
#
# * **Sharpening** ($\tau_t$, $\tau_t'$ from 0.04 to 0.07, below $\tau_s$) makes each target confident:
#   low entropy per patch. Alone, it lets one prototype win for every image (collapse to a constant).
# * **Centring** subtracts a running mean of the teacher's logits, $c$ for [CLS] and $c'$ for patches
#   (updated after each step: $c \leftarrow 0.9\,c + 0.1\,\overline{t_u}$). It keeps any prototype from winning
#   everywhere: the *average* target stays spread out. Alone, it flattens every target towards uniform.
#
# Below, the teacher (untrained for now) tokenizes the patches of 30 global crops. Left: $Q_{u,n}$ for three
# patches at $\tau_t' = 0.04$. Right: entropies against the temperature. The blue curve is the mean entropy
# of one patch's token (how sharp each target is), the orange one the entropy of the batch-average token
# (how many prototypes are in use; $\ln K$ means all of them equally). To see what centring is for, the red
# curves add a *drift* to every logit, a small shared preference for one prototype, which is how collapse
# starts during training: without centring (dashed) that prototype wins everywhere once the temperature is
# low; with centring (dotted) the drift is subtracted and the orange curve comes back.

# %%
def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


views = torch.stack([aug(train_all[i][0], torch.Generator().manual_seed(i))[0][0] for i in range(0, 45000, 1500)])
with torch.no_grad():
    _, t_patch = model.teacher.head(model.teacher.backbone(views))  # t_{u,n}: (B, N, K)
c_prime = t_patch.mean(dim=(0, 1))  # the value the running centre c' settles at for these logits
drift = torch.zeros_like(c_prime)
drift[7] = 0.3  # every patch likes prototype 7 a little more (the logits spread by about 0.09)

fig, axes = plt.subplots(1, 2, figsize=(9.5, 2.9))
Q = F.softmax((t_patch[0] - c_prime) / 0.04, dim=-1)  # Q_{u,n} of the first crop's 64 patches: (N, K)
for n in (0, 27, 63):
    top = Q[n].sort(descending=True).values[:40]
    axes[0].plot(top.numpy(), "o-", ms=3, label=f"patch n={n}: entropy {entropy(Q[n]):.2f}")
axes[0].set_xlabel("prototypes, most probable first (40 of 1024)")
axes[0].set_ylabel("$Q_{u,n}$")
axes[0].set_title("teacher tokens of three patches, $\\tau_t'$ = 0.04")
axes[0].legend()

temps = torch.logspace(-2, 0, 30)
curves = {"one patch's token": [], "batch-average token": [], "drift, not centred": [], "drift, centred": []}
for tau in temps:
    q = F.softmax((t_patch - c_prime) / tau, dim=-1)
    curves["one patch's token"].append(entropy(q).mean())
    curves["batch-average token"].append(entropy(q.mean(dim=(0, 1))))
    drifted = t_patch + drift
    centred = drifted - drifted.mean(dim=(0, 1))  # c' = the mean, so the drift is subtracted
    curves["drift, not centred"].append(entropy(F.softmax(drifted / tau, dim=-1).mean(dim=(0, 1))))
    curves["drift, centred"].append(entropy(F.softmax(centred / tau, dim=-1).mean(dim=(0, 1))))
for (name, values), style in zip(curves.items(), ("C0-", "C1-", "C3--", "C3:")):
    axes[1].semilogx(temps, values, style, lw=2 if style == "C3:" else 1.5, label=name)
axes[1].axhline(math.log(cfg.patch_out_dim), color="gray", lw=1)
axes[1].axvspan(0.04, 0.07, color="C2", alpha=0.15, label="$\\tau_t'$: 0.04 to 0.07")
axes[1].axvline(0.1, color="k", lw=1, ls="-.", label="$\\tau_s$ = 0.1")
axes[1].set_xlabel("temperature")
axes[1].set_ylabel("entropy (nats)")
axes[1].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# Lower temperatures sharpen every token (blue falls far below $\ln K$) while the batch as a whole still
# spreads over many prototypes (orange stays high): confident, *diverse* visual words. The drift shows the
# danger of sharpening alone (red dashed: one prototype takes over as the temperature drops) and the cure,
# centring (red dotted, on top of orange). Between them, centring and sharpening keep the teacher from both
# kinds of collapse: every image the same token, or every token uniform. At initialisation the teacher's tokens
# differ little from patch to patch; section 7 looks at them after training.

# %% [markdown]
# ## 5. The loss, by hand and by `IBOTLoss`
#
# Per image, with $g$ global and $l$ local crops, student logits $s_v$ ([CLS] of view $v$) and $s_{u,n}$ (patch
# $n$ of the *masked* global crop $u$):
#
# $$\mathcal{L}_{[\mathrm{CLS}]} = \frac{1}{g\,(g+l-1)} \sum_{u=1}^{g} \sum_{v \ne u} -P_u^\top \log \mathrm{softmax}(s_v/\tau_s)$$
#
# $$\mathcal{L}_{\mathrm{MIM}} = \frac{1}{g} \sum_{u=1}^{g} \frac{\sum_n m_{u,n}\,\big(-Q_{u,n}^\top \log \mathrm{softmax}(s_{u,n}/\tau_s)\big)}{\max(1, \sum_n m_{u,n})}$$
#
# $$\mathcal{L} = \lambda_1 \mathcal{L}_{[\mathrm{CLS}]} + \lambda_2 \mathcal{L}_{\mathrm{MIM}}, \qquad \lambda_1 = \lambda_2 = 1,$$
#
# each averaged over the batch. The [CLS] term pairs *different* views only (a view predicting itself teaches
# nothing). The MIM term pairs a global crop only with *itself*: the student's masked version against the
# teacher's unmasked version, and only at masked patches. A crop without masked patches adds 0.
#
# Below, the student and teacher outputs of one real batch are fed both to a literal, loop-by-loop
# transcription of these formulas and to `IBOTLoss`, with non-zero centres $c$, $c'$ so that centring is
# exercised too. Wrote your own version of this loss? `python check_loss.py my_loss.py:make_loss` compares it
# with `IBOTLoss` over a set of cases and names the mistake when they differ (README, "Check your loss").

# %%
B, g, l = 6, cfg.global_crops, cfg.local_crops
items = [aug(train_all[i][0], torch.Generator().manual_seed(i)) for i in range(0, 6000, 1000)]
global_crops, local_crops, masks = D.collate_crops(items)  # crop-major: crop 0 of every image, then crop 1, ...
masks[0, :10] = True  # at least one masked crop, whatever the draw
print(f"global {tuple(global_crops.shape)}, local {tuple(local_crops.shape)}, masks {tuple(masks.shape)}, "
      f"masked patches per global crop: {masks.sum(1).tolist()}")

model.student.eval()  # no drop path, so both computations see identical logits
with torch.no_grad():
    t_cls, t_patch = model.teacher.head(model.teacher.backbone(global_crops))  # (gB, K), (gB, N, K)
    s_cls_global, s_patch = model.student.head(model.student.backbone(global_crops, mask=masks))
    s_cls_local, _ = model.student.head(model.student.backbone(local_crops))
s_cls = torch.cat([s_cls_global, s_cls_local])  # ((g+l)B, K), global views first
model.student.train()

tau_s, tau_t, tau_t_patch, lambda1, lambda2 = 0.1, 0.04, 0.04, 1.0, 1.0
torch.manual_seed(1)
c, c_patch = 0.1 * torch.randn(1, cfg.out_dim), 0.1 * torch.randn(1, 1, cfg.patch_out_dim)

# --- by hand, one image, one view pair, one patch at a time ---
V = g + l
s = s_cls.view(V, B, -1)
t = t_cls.view(g, B, -1)
sp, tp, m = s_patch.view(g, B, -1, cfg.patch_out_dim), t_patch.view(g, B, -1, cfg.patch_out_dim), masks.view(g, B, -1)
L_cls = L_mim = 0.0
for b in range(B):
    for u in range(g):
        P_u = F.softmax((t[u, b] - c[0]) / tau_t, dim=-1)
        for v in range(V):
            if v != u:
                L_cls += -(P_u * F.log_softmax(s[v, b] / tau_s, dim=-1)).sum() / (g * (V - 1)) / B
        ce_sum = 0.0
        for n in range(m.shape[-1]):
            if m[u, b, n]:
                Q_un = F.softmax((tp[u, b, n] - c_patch[0, 0]) / tau_t_patch, dim=-1)
                ce_sum += -(Q_un * F.log_softmax(sp[u, b, n] / tau_s, dim=-1)).sum()
        L_mim += ce_sum / max(1, int(m[u, b].sum())) / g / B
by_hand = {"cls": lambda1 * L_cls, "patch": lambda2 * L_mim}

# --- the module ---
loss_fn = M.IBOTLoss(out_dim=cfg.out_dim, patch_out_dim=cfg.patch_out_dim, n_global_crops=g, n_local_crops=l,
                     student_temp=tau_s, center_momentum=0.9, patch_center_momentum=0.9, lambda1=lambda1,
                     lambda2=lambda2)
loss_fn.center.copy_(c)
loss_fn.patch_center.copy_(c_patch)
out = loss_fn(s_cls, s_patch, t_cls, t_patch, masks, tau_t, tau_t_patch)

for key in ("cls", "patch"):
    print(f"L_{key:5s} by hand {float(by_hand[key]):.6f}   IBOTLoss {float(out[key]):.6f}")
agree = all(torch.allclose(torch.as_tensor(by_hand[k]), out[k], rtol=1e-5, atol=1e-5) for k in ("cls", "patch"))
print("agree:", agree)

# the centres moved after the call, from all g*B teacher rows and all patches (not only the masked ones)
print("centre update agrees:",
      torch.allclose(loss_fn.center, 0.9 * c + 0.1 * t_cls.mean(0, keepdim=True), atol=1e-6)
      and torch.allclose(loss_fn.patch_center, 0.9 * c_patch + 0.1 * t_patch.mean(dim=(0, 1)), atol=1e-6))

# %% [markdown]
# The module computes the same numbers with tensor operations over the whole batch instead of loops. It uses
# the centres as they were *before* the call and updates them afterwards.
#
# The [CLS] term is not far below $\ln K = 6.93$, the cross-entropy of any target with a uniform prediction:
# an untrained student's softmax at $\tau_s = 0.1$ over logits that are cosines in $[-1, 1]$ is nearly flat.
# The MIM term is lower mainly because the crops without a mask add 0 to its mean (see the masked patches per
# crop printed above). Training has to make the predictions confident *and* specific to the image and the
# patch.

# %% [markdown]
# ## 6. A short training run
#
# Now the whole method on a CIFAR-10 subset of 10,000 images (1,000 per class), with the recipe `train.py` runs on
# a CPU, `train.PRESETS["cifar10-cpu"]` (its choices are measured in [docs/cpu_recipe.md](../docs/cpu_recipe.md)),
# on section 1's views and section 3's networks: the preset also starts the patch embedding as a whitening of the
# images' patches, turns drop path off, takes larger crops and starts the teacher momentum at 0.97, four levers for
# short runs that this section leaves out, so that what it trains is the method as sections 1 to 5 state it. Per
# step:
#
# 1. draw the views and masks of a batch: `batched_views.BatchedMultiCrop` draws section 1's distributions for
#    the whole batch at once in tensor operations, the fast data path `train.py` takes on a CPU;
# 2. `loss = model(global_crops, local_crops, masks, tau_t, tau_t')`: teacher forward (no gradients),
#    student forward, $\mathcal{L}$;
# 3. a gradient step of the student with AdamW (weight decay on weights, not on biases and norms), each
#    gradient clipped to norm 3 as in the official code;
# 4. `model.update_teacher(m)`: $\theta_t \leftarrow m\,\theta_t + (1 - m)\,\theta_s$.
#
# The knobs follow the schedules of the paper, compressed into this run: the learning rate warms up linearly
# for the first 10% of the steps, then decays along a cosine; the weight decay grows from 0.04 to 0.4; the
# **teacher momentum** $m$ rises along a cosine from 0.99 to 1 (the teacher moves less and less). Three values
# differ from the paper's ImageNet ones, because short runs on small images need them:
#
# * a **cold teacher**: $\tau_t = \tau_t' = 0.04$ held for the whole run. The paper warms it up to 0.07; at
#   initialisation the teacher's logits differ so little between images that at 0.07 its targets flatten to
#   uniform, and the student then has nothing to learn (the [CLS] loss sits at $\ln K$);
# * **KoLeo** (from DINOv2) at weight 0.1: $-\frac{1}{B}\sum_i \log \min_{j \ne i} \lVert z_i - z_j \rVert$
#   over the student's normalised [CLS] features $z$ of each global crop's batch, which pushes every image's
#   feature away from its nearest neighbour, so that different images do not collapse onto one feature;
# * a peak learning rate of 4e-3 per 256 images, 8x the paper's and 4x the `cifar10-cpu` preset's: it learns
#   fastest over the first few hundred steps, and this run has 300, where longer runs do better at the preset's
#   1e-3 ([docs/cpu_recipe.md](../docs/cpu_recipe.md#ten-minute-levers)).
#
# Before and after, we measure the teacher's features with the paper's **kNN** protocol: the L2-normalised
# [CLS] output of 1,000 labelled training images forms a bank; each of 1,000 held-out images takes the vote of
# its 20 most similar bank images, weighted by $\exp(\text{similarity}/0.07)$.

# %%
eval_tf = D.eval_transform(32)  # no augmentation: a 32-px image passes through unchanged, then is normalised
bank_loader = torch.utils.data.DataLoader(D.Transformed(per_class(train_all, 100), eval_tf), batch_size=250)
val_loader = torch.utils.data.DataLoader(D.Transformed(per_class(val_all, 100), eval_tf), batch_size=250)


def knn_accuracy(backbone):
    bank = M.extract_features(backbone, bank_loader)
    val = M.extract_features(backbone, val_loader)
    return M.knn_classify(*bank, *val, ks=(20,))[20]


recipe = T.PRESETS["cifar10-cpu"]
run_cfg = dataclasses.replace(cfg, koleo=recipe["koleo"])  # section 3's networks, with the KoLeo term
torch.manual_seed(0)
model = M.IBOT(run_cfg)  # a fresh model
knn_before = knn_accuracy(model.teacher.backbone)
print(f"kNN top-1 before training (random weights): {knn_before:.1f}%  (chance: 10%)")

# %%
STEPS, BATCH = 300, 64  # 1.0 s a step in bf16 on two CPU cores with AVX-512 BF16 (1.7 s in fp32): five minutes
BF16 = pick_precision(None, "cpu") == "bf16"  # as train.py: bf16 where the CPU has AMX or AVX-512 BF16, else fp32
LR = 4e-3 * BATCH / 256  # the peak, scaled from its value per 256 images
TAU_T = recipe["teacher_temp"]  # tau_t = tau_t' = 0.04, held
images = per_class(train_all, 1000)
pixels_all = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image, _ in images])  # uint8
make_views = BV.BatchedMultiCrop(aug)
gen = torch.Generator().manual_seed(0)

lr = M.cosine_schedule(LR, 1e-6, STEPS, warmup_steps=STEPS // 10)  # linear warm-up, then cosine
weight_decay = M.cosine_schedule(0.04, 0.4, STEPS)
momentum = M.cosine_schedule(0.99, 1.0, STEPS)  # m: the teacher slows down
optimizer = torch.optim.AdamW(M.param_groups(model.student), lr=0.0)

probe = torch.stack([eval_tf(images[i * (len(images) // 64)][0]) for i in range(64)])  # 64 fixed images, all classes


@torch.no_grad()
def diagnostics():
    # On the probe images, with the current centres: the entropy of the teacher's [CLS] targets P_u and patch
    # tokens Q_un per image (how sharp) and of their batch average (how many prototypes the batch uses), and the
    # mean cosine between different images' teacher [CLS] features (near 1: every image looks alike).
    features = model.teacher.backbone(probe)
    t_cls, t_patch = model.teacher.head(features)
    P = F.softmax((t_cls - model.loss.center) / TAU_T, dim=-1)
    Q = F.softmax((t_patch - model.loss.patch_center) / TAU_T, dim=-1).flatten(0, 1)
    z = F.normalize(features[:, 0], dim=-1)
    n = len(z)
    return {"P": entropy(P).mean().item(), "mean P": entropy(P.mean(0)).item(),
            "Q": entropy(Q).mean().item(), "mean Q": entropy(Q.mean(0)).item(),
            "cosine": ((z @ z.T).sum().item() - n) / (n * (n - 1))}


history, diagnosed, start = [], [], time.perf_counter()
for step in range(STEPS):
    if step % 10 == 0:
        diagnosed.append((step, diagnostics()))
    batch = torch.randint(len(images), (BATCH,), generator=gen)
    global_crops, local_crops, masks = make_views(pixels_all[batch], gen)
    for group in optimizer.param_groups:
        group["lr"] = float(lr[step])
    optimizer.param_groups[0]["weight_decay"] = float(weight_decay[step])  # group 1: biases, norms
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):  # the prototype layer and the loss stay fp32
        out = model(global_crops, local_crops, masks, TAU_T, TAU_T)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    T.clip_gradients(list(model.student.parameters()), 3.0)  # per parameter, as the official code
    optimizer.step()
    model.update_teacher(float(momentum[step]))
    history.append({k: v.item() for k, v in out.items()})
diagnosed.append((STEPS, diagnostics()))
train_seconds = time.perf_counter() - start
print(f"{STEPS} steps of batch {BATCH} ({STEPS * BATCH} images, {STEPS * BATCH / len(images):.1f} epochs) "
      f"in {train_seconds:.0f} s, {'bf16' if BF16 else 'fp32'}")
print(f"the teacher keeps {momentum.prod():.0%} of its initial weights (the product of all m)")
knn_after = knn_accuracy(model.teacher.backbone)
n_val = len(val_loader.dataset)
noise = 100 * math.sqrt(0.3 * 0.7 / n_val)  # the standard error of an accuracy near 30% on n_val images
print(f"kNN top-1: {knn_before:.1f}% before, {knn_after:.1f}% after ({knn_after - knn_before:+.1f} points; "
      f"one accuracy on {n_val} images is uncertain by about +-{noise:.1f} points)")
first, last = diagnosed[0][1], diagnosed[-1][1]
print(f"[CLS] target entropy per image {first['P']:.2f} -> {last['P']:.2f}, of the batch mean "
      f"{first['mean P']:.2f} -> {last['mean P']:.2f} (ln K = {math.log(cfg.out_dim):.2f}); feature cosine "
      f"{first['cosine']:.2f} -> {last['cosine']:.2f}; [CLS] loss over the last 10 steps "
      f"{np.mean([h['cls'] for h in history[-10:]]):.2f}")

# %%
fig, axes = plt.subplots(2, 2, figsize=(10, 5.4))
steps = np.arange(STEPS)
smooth = lambda v: np.convolve(v, np.ones(9) / 9, mode="valid")  # noqa: E731
ax = axes[0, 0]
for key, name in (("cls", "$\\lambda_1 \\mathcal{L}_{[CLS]}$"), ("patch", "$\\lambda_2 \\mathcal{L}_{MIM}$")):
    values = np.array([h[key] for h in history])
    ax.plot(steps, values, alpha=0.3)
    ax.plot(steps[4:-4], smooth(values), color=ax.lines[-1].get_color(), label=name)
ax.axhline(math.log(cfg.out_dim), color="gray", lw=1, ls="--", label="$\\ln K$")
ax.axhline(math.log(cfg.out_dim) / 2, color="gray", lw=1, ls=":", label="$\\ln K$ / 2")
ax.set_title("losses")
ax.legend(fontsize=8)

ax = axes[0, 1]
at = [s for s, _ in diagnosed]
for key, style, name in (("P", "C0-", "[CLS] target $P_u$, per image"),
                         ("mean P", "C0--", "[CLS], batch average"),
                         ("Q", "C1-", "patch token $Q_{u,n}$, per patch"),
                         ("mean Q", "C1--", "patches, batch average")):
    ax.plot(at, [d[key] for _, d in diagnosed], style, label=name)
ax.axhline(math.log(cfg.out_dim), color="gray", lw=1, ls="--")
ax.set_title("entropy of the teacher's targets (nats)")
ax.legend(fontsize=7)

ax = axes[1, 0]
ax.plot(at, [d["cosine"] for _, d in diagnosed], "C4-", label="cosine of different images' features")
ax.set_ylim(bottom=0)
ax.set_xlabel("step")
ax.set_title("teacher [CLS] features, and KoLeo")
ax_koleo = ax.twinx()
ax_koleo.plot(steps, [h["koleo"] for h in history], color="C5", alpha=0.6, label="KoLeo term (student)")
ax.legend(loc="upper left", fontsize=7)
ax_koleo.legend(loc="upper right", fontsize=7)

ax = axes[1, 1]
ax.plot(steps, momentum, label="teacher momentum $m$")
ax.set_xlabel("step")
ax.set_title("schedules ($\\tau_t = \\tau_t'$ = 0.04 held)")
ax_lr = ax.twinx()
ax_lr.plot(steps, lr, color="C2", ls=":", label="learning rate")
ax.legend(loc="lower left", fontsize=7)
ax_lr.legend(loc="lower right", fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# **What happened.** (The figures here are from the run above on a 2-core AMD EPYC CPU with AVX-512 BF16 and no
# AMX, in bf16, torch 2.14.1; they are printed above each time the notebook runs.) The features learned
# something: kNN rose from 23.7% to 26.5%, 2.8 points, twice the +-1.4 points by which one accuracy on these
# 1,000 images is uncertain. The curves show how. The teacher's [CLS] features of different images, alike at initialisation
# (mean cosine 0.51), spread apart to 0.26, while the KoLeo term, the student's features' distance to their
# nearest neighbour in the batch, falls from about 1.5 to 0.1: KoLeo and the cold teacher keep the images
# apart. The entropy panel shows the centre at work: at step 0 the centre $c$ is still zero and the targets are
# sharp (4.70 per image), but sharp in the same way for every image (5.43 for their batch mean); as $c$ learns
# the shared part of the teacher's output and subtracts it, both rise, and from step 100 on each image's target
# sharpens again (6.45 to 6.35) while the batch mean stays spread (6.78 of $\ln K = 6.93$): images get
# targets of their own. The [CLS] loss, 6.70 at the end, sits a little below $\ln K$, the cross-entropy of a
# uniform prediction: with the teacher held cold its targets keep some shape, where a ramp of $\tau_t$ to 0.07
# flattens them within a few dozen steps and pins the loss at $\ln K$
# ([docs/cpu_recipe.md](../docs/cpu_recipe.md)). The MIM loss, about 3, sits below $\ln K / 2$ because half
# of the global crops carry no mask and count as 0 in the batch mean (section 2).
#
# This is the start of the curve, 1.9 epochs of 10,000 images: with the same recipe on all 45,000 training
# images, `train.py --budget 10m` gains about 6 kNN points and one hour 17 (docs/cpu_recipe.md and the
# README). The paper trains ViT-S/16 for 800 ImageNet epochs, about a million steps of 1,024 images.

# %% [markdown]
# ## 7. What the teacher looks at
#
# Three pictures of what iBOT learns, drawn for our teacher on held-out images by the functions of
# [`visualize.py`](../visualize.py), which draws them for any checkpoint from the command line
# (`python visualize.py --checkpoint CKPT --images FILE_OR_DIR ... --output OUT.png`: ours, and the official iBOT
# and DINO ViTs at 224 px).
#
# **[CLS] attention.** In the last block, the attention weights from the [CLS] token to the 64 patches show
# where the image-level representation gathers its information. DINO and iBOT report that, after long
# training, these maps pick out the foreground object without ever being told what an object is. Each head
# is drawn separately.
#
# **Patch tokens grouped.** How each patch's output token differs from its image's mean token, projected on the
# three directions along which those differences vary most (PCA over all the images shown) and drawn as red,
# green and blue: patches of similar colour are represented alike.
#
# **Top prototype.** The teacher's patch tokens are the "visual words" of the MIM task. Colouring every patch
# by its most probable prototype, $\arg\max_k Q_{u,n}$, shows how the tokenizer splits an image into parts.
# The paper (Fig. 1 and Sec. 4.4) finds that patches of the same kind of part (the tyre of a car, the eye of a
# dog) share prototypes across images: *local semantics*, learned without labels.

# %%
import visualize as V  # noqa: E402  the pictures of any checkpoint

shown = [val_all.targets.index(c) + 1 for c in (0, 1, 4, 7, 8, 9)]  # held-out images of six classes
x = torch.stack([eval_tf(val_all[i][0]) for i in shown])  # (6, 3, 32, 32), normalised
pixels = torch.stack([torch.from_numpy(np.array(val_all[i][0])) for i in shown]) / 255  # (6, 32, 32, 3) to show
names = [CLASSES[val_all[i][1]] for i in shown]


def draw_teacher(viewed: V.Viewed, title: str) -> None:
    pictures = V.look(viewed, pixels, x)  # [CLS] attention, PCA colours, top prototypes
    V.draw(pictures, names, title)
    plt.show()
    print(f"{title}: {pictures.prototypes.unique().numel()} different prototypes are the top choice of the "
          f"{pictures.prototypes.numel()} patches shown (K = {V.patch_prototypes(viewed.head)})")


model.eval()
draw_teacher(V.Viewed(model.teacher.backbone, model.teacher.head, model.loss.patch_center.flatten()),
             "the model of section 6")

# %% [markdown]
# After a short run the teacher is still close to its random initialisation (see the share of initial weights
# it keeps), so these pictures are near the *starting point*: the attention maps do not outline the objects, and
# both the colours and the prototype map group patches by colour and brightness (sky, water, background), which
# a random patch embedding, a linear map of the pixels, already does. After a long run the same cell shows what
# the paper reports: [CLS] attention that follows the object's outline, and prototypes shared by the same kind of
# part across images (wheels, heads, sky) rather than by the same colour.

# %% [markdown]
# **The shipped model.** `models/ibot_vit_nano_cifar10.pth` is the teacher of a two-hour run on a 2-core CPU,
# `python train.py --budget 2h --lr 4e-3 --lambda2 0.5`: the same model size and the `cifar10-cpu` preset of
# section 6, with the four short-run levers that section leaves out, at four times the preset's learning rate and
# with the MIM term at half its weight ($\lambda_2 = 0.5$), for 11,781 steps of 64 images, 16.8 epochs
# (docs/results.md). `visualize.load` reads it as it reads any
# checkpoint, with `torch.load(..., weights_only=True)`: its teacher's backbone, its head and the centre $c'$.

# %%
shipped = V.load(ROOT / "models" / "ibot_vit_nano_cifar10.pth")
knn_shipped = knn_accuracy(shipped.backbone)
print(f"shipped model: kNN top-1 here {knn_shipped:.1f}% (the model of section 6: {knn_after:.1f}%)")
draw_teacher(shipped, "the shipped model")

# %% [markdown]
# **Nearest neighbours.** What the kNN score counts: for a few held-out images, the five bank images whose
# teacher [CLS] features are most similar (cosine), with their classes.

# %%
bank_features, bank_labels = M.extract_features(shipped.backbone, bank_loader)
bank_images = per_class(train_all, 100)
with torch.no_grad():
    query_features = F.normalize(shipped.backbone(x)[:, 0], dim=-1)
nearest = (query_features @ bank_features.T).topk(5, dim=1).indices  # (6, 5)
fig, axes = plt.subplots(len(shown), 6, figsize=(9, 1.6 * len(shown)))
for row, index, neighbours in zip(axes, shown, nearest):
    row[0].imshow(val_all[index][0])
    row[0].set_title(f"query: {CLASSES[val_all[index][1]]}", fontsize=8)
    for ax, j in zip(row[1:], neighbours.tolist()):
        image, label = bank_images[j]
        ax.imshow(image)
        ax.set_title(CLASSES[label], fontsize=8, color="green" if label == val_all[index][1] else "red")
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()
hits = sum(int(bank_labels[j] == val_all[i][1]) for i, row in zip(shown, nearest) for j in row.tolist())
print(f"{hits} of {nearest.numel()} neighbours share the query's class")

# %% [markdown]
# **What the shipped model does and does not see yet.** Its nearest neighbours often share the query's kind
# of scene rather than its class: cars and trucks, ships and aeroplanes on sky or water, animals on grass; the
# count above says how many share the class exactly (chance is 1 in 10). Its prototype maps begin to separate
# an object from its background (one prototype for the animal or the vehicle, another for the grass or the
# sky), but a prototype still stands for a region of similar colour and texture, not yet for a part such as a
# wheel or a head. The [CLS] attention maps are still scattered: they do not outline the object.
#
# Its training goes on where section 6 stops: with $\tau_t$ held at 0.04 the [CLS] loss fell from
# $\ln K = 6.93$ to 3.8 over the two hours and the teacher's per-image target entropy from 5.7 to 1.6, while the
# entropy of the batch average stayed between 4.9 and 6.5: confident targets that differ from image to image. Its
# kNN score rose from 29.1% at initialisation (the whitened patch embedding) to 57.1%, most of it in the first
# hour and a half (docs/results.md, with the curve). The paper's pictures come
# from ViT-S/16 after 800 ImageNet epochs; this is a 0.8M-parameter model after seventeen CIFAR epochs.

# %% [markdown]
# ## Where to go from here
#
# * `python train.py --budget 5m` runs the same method on this model size for five minutes, saves checkpoints
#   and resumes them, and draws its curves with the collapse diagnostics; its docstring gives the GPU and
#   multi-GPU commands. Its CPU recipe holds $\tau_t$ at 0.04, raises the learning rate and adds DINOv2's
#   KoLeo regulariser (`--koleo 0.1`), which pushes each image's [CLS] feature away from its nearest neighbour in
#   the batch; docs/cpu_recipe.md has the ablations, docs/results.md the curves of the longer runs.
# * `python visualize.py --checkpoint ibot_vits16_checkpoint.pth --images photos/ --output look.png` draws the
#   pictures of section 7 for a fully trained official ViT-S/16 (224 px); `checkpoints.load_backbone(path)` reads
#   this project's checkpoints as well as the official iBOT and DINO ones and timm's.
# * [`docs/method.md`](../docs/method.md) states every formula and recipe value used above, with the official
#   ViT-S/16 recipe.
