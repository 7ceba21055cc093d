"""DINOv2's [CLS] and patch losses as its training step combines them, restated from facebookresearch/dinov2
(`dinov2/loss/dino_clstoken_loss.py`, `dinov2/loss/ibot_patch_loss.py`, and the loss part of
`SSLMetaArch.forward_backward` in `dinov2/train/ssl_meta_arch.py`, commit b8931f7), centering="centering", without
KoLeo, in check_loss.py's crop-major layout (DINOv2 collates its crops that way too):

    python check_loss.py tests/fixtures_loss/dinov2_ibot.py:make_loss                    # tau_t' for the patches
    python check_loss.py tests/fixtures_loss/dinov2_ibot.py:make_loss_one_temperature    # as its step calls it

What the restatement changes, none of it in the numbers: DINOv2 fixes g = 2 and pairs the global crops by swapping
the teacher's two halves; here the teacher's global crops are cycled by 1..g-1 places, which is that swap for g = 2
and every pair u != v for any g. DINOv2 applies each centre update when the next targets are made (to overlap the
all-reduce); here it is applied at the end of the call, which gives the next targets the same centre.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DINOv2IBOT(nn.Module):
    def __init__(self, out_dim, patch_out_dim, n_global_crops, n_local_crops, one_temperature=False,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.g, self.l, self.one_temperature = n_global_crops, n_local_crops, one_temperature
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # c, as DINOLoss keeps it
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))  # c', as iBOTPatchLoss keeps it

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp,
                teacher_patch_temp):
        g, l = self.g, self.l
        B = teacher_cls.shape[0] // g
        # the teacher side runs under no_grad in DINOv2 (softmax_center_teacher is decorated so)
        with torch.no_grad():
            targets_cls = F.softmax((teacher_cls - self.center) / teacher_temp, dim=-1).view(g, B, -1)  # P_u
            teacher_masked = teacher_patch[masks]  # (M, K_p): DINOv2 runs the teacher's head on masked tokens only
            patch_temp = teacher_temp if self.one_temperature else teacher_patch_temp
            targets_patch = F.softmax((teacher_masked - self.center2[0]) / patch_temp, dim=-1)  # Q_un, (M, K_p)

        # [CLS]: local crops against every teacher global crop; global crops against the other global crops
        n_local_terms = max(l * g, 1)
        n_global_terms = (g - 1) * g
        student_global, student_local = student_cls[:g * B], student_cls[g * B:]
        loss_cls = 0.0
        if l > 0:
            loss_cls = self.cross_entropy_sum(student_local.chunk(l), list(targets_cls)) / (n_global_terms
                                                                                               + n_local_terms)
        cycled = [torch.cat([targets_cls[(v - shift) % g] for v in range(g)]) for shift in range(1, g)]  # (gB, K)
        loss_scales = g  # DINOv2's 2: the global crops go through the loss as one batch
        loss_cls = loss_cls + self.cross_entropy_sum([student_global], cycled) * loss_scales / (n_global_terms
                                                                                                 + n_local_terms)

        # patches: each masked patch weighted by 1 / (its image's masked count), summed, over the g*B images
        log_s = F.log_softmax(student_patch[masks] / self.student_temp, dim=-1)  # (M, K_p)
        per_patch = (targets_patch * log_s).sum(-1)  # (M,)
        weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
        ibot_loss_scale = 1.0 / g
        loss_patch = -(per_patch * weights).sum() / masks.shape[0] * loss_scales * ibot_loss_scale

        with torch.no_grad():  # c from all global [CLS] rows; c' from the masked patch rows the teacher's head saw
            m = self.center_momentum
            self.center = self.center * m + teacher_cls.mean(0, keepdim=True) * (1 - m)
            self.center2 = self.center2 * m + teacher_masked.mean(0).view(1, 1, -1) * (1 - m)
        return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}

    def cross_entropy_sum(self, student_list, target_list):
        """DINOLoss.forward: -sum over every (student, target) pair of the batch mean of target . log softmax."""
        total = 0.0
        for s in student_list:
            log_s = F.log_softmax(s / self.student_temp, dim=-1)
            for t in target_list:
                total = total - (t * log_s).sum(-1).mean()
        return total


def make_loss(**sizes):
    return DINOv2IBOT(**sizes)


def make_loss_one_temperature(**sizes):
    return DINOv2IBOT(**sizes, one_temperature=True)
