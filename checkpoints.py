"""Reading checkpoints a user brings: ours, official iBOT / DINO, DeiT / MAE and timm ViTs, as an
ibot_min.VisionTransformer.

Every reader of a user's file goes through read_checkpoint: weights_only=True, and a damaged file gives one line
that names it. What the weights cannot tell (the number of attention heads; the image size behind a position
grid that is not square) is read from where the common formats keep it: our config dict, the argparse Namespace
the official, DeiT, MAE and timm training scripts save as `args`, timm's top-level `arch`; an architecture name
(vit_small, deit_tiny_patch16_224, ...) gives the head count of its width. Otherwise the loader stops with one
line that names the argument that supplies it. It never guesses.
"""

import argparse
import math
import pickle
import re
from pathlib import Path

import torch

from ibot_min import VisionTransformer


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as its dict, loaded with weights_only=True (the argparse Namespace official files
    pickle their flags in is allowed). A missing file is a FileNotFoundError, anything else that is not a torch
    checkpoint dict (cut short, another format, objects weights_only refuses) a ValueError, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message: a page on weights_only, the refused global inside
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"an object of type {refused.group(1)}" if refused else "Python objects"
        raise ValueError(f"cannot read {path}: it holds {what}, which torch.load(weights_only=True) does not load "
                         f"(only tensors, containers and plain values)") from e
    except Exception as e:  # zip, EOF, OS or pickle-stream errors, whichever a cut or foreign file meets first
        raise ValueError(f"cannot read {path}: the file is damaged or not a torch checkpoint ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"cannot read {path}: it holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt


def saved_config(ckpt: dict) -> dict:
    """The settings saved beside the weights: our `config` dict, else the flags of the official iBOT / DINO,
    DeiT, MAE or timm training scripts (an argparse Namespace under `args`), with timm's top-level `arch`."""
    config = ckpt.get("config")
    if not isinstance(config, dict):
        config = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {}
    if isinstance(ckpt.get("arch"), str):  # timm's CheckpointSaver: the model name
        config = {"arch": ckpt["arch"], **config}
    return config


def stated_image_size(config: dict) -> tuple[int, int] | None:
    """The (height, width) a checkpoint says its ViT was made for: ours (global_size), timm's, DeiT's and MAE's
    flags (img_size; input_size, as (C, H, W) or one side), or None."""
    for key in ("global_size", "img_size", "input_size"):
        size = config.get(key)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (list, tuple)) and len(size) in (2, 3) and all(isinstance(v, int) for v in size):
            return tuple(size[-2:])
    return None


def position_grid(n_positions: int, patch_size: int, config: dict,
                  img_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) patch grid of a checkpoint's n position embeddings: from the image size given or stated, else
    the square grid, the only one the count alone gives. A count that is not square, with no size, is refused."""
    size = (img_size, img_size) if isinstance(img_size, int) else img_size or stated_image_size(config)
    if size is not None:
        grid = (size[0] // patch_size, size[1] // patch_size)
        if grid[0] * grid[1] != n_positions:
            said = "img_size given is" if img_size else "the checkpoint says image size"
            raise ValueError(f"{said} {size[0]} x {size[1]} at patch size {patch_size}, a "
                             f"{grid[0]} x {grid[1]} grid of {grid[0] * grid[1]} patches, but its pos_embed holds "
                             f"{n_positions}")
        return grid
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise ValueError(f"the checkpoint's pos_embed holds {n_positions} patch positions, not a square grid, and "
                         f"it does not say its image size; pass img_size=(height, width) to load_backbone, or save "
                         f"{{'config': {{'img_size': [height, width]}}}} beside the weights")
    return side, side


# (embed_dim, num_heads) of the ViT widths named in architecture names: ours, the official iBOT / DINO
# vit_tiny / small / base / large, DeiT's, timm's (whose larger ones have 64-80 wide heads) and DINOv2's giant2
NAMED_WIDTHS = {"nano": (128, 2), "tiny": (192, 3), "small": (384, 6), "medium": (512, 8), "base": (768, 12),
                "large": (1024, 16), "huge": (1280, 16), "giant": (1408, 16), "giant2": (1536, 24)}


def stated_num_heads(config: dict, embed_dim: int) -> tuple[int, str] | None:
    """(num_heads, where it was read) from a checkpoint's config: a num_heads entry, else the width its
    architecture name gives (vit_small_patch16_224 -> small -> 6 heads); None when it says neither. A name whose
    width is not the weights' is refused: the name is then no guide to the heads."""
    if isinstance(config.get("num_heads"), int):
        return config["num_heads"], "num_heads"
    for key in ("arch", "model"):  # ours, official iBOT / DINO and timm: arch; DeiT, MAE and timm's args: model
        name = config.get(key)
        words = re.split(r"[_\-.]", name.lower()) if isinstance(name, str) else []
        named = [NAMED_WIDTHS[w] for w in words if w in NAMED_WIDTHS]
        if named:
            width, heads = named[0]
            if width != embed_dim:
                raise ValueError(f"the checkpoint says {key} {name!r}, a {width} wide ViT, but its weights are "
                                 f"{embed_dim} wide; pass num_heads (eval_linear.py: --num-heads)")
            return heads, f"{key} {name!r}"
    return None


def load_backbone(path_or_state_dict, which: str = "teacher", num_heads: int | None = None,
                  img_size: int | tuple[int, int] | None = None) -> VisionTransformer:
    """A VisionTransformer from: our checkpoints; official iBOT / DINO ones (full, with module. / backbone.
    prefixes and an argparse Namespace, or backbone-only exports); DeiT / MAE / timm checkpoints and timm ViT
    state dicts (head.* ignored). Sizes come from the weights; the head count from `num_heads` or the
    checkpoint's config (stated_num_heads; the two must agree where both say it); the position grid from
    `img_size`, the stated image size, else the square grid. Errors are ValueErrors, naming the file when
    given a path."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if isinstance(path_or_state_dict, (str, Path)):
        try:
            return load_backbone(read_checkpoint(path_or_state_dict), which, num_heads, img_size)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if str(path_or_state_dict) in message else
                             f"{path_or_state_dict}: {message}") from e
    ckpt = path_or_state_dict
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    config = saved_config(ckpt)
    state = ckpt.get(which, ckpt.get("state_dict", ckpt.get("model", ckpt)))
    if not isinstance(state, dict):
        raise ValueError(f"no state dict under {which!r}; the checkpoint has keys {sorted(ckpt)[:20]}")
    backbone = {}
    for k, v in state.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if torch.is_tensor(v) and not k.startswith("head."):
            backbone[k] = v
    if "cls_token" not in backbone or "patch_embed.proj.weight" not in backbone:
        raise ValueError(f"no ViT backbone found (no cls_token / patch_embed.proj.weight); keys include "
                         f"{sorted(state)[:20]}")
    dim, _, patch, _ = backbone["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("blocks."))
    for key, found in (("patch_size", patch), ("embed_dim", dim), ("depth", depth)):
        if config.get(key) not in (None, found):
            raise ValueError(f"the checkpoint says {key} {config[key]} but its weights have {found}")
    grid = position_grid(backbone["pos_embed"].shape[1] - 1, patch, config, img_size)
    try:
        stated = stated_num_heads(config, dim)  # (count, where it was read) or None
    except ValueError:  # an architecture name of another width
        if num_heads is None:
            raise
        stated = None  # the name is no guide; the count given stands
    if num_heads is None and stated is None:
        raise ValueError(f"the checkpoint does not say how many attention heads its {dim} wide ViT has, and the "
                         f"weights cannot tell; pass num_heads (eval_linear.py: --num-heads), or save "
                         f"{{'config': {{'num_heads': H}}}} beside the weights")
    if num_heads is not None and stated and stated[0] != num_heads:
        raise ValueError(f"num_heads {num_heads} was given, but the checkpoint's {stated[1]} says {stated[0]} heads")
    heads = num_heads if num_heads is not None else stated[0]
    if heads < 1 or dim % heads:
        raise ValueError(f"{heads} attention heads do not divide the weights' width {dim}")
    model = VisionTransformer(img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, embed_dim=dim,
                              depth=depth, num_heads=heads,
                              mlp_ratio=backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                              masked_embed="masked_embed" in backbone,
                              in_chans=backbone["patch_embed.proj.weight"].shape[1])
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit a ViT (dim {dim}, depth {depth}, patch {patch}): "
                         f"missing keys {missing}, unexpected keys {unexpected}")
    return model
