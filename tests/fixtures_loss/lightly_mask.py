"""lightly's block masking of one image (`lightly.models.utils.random_block_mask_image`, which follows DINOv2's
`MaskingGenerator`) behind check_loss.py's `--mask` call, with int(ratio * patches) patches to mask, as lightly's
`random_block_mask` asks it:

    python check_loss.py --mask tests/fixtures_loss/lightly_mask.py:block_mask

Needs `pip install lightly` (written against lightly 1.6.0).
"""

from lightly.models.utils import random_block_mask_image


def block_mask(height, width, ratio):
    return random_block_mask_image(size=(height, width), num_masks=int(ratio * height * width))
