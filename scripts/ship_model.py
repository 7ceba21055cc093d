"""Cut a train.py checkpoint down to what a reader needs: the teacher (backbone and head), the loss centres
and the config, without the student, the optimiser state or the RNG. The result loads as it is with
`checkpoints.load_backbone(path)` and `eval_linear.py --checkpoint path`.

    python scripts/ship_model.py runs/teaching/checkpoint.pth models/ibot_vit_nano_cifar10.pth
"""

import sys
from pathlib import Path

import torch


def ship(src: Path, dst: Path) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    if "teacher" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{src} is not a train.py checkpoint (no teacher or config)")
    kept = {"teacher": ckpt["teacher"], "ibot_loss": ckpt["ibot_loss"], "config": ckpt["config"],
            "step": ckpt.get("step"), "train_config": ckpt.get("train_config")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(kept, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/ship_model.py RUN/checkpoint.pth OUT.pth")
    out = ship(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
