"""Cut a train.py checkpoint down to what a reader needs: the teacher (backbone and head), the loss centres
and the config, without the student, the optimiser state or the RNG. The result loads as it is with
`checkpoints.load_backbone(path)` and `eval_linear.py --checkpoint path`.

    python scripts/ship_model.py runs/ship/checkpoint.pth models/ibot_vit_nano_cifar10.pth
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints as C  # noqa: E402


def ship(src: Path, dst: Path) -> Path:
    ckpt = C.read_checkpoint(src)
    if not {"teacher", "ibot_loss", "config"} <= set(ckpt):
        raise ValueError(f"{src} is not a train.py checkpoint (it has no teacher, ibot_loss or config)")
    kept = {"teacher": ckpt["teacher"], "ibot_loss": ckpt["ibot_loss"], "config": ckpt["config"],
            "step": ckpt.get("step"), "train_config": ckpt.get("train_config")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(kept, dst)
    return dst


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python scripts/ship_model.py RUN/checkpoint.pth OUT.pth\n")
        return 2
    try:
        out = ship(Path(argv[0]), Path(argv[1]))
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
