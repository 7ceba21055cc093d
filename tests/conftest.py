from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train"


@pytest.fixture
def cifar_train() -> Path:
    """The real CIFAR-10 training PNGs beside the repository; absent in a user's fresh clone."""
    if not CIFAR_TRAIN.is_dir():
        pytest.skip(f"needs the CIFAR-10 PNGs at {CIFAR_TRAIN} (../shared beside the repository)")
    return CIFAR_TRAIN
