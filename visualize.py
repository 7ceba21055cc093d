"""Pictures of what a ViT looks at, for any checkpoint checkpoints.load_backbone reads: ours, official iBOT / DINO
(at 224 px), DeiT / MAE and timm.

    python visualize.py --checkpoint models/ibot_vit_nano_cifar10.pth --images cat.png photos/ --output look.png
    python visualize.py --checkpoint ibot_vits16_checkpoint.pth --images photos/ --output vits16.png --which student

One row per image, from left to right:
  * the image as the ViT sees it: resized and centre-cropped to --size (default: the size its position embeddings
    were made for), the evaluation transform of data.py;
  * the last block's attention from [CLS] to every patch, one panel per head
    (VisionTransformer.get_last_selfattention): where the image-level feature gathers its information;
  * the patch tokens grouped: their first three principal components as red, green and blue, computed over all
    the images drawn together, so a colour means the same in every row;
  * when the checkpoint has a projection head (ours and the official iBOT / DINO files keep it under the teacher's
    and the student's `head.` keys, with `last_layer` prototypes): each patch's top prototype,
    argmax_k (t_{u,n} - c')_k, the teacher's visual token of that patch (docs/method.md, "The loss": Q_{u,n}),
    one colour per prototype, the same in every row.

A missing file, a file that is not an image and a damaged checkpoint each give one line on stderr and exit code 2.
The functions (load, read_images, cls_attention, pca_colours, top_prototypes, draw) draw the same pictures in
notebooks/ibot_walkthrough.py.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints as C
import data as D
import ibot_min as M
from runtime import pick_device

PANEL_INCHES, HEADER_INCHES, DPI = 1.6, 0.45, 100  # a panel is 160 x 160 pixels in the PNG, the title strip 45 high


@dataclass
class Viewed:
    """What a checkpoint gives the pictures: its backbone, its head (None without one) and the patch centre c'
    its teacher targets subtract (None for a student, or where the file keeps none)."""

    backbone: M.VisionTransformer
    head: M.IBOTHead | None
    patch_center: torch.Tensor | None  # (K_p,)
    note: str = ""  # why no prototypes are drawn, when the file has a head that does not fit


# ---------------------------------------------------------------------------------------------------
# ---- reading: the checkpoint, its head, the images ----


def head_of(ckpt: dict, which: str) -> tuple[M.IBOTHead | None, str]:
    """The projection head under ckpt[which]'s `head.` keys (ours: head., official: module.head. in the student),
    as an IBOTHead sized from its weights, or (None, why not). An official head that shares its prototypes keeps
    them twice, as last_layer and last_layer2; they load as two equal layers."""
    state = ckpt.get(which)
    if not isinstance(state, dict):
        return None, ""
    head = {k.removeprefix("module.").removeprefix("head."): v for k, v in state.items()
            if torch.is_tensor(v) and k.removeprefix("module.").startswith("head.")}
    if "last_layer.weight_v" not in head:
        return None, ""
    try:
        hidden, in_dim = head["mlp.0.weight"].shape
        bottleneck = head["mlp.4.weight"].shape[0]
        out_dim = head["last_layer.weight_v"].shape[0]
        patch_out_dim = head.get("last_layer2.weight_v", head["last_layer.weight_v"]).shape[0]
        module = M.IBOTHead(in_dim, out_dim, patch_out_dim, shared="last_layer2.weight_v" not in head,
                            hidden_dim=hidden, bottleneck_dim=bottleneck)
        module.load_state_dict(head)
    except (KeyError, RuntimeError) as e:  # another layer count, batch norm in the MLP, ...
        return None, (f"its {which} head does not fit a 3-layer iBOT / DINO head ({' '.join(str(e).split())[:100]}); "
                      f"no prototypes drawn")
    return module.eval(), ""


def load(path: str | Path, which: str = "teacher") -> Viewed:
    """A checkpoint's backbone, head and patch centre c' (ibot_loss.center2 in ours and the official files).
    Errors are ValueErrors (FileNotFoundError for a missing file) that name the file."""
    ckpt = C.read_checkpoint(path)
    if which == "student" and "teacher" in ckpt and "student" not in ckpt:
        raise ValueError(f"{path} holds a teacher only (such as a shipped model), no student; drop --which student")
    try:
        backbone = C.load_backbone(ckpt, which).eval()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    head, note = head_of(ckpt, which)
    losses = ckpt.get("ibot_loss")
    center = losses.get("center2") if isinstance(losses, dict) and which == "teacher" else None
    if head is None or not torch.is_tensor(center) or center.numel() != patch_prototypes(head):
        center = None  # a student's predictions are not centred; DINO's files keep a [CLS] centre only
    return Viewed(backbone, head, None if center is None else center.flatten().float(), note)


def patch_prototypes(head: M.IBOTHead) -> int:
    """K_p, the number of prototypes patch tokens are scored against."""
    return (head.last_layer if head.last_layer2 is None else head.last_layer2).weight_v.shape[0]


def image_files(paths: list[str], max_images: int) -> list[Path]:
    """Files as given and the images in folders (data.ImageTree's order), at most max_images of them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [Path(f) for f, _ in D.image_tree(p).samples]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image {p} does not exist")
    return files[:max_images]


def read_images(files: list[Path], size: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Image files -> (pixels (B, size, size, C) in [0, 1] to show, normalised (B, C, size, size) to feed)."""
    transform = D.eval_transform(size, channels)  # [grayscale,] resize, centre crop, to tensor, normalise
    as_tensor = type(transform)(transform.transforms[:-1])  # everything but the normalisation
    pixels = torch.stack([as_tensor(D.read_image(str(f))) for f in files])  # (B, C, size, size)
    return pixels.permute(0, 2, 3, 1), transform.transforms[-1](pixels)


# ---------------------------------------------------------------------------------------------------
# ---- what is drawn: [CLS] attention, patch tokens grouped, top prototypes ----


@torch.no_grad()
def cls_attention(backbone: M.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, 1+N): the last block's attention row of [CLS], softmax(q_cls k^T / sqrt(d)) per
    head; entry 0 is [CLS] to itself, entries 1.. the patches, row-major."""
    return backbone.get_last_selfattention(x)[:, :, 0].float()


def pca_colours(patch_tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens -> (B, N, 3) colours in [0, 1]: how each patch differs from its image's mean token,
    projected on the first three principal directions of those differences over all B*N patches together and
    stretched to [0, 1] over them. Shared directions give a colour the same meaning in every row; taking out
    each image's mean leaves the parts within an image, which the differences between images would otherwise
    drown. Each direction's sign is fixed so that its largest weight is positive."""
    z = (patch_tokens - patch_tokens.mean(1, keepdim=True)).flatten(0, 1).double()  # (B*N, D)
    _, s, v = torch.linalg.svd(z, full_matrices=False)  # rows of v: principal directions, by variance
    v = v[:3][s[:3] > 1e-6 * s[0].clamp_min(1e-30)]  # fewer than 3 that vary (D or N below 4): the rest black
    v = v * v.gather(1, v.abs().argmax(1, keepdim=True)).sign()
    p = z @ v.T  # (B*N, <=3)
    p = (p - p.min(0).values) / (p.max(0).values - p.min(0).values)
    p = F.pad(p, (0, 3 - p.shape[1]))
    return p.view(*patch_tokens.shape[:2], 3).float()


@torch.no_grad()
def top_prototypes(head: M.IBOTHead, patch_tokens: torch.Tensor, patch_center: torch.Tensor | None) -> torch.Tensor:
    """(B, N, D) patch tokens -> (B, N) the index of each patch's most probable prototype,
    argmax_k (t_{u,n} - c')_k: the argmax of Q_{u,n} = softmax((t_{u,n} - c') / tau_t') at any temperature."""
    logits = head.patch_logits(head.project(patch_tokens))  # t_{u,n}: (B, N, K_p)
    if patch_center is not None:
        logits = logits - patch_center.to(logits.device)
    return logits.argmax(-1)


@dataclass
class Pictures:
    """The arrays drawn for a batch of images, on the CPU."""

    pixels: torch.Tensor  # (B, H, W, C) in [0, 1]
    attention: torch.Tensor  # (B, heads, 1+N): [CLS]'s attention row, entry 0 to itself
    colours: torch.Tensor  # (B, N, 3) in [0, 1]
    prototypes: torch.Tensor | None  # (B, N) prototype indices, or None without a head
    grid: tuple[int, int]  # (h, w) patches


@torch.no_grad()
def look(viewed: Viewed, pixels: torch.Tensor, x: torch.Tensor) -> Pictures:
    """The pictures' arrays for images x (B, C, H, W), normalised as read_images gives them."""
    backbone = viewed.backbone
    x = x.to(next(backbone.parameters()).device)
    p = backbone.patch_size
    patch_tokens = backbone(x)[:, 1:].float()  # (B, N, D), after the final norm
    prototypes = (None if viewed.head is None else
                  top_prototypes(viewed.head.to(x.device), patch_tokens, viewed.patch_center).cpu())
    return Pictures(pixels.cpu(), cls_attention(backbone, x).cpu(), pca_colours(patch_tokens).cpu(), prototypes,
                    (x.shape[-2] // p, x.shape[-1] // p))


def draw(pictures: Pictures, names: list[str], title: str = ""):
    """A matplotlib Figure of PANEL_INCHES-square panels under a title strip: per row an image, its [CLS] attention per head, its
    patches' PCA colours and (with a head) their top prototypes."""
    import matplotlib.pyplot as plt

    B, heads = pictures.attention.shape[:2]
    h, w = pictures.grid
    columns = 2 + heads + (pictures.prototypes is not None)
    height = PANEL_INCHES * B + HEADER_INCHES
    fig, axes = plt.subplots(B, columns, figsize=(PANEL_INCHES * columns, height), dpi=DPI, squeeze=False)
    maps = pictures.attention[:, :, 1:].reshape(B, heads, h, w)  # [CLS] -> patches, as the patch grid
    if pictures.prototypes is not None:
        used, colour = pictures.prototypes.unique(return_inverse=True)  # the same prototype, the same colour
        cmap = plt.get_cmap("tab20" if len(used) <= 20 else "gist_ncar", max(len(used), 2))
    for b, row in enumerate(axes):
        image = pictures.pixels[b].numpy()
        row[0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        row[0].set_title(names[b], fontsize=7)
        for k in range(heads):
            row[1 + k].imshow(maps[b, k].numpy(), cmap="inferno")
        row[1 + heads].imshow(pictures.colours[b].view(h, w, 3).numpy())
        if pictures.prototypes is not None:
            row[2 + heads].imshow(colour[b].view(h, w).numpy(), cmap=cmap, vmin=0, vmax=max(len(used) - 1, 1),
                                  interpolation="nearest")
    top = [f"[CLS] attention, head {k}" for k in range(heads)] + ["patches, PCA to RGB", "top prototype"]
    for ax, label in zip(axes[0, 1:], top):
        ax.set_title(label, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - HEADER_INCHES / height, wspace=0.05,
                        hspace=0.2)
    return fig


# ---------------------------------------------------------------------------------------------------
# ---- the command line ----


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ours, official iBOT / DINO, DeiT / MAE or timm")
    p.add_argument("--images", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="image files, and folders whose images are all drawn (up to --max-images)")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="the network of a file that holds both (default: teacher)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the square the images are cropped to, a multiple of the patch size "
                        "(default: the size the position embeddings were made for)")
    p.add_argument("--max-images", type=int, default=8, help="rows drawn at most (default: 8)")
    p.add_argument("--device", choices=["cuda", "mps", "cpu"], default=None,
                   help="where the ViT runs (default: the best there is)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.max_images < 1:
            raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
        files = image_files(args.images, args.max_images)  # before the checkpoint: a typo costs no load
        viewed = load(args.checkpoint, args.which)
        backbone = viewed.backbone
        size = args.size or backbone.grid[0] * backbone.patch_size
        if size < backbone.patch_size or size % backbone.patch_size:
            raise ValueError(f"--size must be a multiple of the patch size {backbone.patch_size}, got {size}")
        pixels, x = read_images(files, size, backbone.patch_embed.proj.in_channels)
        backbone.to(pick_device(args.device))
        pictures = look(viewed, pixels, x)
    except (ValueError, FileNotFoundError) as e:  # data.BadImage is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if viewed.note:
        print(f"note: {viewed.note}")
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    fig = draw(pictures, [f.name for f in files],
               f"{Path(args.checkpoint).name}, {args.which}: {pictures.attention.shape[1]} heads, "
               f"{pictures.grid[0]} x {pictures.grid[1]} patches of {backbone.patch_size} px")
    fig.savefig(args.output, dpi=DPI)
    if pictures.prototypes is not None:
        print(f"{pictures.prototypes.unique().numel()} different prototypes are the top choice of the "
              f"{pictures.prototypes.numel()} patches drawn (K_p = {patch_prototypes(viewed.head)})")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
