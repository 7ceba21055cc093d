import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the CIFAR-10 training PNGs as class folders: where IBOT_CIFAR10_DIR points (.ci/run sets it), else beside the repo
CIFAR_TRAIN = Path(os.environ.get("IBOT_CIFAR10_DIR") or ROOT.parent / "shared" / "data" / "cifar10" / "train")


@pytest.fixture
def cifar_train() -> Path:
    """The real CIFAR-10 training PNGs beside the repository; absent in a user's fresh clone."""
    if not CIFAR_TRAIN.is_dir():
        pytest.skip(f"needs the CIFAR-10 PNGs at {CIFAR_TRAIN} (set IBOT_CIFAR10_DIR to a folder of its class folders)")
    return CIFAR_TRAIN
