"""Reading checkpoints a user brings: ours, official iBOT / DINO, and timm ViTs, as an ibot_min.VisionTransformer.

What a file's weights cannot tell (the image size behind the position grid, the number of heads) is read from
the config or flags saved beside them; otherwise the loader stops with one line that names what to pass.
"""

import argparse
import math
from pathlib import Path

import torch

from ibot_min import VisionTransformer


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


def position_grid(n_positions: int, patch_size: int, config: dict) -> tuple[int, int]:
    """The (h, w) patch grid of a checkpoint's n position embeddings: from the image size it states, else the
    square grid, the only one the count alone can give. A non-square count with no stated size is refused."""
    size = stated_image_size(config)
    if size is not None:
        grid = (size[0] // patch_size, size[1] // patch_size)
        if grid[0] * grid[1] != n_positions:
            raise ValueError(f"the checkpoint says image size {size[0]} x {size[1]} at patch size {patch_size}, a "
                             f"{grid[0]} x {grid[1]} grid of {grid[0] * grid[1]} patches, but its pos_embed holds "
                             f"{n_positions}")
        return grid
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise ValueError(f"the checkpoint's pos_embed holds {n_positions} patch positions, not a square grid, and "
                         f"it does not say its image size; save it with a config dict beside the weights, such as "
                         f"{{'config': {{'img_size': [height, width]}}}}")
    return side, side


def load_backbone(path_or_state_dict, which: str = "teacher", num_heads: int | None = None) -> VisionTransformer:
    """A VisionTransformer from: our checkpoints; official iBOT / DINO ones (full, with module. / backbone.
    prefixes and an argparse Namespace, or backbone-only exports); timm ViT state dicts (head.* ignored).
    The position grid is the stated image size's (our config, or the flags saved with the file), else square."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    ckpt = path_or_state_dict
    if isinstance(ckpt, (str, Path)):
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        torch.serialization.add_safe_globals([argparse.Namespace])  # official files pickle their args
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    config = ckpt.get("config")
    if not isinstance(config, dict):  # official iBOT / DINO and timm's train.py save their flags
        config = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else {}
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
    grid = position_grid(backbone["pos_embed"].shape[1] - 1, patch, config)
    heads = config.get("num_heads") or num_heads or dim // 64
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
