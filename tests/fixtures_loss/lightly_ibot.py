"""lightly's iBOT loss (`lightly.loss.DINOLoss` for [CLS], `IBOTPatchLoss` for the masked patches), combined as
lightly's DINOv2 example combines them, behind check_loss.py's `--layout per-crop` call:

    python check_loss.py tests/fixtures_loss/lightly_ibot.py:make_loss --layout per-crop            # as shipped
    python check_loss.py tests/fixtures_loss/lightly_ibot.py:make_loss_detached --layout per-crop   # no_grad teacher
    python check_loss.py tests/fixtures_loss/lightly_ibot.py:make_loss_one_temperature --layout per-crop

Needs `pip install lightly` (written against lightly 1.6.0).
"""

import math

import torch
import torch.nn as nn
from lightly.loss import DINOLoss, IBOTPatchLoss


class LightlyIBOT(nn.Module):
    """L_cls from DINOLoss over the views' lists, L_mim from IBOTPatchLoss on the masked patches of all global views
    stacked (B = g * images, so its mean over images is iBOT's 1/g sum over views of the batch mean).

    detach_teacher: detach the teacher's logits before the losses, as a teacher run under torch.no_grad() gives
    them (lightly's losses do not detach). one_temperature: tau_t for both targets, as lightly's example passes it."""

    def __init__(self, out_dim, patch_out_dim, n_global_crops, n_local_crops, detach_teacher=False,
                 one_temperature=False):
        super().__init__()
        self.detach_teacher, self.one_temperature = detach_teacher, one_temperature
        self.dino = DINOLoss(output_dim=out_dim, student_temp=0.1, center_momentum=0.9)
        self.ibot = IBOTPatchLoss(output_dim=patch_out_dim, student_temp=0.1, center_momentum=0.9)

    @property
    def center(self):  # c, (1, 1, K)
        return self.dino.center

    @property
    def center2(self):  # c', (1, K_p)
        return self.ibot.center.value

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, tau_t, tau_tp):
        # student_cls: V tensors (B, K); the others: g tensors (B, K), (B, N, K_p) and (B, N) bool
        if self.detach_teacher:
            teacher_cls, teacher_patch = [t.detach() for t in teacher_cls], [t.detach() for t in teacher_patch]
        loss_cls = self.dino(teacher_out=teacher_cls, student_out=student_cls, teacher_temp=tau_t)
        mask = torch.cat(masks)  # (gB, N)
        side = math.isqrt(mask.shape[1])  # IBOTPatchLoss takes the mask as (images, H, W)
        loss_patch = self.ibot(teacher_out=torch.cat(teacher_patch)[mask], student_out=torch.cat(student_patch)[mask],
                               mask=mask.view(-1, side, side), teacher_temp=tau_t if self.one_temperature else tau_tp)
        return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}


def make_loss(**sizes):
    return LightlyIBOT(**sizes)


def make_loss_detached(**sizes):
    return LightlyIBOT(**sizes, detach_teacher=True)


def make_loss_one_temperature(**sizes):
    return LightlyIBOT(**sizes, one_temperature=True)
