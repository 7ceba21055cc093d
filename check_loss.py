"""Check your own iBOT loss against ours (`ibot_min.IBOTLoss`) and name every deviation when they differ; or check
your block masking against `ibot_min.block_mask`. docs/loss_checker.md has worked examples, lightly's and DINOv2's.

    python check_loss.py my_loss.py:make_loss                          # a file and the factory in it
    python check_loss.py mypackage.losses:make_loss --layout per-crop --json
    python check_loss.py --mask my_masks.py:block_mask                 # FUNCTION(height, width, ratio) -> bool mask

FACTORY(out_dim=K, patch_out_dim=K_p, n_global_crops=g, n_local_crops=l) returns your loss: a callable (an
nn.Module with its own centres is fine) taking what IBOTLoss.forward takes, in the same order,

    student_cls (VB, K), student_patch (gB, N, K_p), teacher_cls (gB, K), teacher_patch (gB, N, K_p),
    masks (gB, N) bool, tau_t, tau_t'                                                    V = g + l views,

and returning the total loss, or a dict with "loss" and, where it can, "cls" and "patch". `--layout` says how the
rows are ordered: `official` is crop-major (row v*B + b, as IBOTLoss), `batch-major` is image-major (row b*V + v),
and `per-crop` passes lists of per-view tensors, as lightly and DINOv2 do: V tensors (B, K) for student_cls, g
tensors (B, ...) for each of the others.

Both losses run side by side on a fixed, seeded set of CASES, three calls in a row on the same objects so that
the centres and the timing of their update matter. Compared after every call: the total, the terms you return,
the gradients w.r.t. all four logit inputs (the teacher's must be zero: targets carry no gradient), and the
centres c, c' where your object has `center` and `center2` (or `patch_center`), flattened. Inputs are fp32; a
value agrees when |yours - ours| <= ATOL + RTOL * |ours| everywhere. When they differ, the plain-loop reference is
replayed with sets of the MISTAKES switched on, smallest first (up to MAX_COMBINED together), and every smallest set
that reproduces all your numbers in all cases is named: each of its mistakes with the terms it explains (those that
stop matching when it alone is switched off) and what it means for training.
Exit status: 0 when every case agrees (with --mask: every statistic), 1 when one does not, 2 for a usage error
(one line on stderr).
"""

import argparse
import functools
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_min import IBOTLoss, block_mask

# Measured on CASES: three correct losses written differently (official loops, plain-loop reference, IBOTLoss's
# one-pass sum) stay within 2% of this tolerance everywhere; every one of MISTAKES exceeds it over 3,000 times.
RTOL, ATOL = 1e-4, 1e-5
CALLS = 3  # calls in a row on one loss object: the centres left by one call make the targets of the next
STUDENT_TEMP, MOMENTUM = 0.1, 0.9  # tau_s and the centres' momentum m: IBOTLoss defaults the factory does not pass
LAYOUTS = ("official", "batch-major", "per-crop")


class UsageError(Exception):
    """The factory or the loss cannot be run as the checker needs: exit 2 with one line, no traceback."""


# ---------------------------------------------------------------------------------------------------
# ---- the known mistakes, and the reference they mutate ----

@dataclass(frozen=True)
class Mistake:
    what: str  # what the loss computes instead of docs/method.md's formula
    training: str  # what that means for a training run, in one line


MISTAKES = {
    "cls-same-view-pairs": Mistake(
        "pairs with u = v counted in the [CLS] term (all g(g+l) pairs, divided by g(g+l))",
        "the student is also taught the teacher's target for the view it sees itself, an easy pair that adds no "
        "cross-view signal and dilutes L_cls"),
    "cls-count-g-V": Mistake(
        "[CLS] term divided by g(g+l) instead of its g(g+l-1) pairs",
        "L_cls scaled by (g+l-1)/(g+l): the same as a smaller lambda1"),
    "cls-count-V-V1": Mistake(
        "[CLS] term divided by (g+l)(g+l-1) instead of its g(g+l-1) pairs",
        "L_cls scaled by g/(g+l): a smaller lambda1 (1/5 of iBOT's with 2 global + 8 local crops)"),
    "cls-count-plus-one-without-local": Mistake(
        "[CLS] term divided by g(g-1) + 1 when there is no local crop (a max(g*l, 1) guard), not g(g-1)",
        "only without local crops: L_cls weighs g(g-1)/(g(g-1)+1) of iBOT's (2/3 with 2 global crops), a smaller "
        "lambda1; with local crops it is iBOT's (DINOv2 counts so)"),
    "patch-mean-over-batch": Mistake(
        "patch term averaged over all masked patches of each global view, not per image",
        "images with many masked patches weigh more in L_mim and those with few less, where iBOT weighs every "
        "image alike; the weighting follows the random mask ratio"),
    "patch-mean-over-masked-images": Mistake(
        "images with no masked patch left out of the batch mean (each adds 0 but counts)",
        "L_mim grows by the inverse share of masked images (about 2x with iBOT's half of the images masked): a "
        "larger lambda2 that changes from batch to batch"),
    "patch-count-all-crops": Mistake(
        "local crops counted in the patch term: its sum over the g views divided by g+l, not g",
        "L_mim scaled by g/(g+l): a smaller lambda2 (1/5 of iBOT's with 2 global + 8 local crops)"),
    "patch-across-views": Mistake(
        "patch term pairs every student view v with every teacher view u (divided by g^2), not only v = u",
        "masked patches are also taught the other view's target at the same position, which shows other image "
        "content: a wrong target, not iBOT's masked image modeling"),
    "centre-before-targets": Mistake(
        "centres c, c' updated before the targets P_u, Q_un are made, not after",
        "the targets are centred with a centre that already holds a tenth of this batch: a slightly different "
        "centring from iBOT's, small in effect"),
    "no-patch-centring": Mistake(
        "patch targets not centred: Q_un = softmax(t_un / tau_t'), without c'",
        "nothing keeps the patch targets from collapsing onto one prototype: c' is what prevents it"),
    "patch-centre-from-masked": Mistake(
        "c' updated from the masked patches only, not from all patches",
        "the patch centre follows fewer tokens, a noisier mean that favours the middle of the image (where blocks "
        "fall most often), as in DINOv2 and lightly, which train well with it"),
    "cls-temp-for-patches": Mistake(
        "the [CLS] temperature tau_t used for the patch targets instead of tau_t'",
        "harmless where tau_t' follows the same schedule as tau_t (DINOv2 and lightly use one temperature); "
        "otherwise the patch targets are sharper or flatter than iBOT's"),
    "teacher-not-detached": Mistake(
        "teacher targets not detached: gradients flow into the teacher's logits",
        "harmless if the teacher runs under torch.no_grad() (or its parameters need no gradient and it only "
        "follows the EMA); otherwise backprop trains the teacher too"),
    "softmax-student": Mistake(
        "softmax instead of log-softmax on the student side (both terms)",
        "the loss is a dot product of probabilities, not a cross-entropy: another objective, and its gradients "
        "vanish as the student's predictions sharpen"),
}
# Mistakes that rewrite the same line of the loss: a combination holds at most one of each group.
SAME_LINE = (
    {"cls-same-view-pairs", "cls-count-g-V", "cls-count-V-V1", "cls-count-plus-one-without-local"},  # [CLS] count
    {"patch-mean-over-batch", "patch-mean-over-masked-images"},  # the mean over each view's images
    {"patch-count-all-crops", "patch-across-views"},  # the patch term's view pairs and count
)
MAX_COMBINED = 4  # the search tries every compatible set of up to this many mistakes


def reference_loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp: float,
                   teacher_patch_temp: float, center, patch_center, n_global_crops: int, mistakes=(),
                   student_temp: float = STUDENT_TEMP, center_momentum: float = MOMENTUM):
    """The loss of docs/method.md as plain loops over the views, with the named `mistakes` switched on (none:
    equal to IBOTLoss, whose tests use this reference too).

    Crop-major inputs: student_cls (VB, K), student_patch (gB, N, K_p), teacher_cls (gB, K), teacher_patch
    (gB, N, K_p), masks (gB, N) bool; centres c (K,) and c' (K_p,); tau_s = student_temp, m = center_momentum for
    both centres. Each mistake is one switch below, so any set of them composes. Returns ({"cls", "patch",
    "loss"}, the centres after the call), lambda1 = lambda2 = 1."""
    mistakes = {mistakes} if isinstance(mistakes, str) else set(mistakes)
    if unknown := sorted(mistakes - MISTAKES.keys()):
        raise ValueError(f"unknown mistake {unknown[0]!r}; expected one of {', '.join(MISTAKES)}")
    g, B = n_global_crops, teacher_cls.shape[0] // n_global_crops
    V = student_cls.shape[0] // B
    if "teacher-not-detached" not in mistakes:
        teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()  # targets: no gradient
    m = masks.view(g, B, -1).float()  # m_un

    # c <- m c + (1 - m) mean_rows t_u ;  c' <- m c' + (1 - m) mean_rows mean_n t_un   (all patches)
    if "patch-centre-from-masked" in mistakes:
        patch_mean = teacher_patch[masks].mean(0)
    else:
        patch_mean = teacher_patch.mean((0, 1))
    new_center = center_momentum * center + (1 - center_momentum) * teacher_cls.detach().mean(0)
    new_patch_center = center_momentum * patch_center + (1 - center_momentum) * patch_mean.detach()
    if "centre-before-targets" in mistakes:
        center, patch_center = new_center, new_patch_center
    if "no-patch-centring" in mistakes:
        patch_center = torch.zeros_like(patch_center)
    patch_temp = teacher_temp if "cls-temp-for-patches" in mistakes else teacher_patch_temp

    P = F.softmax((teacher_cls - center) / teacher_temp, dim=-1).view(g, B, -1)  # P_u = softmax((t_u - c) / tau_t)
    Q = F.softmax((teacher_patch - patch_center) / patch_temp, dim=-1).view(g, B, *teacher_patch.shape[1:])  # Q_un
    log_p = F.softmax if "softmax-student" in mistakes else F.log_softmax
    s = log_p(student_cls / student_temp, dim=-1).view(V, B, -1)  # log softmax(s_v / tau_s)
    s_patch = log_p(student_patch / student_temp, dim=-1).view(g, B, *student_patch.shape[1:])

    # L_cls = 1/(g(V-1)) sum_{u<=g} sum_{v != u} mean_batch[-P_u . log softmax(s_v / tau_s)]
    pairs = [(u, v) for u in range(g) for v in range(V) if v != u or "cls-same-view-pairs" in mistakes]
    n_pairs = len(pairs)
    if "cls-count-g-V" in mistakes:
        n_pairs = g * V
    if "cls-count-V-V1" in mistakes:
        n_pairs = V * (V - 1)
    if "cls-count-plus-one-without-local" in mistakes and V == g:
        n_pairs = g * (g - 1) + 1
    loss_cls = sum(-(P[u] * s[v]).sum(-1).mean() for u, v in pairs) / n_pairs

    # L_mim = 1/g sum_{u<=g} mean_batch[sum_n m_un (-Q_un . log softmax(s_un / tau_s)) / max(1, sum_n m_un)]
    across = "patch-across-views" in mistakes
    pairs = [(u, v) for u in range(g) for v in range(g) if u == v or across]
    loss_patch = 0.0
    for u, v in pairs:  # teacher view u, student view v (masked by m_v)
        ce = (-(Q[u] * s_patch[v]).sum(-1) * m[v]).sum(-1)  # (B,) summed over the masked patches of each image
        if "patch-mean-over-batch" in mistakes:
            loss_patch = loss_patch + ce.sum() / m[v].sum().clamp(min=1)
        elif "patch-mean-over-masked-images" in mistakes:
            has_mask = m[v].sum(-1) > 0
            loss_patch = loss_patch + (ce / m[v].sum(-1).clamp(min=1))[has_mask].sum() / has_mask.sum().clamp(min=1)
        else:
            loss_patch = loss_patch + (ce / m[v].sum(-1).clamp(min=1)).mean()
    n_patch_views = g * g if across else V if "patch-count-all-crops" in mistakes else g
    loss_patch = loss_patch / n_patch_views
    return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}, new_center, new_patch_center


def compatible(mistakes) -> bool:
    """At most one mistake from each group of SAME_LINE."""
    return all(len(group.intersection(mistakes)) <= 1 for group in SAME_LINE)


class MutatedReference(nn.Module):
    """reference_loss with its centres kept between calls, as a loss object with IBOTLoss's call signature."""

    def __init__(self, out_dim: int, patch_out_dim: int, n_global_crops: int, n_local_crops: int, mistakes=()):
        super().__init__()
        self.n_global_crops, self.mistakes = n_global_crops, mistakes
        self.register_buffer("center", torch.zeros(out_dim))  # c
        self.register_buffer("patch_center", torch.zeros(patch_out_dim))  # c'

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp, teacher_patch_temp):
        terms, self.center, self.patch_center = reference_loss(
            student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp, teacher_patch_temp,
            self.center, self.patch_center, self.n_global_crops, self.mistakes)
        return terms


# ---------------------------------------------------------------------------------------------------
# ---- the cases ----


@dataclass(frozen=True)
class Case:
    name: str
    g: int  # global crops
    l: int  # local crops
    B: int  # images
    N: int  # patches per global crop
    K: int  # prototypes of the [CLS] head
    K_p: int  # prototypes of the patch head
    tau_t: float
    tau_tp: float  # tau_t'
    scale: float = 1.0  # logit scale: 20 gives near one-hot targets and student log-probabilities in the hundreds
    edge_masks: bool = False  # in each global view, image 0 has no masked patch and image 1 is fully masked


CASES = (
    Case("1 global + 1 local, B=1", 1, 1, 1, 9, 16, 12, 0.04, 0.06),
    Case("2 global, no local", 2, 0, 3, 9, 16, 12, 0.05, 0.07),
    Case("2 global + 3 local", 2, 3, 2, 16, 32, 24, 0.07, 0.04),
    Case("1 global + 4 local", 1, 4, 3, 9, 24, 16, 0.04, 0.05),
    Case("3 global + 2 local", 3, 2, 2, 9, 16, 12, 0.06, 0.04),
    Case("unmasked and fully masked images", 2, 2, 4, 9, 16, 12, 0.04, 0.07, edge_masks=True),
    Case("large logits (x20)", 2, 2, 2, 9, 64, 48, 0.04, 0.06, scale=20.0),
)
LOGITS = ("student_cls", "student_patch", "teacher_cls", "teacher_patch")  # the differentiable inputs, in order


@functools.lru_cache(maxsize=None)
def case_inputs(case: Case, index: int, call: int) -> dict[str, torch.Tensor]:
    """Seeded crop-major fp32 inputs of one call, made once (observe hands out copies). The teacher's logits share
    a per-prototype offset across calls, so the centres grow from call to call and a mistake in centring shows."""
    offset_gen = torch.Generator().manual_seed(index)
    offset_cls, offset_patch = torch.randn(case.K, generator=offset_gen), torch.randn(case.K_p, generator=offset_gen)
    gen = torch.Generator().manual_seed(1000 * index + call)
    V, gB = case.g + case.l, case.g * case.B
    masks = torch.rand(gB, case.N, generator=gen) < 0.2 + 0.5 * torch.rand(gB, 1, generator=gen)
    if case.edge_masks:
        masks.view(case.g, case.B, case.N)[:, 0] = False
        masks.view(case.g, case.B, case.N)[:, 1] = True
    return {
        "student_cls": case.scale * torch.randn(V * case.B, case.K, generator=gen),
        "student_patch": case.scale * torch.randn(gB, case.N, case.K_p, generator=gen),
        "teacher_cls": case.scale * (offset_cls + torch.randn(gB, case.K, generator=gen)),
        "teacher_patch": case.scale * (offset_patch + torch.randn(gB, case.N, case.K_p, generator=gen)),
        "masks": masks,
    }


# ---------------------------------------------------------------------------------------------------
# ---- layouts: crop-major rows v*B + b, image-major rows b*V + v, or one tensor per view ----


def to_layout(x: torch.Tensor, views: int, layout: str):
    """(views*B, ...) crop-major -> the same rows in `layout`: a tensor, or a list of `views` tensors (B, ...)."""
    if layout == "per-crop":
        return list(x.chunk(views))
    if layout == "batch-major":
        return x.unflatten(0, (views, -1)).transpose(0, 1).flatten(0, 1)
    return x


def from_layout(x, views: int, layout: str) -> torch.Tensor:
    """The inverse of to_layout."""
    if layout == "per-crop":
        return torch.cat(list(x))
    if layout == "batch-major":
        return x.unflatten(0, (-1, views)).transpose(0, 1).flatten(0, 1)
    return x


def observe(loss, inputs: dict[str, torch.Tensor], case: Case, layout: str = "official") -> dict[str, torch.Tensor]:
    """One call of `loss` on fresh leaves in `layout`; what it produced, crop-major: its terms, the gradients of its
    total w.r.t. the four logit inputs (zero where none flows), and its centres (flattened) where it exposes them."""
    V, g = case.g + case.l, case.g
    views = {"student_cls": V, "student_patch": g, "teacher_cls": g, "teacher_patch": g, "masks": g}
    args = {name: to_layout(x.clone(), views[name], layout) for name, x in inputs.items()}
    leaves = {}
    for name in LOGITS:  # the teacher's too: a target that is not detached shows in their gradients
        leaves[name] = [x.clone().requires_grad_() for x in (args[name] if layout == "per-crop" else [args[name]])]
        args[name] = leaves[name] if layout == "per-crop" else leaves[name][0]
    terms = as_terms(loss(*(args[name] for name in (*LOGITS, "masks")), case.tau_t, case.tau_tp))
    if terms["loss"].requires_grad:
        terms["loss"].backward()
    seen = {name: value.detach().float() for name, value in terms.items()}
    for name, parts in leaves.items():
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in parts]
        seen[f"grad {name}"] = from_layout(grads if layout == "per-crop" else grads[0], views[name], layout)
    for label, attributes in (("centre c", ("center",)), ("centre c'", ("center2", "patch_center"))):
        centre = next((getattr(loss, a) for a in attributes if torch.is_tensor(getattr(loss, a, None))), None)
        if centre is not None:
            seen[label] = centre.detach().float().flatten().clone()
    return seen


def as_terms(out) -> dict[str, torch.Tensor]:
    """A loss's return value -> {"loss"[, "cls", "patch"]}, each a 0-d tensor."""
    if torch.is_tensor(out):
        out = {"loss": out}
    if not isinstance(out, dict) or "loss" not in out:
        raise UsageError(f"your loss returned {type(out).__name__}; expected a tensor or a dict with 'loss'")
    terms = {}
    for name in ("loss", "cls", "patch"):
        if name in out:
            value = torch.as_tensor(out[name])
            if value.numel() != 1:
                raise UsageError(f"your loss's {name!r} has shape {tuple(value.shape)}; expected a scalar")
            terms[name] = value.reshape(())
    return terms


def agrees(yours: torch.Tensor, ours: torch.Tensor) -> bool:
    return yours.shape == ours.shape and torch.allclose(yours, ours, rtol=RTOL, atol=ATOL, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# ---- the check ----


def check(factory, layout: str = "official") -> dict:
    """Run factory's loss and IBOTLoss over CASES; returns the report that main prints (or dumps with --json)."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    rows, records, not_compared = [], [], set()
    for index, case in enumerate(CASES):
        kwargs = dict(out_dim=case.K, patch_out_dim=case.K_p, n_global_crops=case.g, n_local_crops=case.l)
        try:
            user_loss = factory(**kwargs)
        except Exception as error:
            call = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            raise UsageError(f"{getattr(factory, '__name__', 'FACTORY')}({call}) raised "
                             f"{type(error).__name__}: {error}") from None
        if not callable(user_loss):
            raise UsageError(f"the factory returned {type(user_loss).__name__}, which cannot be called")
        ours = IBOTLoss(case.K, case.K_p, case.g, case.l)
        for call in range(1, CALLS + 1):
            inputs = case_inputs(case, index, call)
            try:
                yours = observe(user_loss, inputs, case, layout)
            except UsageError:
                raise
            except Exception as error:
                raise UsageError(f"your loss raised {type(error).__name__}: {error} (case '{case.name}', call "
                                 f"{call}, --layout {layout})") from None
            expected = observe(ours, inputs, case)
            records.append(yours)
            not_compared |= expected.keys() - yours.keys()
            rows += [row(case, call, term, yours[term], expected[term]) for term in expected if term in yours]
    ok = all(r["ok"] for r in rows)
    bad_terms = {r["term"] for r in rows if not r["ok"]}
    differing = [term for term in dict.fromkeys(r["term"] for r in rows) if term in bad_terms]  # in table order
    explanations = [] if ok else [attribute(found, records, differing) for found in explain(records)]
    return {"ok": ok, "layout": layout, "rtol": RTOL, "atol": ATOL, "calls_per_case": CALLS,
            "cases": [asdict(case) for case in CASES], "not_compared": sorted(not_compared), "rows": rows,
            "max_combined": MAX_COMBINED, "explanations": explanations,
            "mistakes": sorted({m["name"] for found in explanations for m in found})}


def row(case: Case, call: int, term: str, yours: torch.Tensor, ours: torch.Tensor) -> dict:
    """One comparison; a tensor is shown by its L2 norm, and a value that is not finite as text ("nan", "inf"),
    which keeps --json strict JSON."""
    def shown(x: torch.Tensor) -> float | str:
        value = float(x) if x.ndim == 0 else float(x.norm())
        return value if math.isfinite(value) else str(value)
    diff = shown((yours - ours).abs().max()) if yours.shape == ours.shape else "shapes differ"
    return {"case": case.name, "call": call, "term": term, "yours": shown(yours), "ours": shown(ours),
            "max_abs_diff": diff, "finite": bool(yours.isfinite().all()), "ok": agrees(yours, ours)}


# ---------------------------------------------------------------------------------------------------
# ---- naming the deviations: the smallest sets of mistakes that reproduce every number, and what each explains ----


def replay(mistakes):
    """The reference with `mistakes` on, observed call by call in the order check records the user's loss."""
    for index, case in enumerate(CASES):
        mutated = MutatedReference(case.K, case.K_p, case.g, case.l, mistakes)
        for call in range(1, CALLS + 1):
            yield observe(mutated, case_inputs(case, index, call), case)


def reproduces(mistakes, records: list[dict]) -> bool:
    """Does the reference with `mistakes` on give every number recorded from the user's loss? Stops at the first
    that differs, so a wrong guess costs about one call."""
    return all(all(agrees(yours[term], theirs[term]) for term in yours)
               for yours, theirs in zip(records, replay(mistakes)))


def explain(records: list[dict]) -> list[tuple[str, ...]]:
    """Every smallest set of compatible MISTAKES (up to MAX_COMBINED of them) that reproduces all the records:
    one set when the cases tell the candidates apart, several when they cannot, none when nothing known fits."""
    for size in range(1, MAX_COMBINED + 1):
        found = [combo for combo in itertools.combinations(MISTAKES, size)
                 if compatible(combo) and reproduces(combo, records)]
        if found:
            return found
    return []


def attribute(mistakes: tuple[str, ...], records: list[dict], differing: list[str]) -> list[dict]:
    """For each mistake of a set that reproduces the records: the differing terms it explains, those that stop
    matching the user's numbers when it alone is switched off."""
    named = []
    for mistake in mistakes:
        rest = [m for m in mistakes if m != mistake]
        lost = {term for yours, theirs in zip(records, replay(rest)) for term in yours
                if not agrees(yours[term], theirs[term])}
        named.append({"name": mistake, "what": MISTAKES[mistake].what, "training": MISTAKES[mistake].training,
                      "explains": [term for term in differing if term in lost]})
    return named


# ---------------------------------------------------------------------------------------------------
# ---- masks: your block masking against ibot_min.block_mask, over many draws ----

MASK_GRIDS = ((14, 14), (8, 8))  # patches of ViT-*/16 at 224 px and of ViT/4 at 32 px (CIFAR)
MASK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
MASK_DRAWS = 400  # per grid and ratio: standard errors of about 1% of the masked fraction's spread
MASK_Z = 4.0  # a statistic differs when yours and ours lie more than 4 standard errors apart
MASK_MARGIN = 0.05  # and more than 5% apart (0.005 for the masked fraction and its spread): a difference that matters
MASK_STATISTICS = ("masked fraction", "spread", "blocks per mask", "patches per block", "|log aspect|")


def draw_masks(mask_fn, height: int, width: int, ratio: float, draws: int, seed: int) -> torch.Tensor:
    """`draws` masks mask_fn(height, width, ratio) -> (draws, height, width) bool, with torch's, Python's and (where
    installed) numpy's global generators seeded, and restored afterwards."""
    state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy else None
    masks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        if numpy:
            numpy.random.seed(seed)
        try:
            for _ in range(draws):
                masks.append(torch.as_tensor(mask_fn(height, width, ratio)))
        except Exception as error:
            raise UsageError(f"your mask function raised {type(error).__name__}: {error} (height {height}, width "
                             f"{width}, ratio {ratio})") from None
        finally:
            random.setstate(state)
            if numpy:
                numpy.random.set_state(numpy_state)
    mask = masks[0]
    if mask.shape != (height, width) or not (mask.dtype == torch.bool or set(mask.unique().tolist()) <= {0, 1}):
        raise UsageError(f"your mask function returned {mask.dtype} {tuple(mask.shape)} for height {height}, width "
                         f"{width}; expected a bool ({height}, {width}) mask")
    return torch.stack(masks).bool()


def label_blocks(masks: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool -> (n, H, W) long: 0 where unmasked, one id per block (4-connected masked patches): each patch
    takes the largest id among itself and its masked neighbours until nothing changes."""
    n, H, W = masks.shape
    labels = torch.where(masks, torch.arange(1, n * H * W + 1).view(n, H, W), 0)
    while True:
        p = F.pad(labels, (1, 1, 1, 1))
        grown = torch.stack([labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.where(masks, grown, 0)
        if torch.equal(grown, labels):
            return labels
        labels = grown


def mask_statistics(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per draw: the masked fraction, the number of blocks, and (for draws with a block) the mean patches per block
    and the mean |log(height / width)| of the blocks' bounding boxes."""
    n, H, W = masks.shape
    labels = label_blocks(masks)
    ids, block, area = torch.unique(labels[masks], return_inverse=True, return_counts=True)
    rows = torch.arange(H).view(1, H, 1).expand(n, H, W)[masks]
    cols = torch.arange(W).view(1, 1, W).expand(n, H, W)[masks]
    def extent(index):  # bounding-box size of each block along one axis
        low = torch.full((len(ids),), H + W).scatter_reduce(0, block, index, "amin")
        return torch.zeros(len(ids), dtype=torch.long).scatter_reduce(0, block, index, "amax") - low + 1
    log_aspect = (extent(rows).float() / extent(cols).float()).log().abs()
    draw = (ids - 1) // (H * W)  # which draw each block is in
    blocks = torch.bincount(draw, minlength=n).float()
    has = blocks > 0
    def per_draw(value):
        return torch.zeros(n).index_add(0, draw, value.float())[has] / blocks[has]
    return {"masked fraction": masks.float().mean((1, 2)), "blocks per mask": blocks,
            "patches per block": per_draw(area), "|log aspect|": per_draw(log_aspect)}


def z_score(yours: torch.Tensor, ours: torch.Tensor, statistic: str) -> float:
    """Standard errors between the two means (or, for "spread", the two standard deviations)."""
    if len(yours) < 2 or len(ours) < 2:
        return 0.0 if len(yours) == len(ours) else math.inf
    if statistic == "spread":
        a, b = yours.std(), ours.std()
        se = (a ** 2 / (2 * (len(yours) - 1)) + b ** 2 / (2 * (len(ours) - 1))).sqrt()
    else:
        a, b = yours.mean(), ours.mean()
        se = (yours.var() / len(yours) + ours.var() / len(ours)).sqrt()
    return 0.0 if a == b else float((a - b).abs() / se) if se > 0 else math.inf


def compare_statistic(name: str, yours: torch.Tensor, ours: torch.Tensor) -> dict:
    """One statistic's per-draw values -> both summaries (the mean; for "spread" the standard deviation), the
    z-score, and whether they differ: by more than MASK_Z standard errors and more than the margin."""
    def summary(x):
        return float(x.std()) if name == "spread" else float(x.mean()) if len(x) else 0.0
    z, a, b = z_score(yours, ours, name), summary(yours), summary(ours)
    margin = MASK_MARGIN / 10 if name in ("masked fraction", "spread") else MASK_MARGIN * max(abs(a), abs(b))
    return {"yours": a, "ours": b, "z": z if math.isfinite(z) else "inf", "differs": z > MASK_Z and abs(a - b) > margin}


def check_masks(mask_fn, draws: int = MASK_DRAWS) -> dict:
    """Your mask_fn(height, width, ratio) and block_mask over `draws` draws per grid and ratio; returns the report
    that main prints (or dumps with --json)."""
    rows = []
    for height, width in MASK_GRIDS:
        for ratio in MASK_RATIOS:
            yours = mask_statistics(draw_masks(mask_fn, height, width, ratio, draws, seed=1))
            ours = mask_statistics(draw_masks(block_mask, height, width, ratio, draws, seed=0))
            yours["spread"], ours["spread"] = yours["masked fraction"], ours["masked fraction"]
            stats = {name: compare_statistic(name, yours[name], ours[name]) for name in MASK_STATISTICS}
            differs = [name for name, s in stats.items() if s["differs"]]
            rows.append({"grid": f"{height}x{width}", "ratio": ratio, "statistics": stats, "differs": differs})
    return {"ok": not any(r["differs"] for r in rows), "draws": draws, "z_limit": MASK_Z, "margin": MASK_MARGIN,
            "rows": rows}


def print_mask_report(report: dict) -> None:
    header = ["grid", "ratio", *MASK_STATISTICS, "verdict"]
    lines = [header]
    for r in report["rows"]:
        cells = [f"{s['yours']:.3g}/{s['ours']:.3g}" for s in r["statistics"].values()]
        lines.append([r["grid"], f"{r['ratio']:g}", *cells, "DIFFERS: " + ", ".join(r["differs"]) if r["differs"]
                      else "ok"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
    print()
    print(textwrap.fill(f"each cell: yours/ours, over {report['draws']} draws per grid and ratio; means over draws "
                        "(spread: the standard deviation of the masked fraction); blocks: 4-connected masked patches, "
                        "aspect: their bounding boxes' height / width; differs: more than "
                        f"{report['z_limit']:g} standard errors and {report['margin']:.0%} apart "
                        f"({report['margin'] / 10:g} for the masked fraction and its spread)", 116))
    if report["ok"]:
        print("PASS: your masks match block_mask's in every statistic")
    else:
        print(f"FAIL: {sum(bool(r['differs']) for r in report['rows'])} of {len(report['rows'])} grid and ratio pairs "
              "differ from block_mask's")


# ---------------------------------------------------------------------------------------------------
# ---- command line ----


def load_factory(spec: str):
    """'my_loss.py:make_loss' or 'package.module:make_loss' -> the factory."""
    module_name, colon, name = spec.rpartition(":")
    if not colon or not module_name or not name:
        raise UsageError(f"expected MODULE:FACTORY (e.g. my_loss.py:make_loss), got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"no such file: {module_name}")
            sys.path.insert(0, str(path.resolve().parent))  # so that the file can import its neighbours
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = sys.modules[path.stem] = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot import {module_name}: {type(error).__name__}: {error}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable named {name!r}")
    return factory


def print_report(report: dict) -> None:
    """Per case: the first call at which each differing term differs, or the total of the last call when all agree."""
    lines = [("case", "term", "yours", "ours", "verdict")]
    for case in report["cases"]:
        rows = [r for r in report["rows"] if r["case"] == case["name"]]
        bad = {}
        for r in rows:
            if not r["ok"]:
                bad.setdefault(r["term"], r)
        last_total = next(r for r in rows if r["call"] == CALLS and r["term"] == "loss")
        for r in bad.values() or [last_total]:
            verdict = "ok" if r["ok"] else f"DIFFERS at call {r['call']}" + ("" if r["finite"] else ", not finite")
            lines.append((case["name"], r["term"], *(f"{v:.6g}" if isinstance(v, float) else v
                                                     for v in (r["yours"], r["ours"])), verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    for line in lines:
        print(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}  {line[3]:>{widths[3]}}  "
              f"{line[4]}")
    compared = ", ".join(dict.fromkeys(r["term"] for r in report["rows"]))
    print(textwrap.fill(f"\ncompared after each of {CALLS} calls per case: {compared}; a tensor is shown by its L2 "
                        "norm", 116, replace_whitespace=False))
    print(f"agree: |yours - ours| <= {ATOL:g} + {RTOL:g} |ours| everywhere")
    if report["not_compared"]:
        print(f"not compared (your loss does not give them): {', '.join(report['not_compared'])}")
    if report["ok"]:
        print(f"PASS: your loss agrees with IBOTLoss in all {len(report['cases'])} cases (--layout {report['layout']})")
        return
    failed = len({r["case"] for r in report["rows"] if not r["ok"]})
    print(f"FAIL: {failed} of {len(report['cases'])} cases differ (--layout {report['layout']})")
    explanations = report["explanations"]
    if not explanations:
        print(f"no known mistake, nor any set of up to {report['max_combined']}, reproduces your numbers (see "
              "MISTAKES in check_loss.py); start from the first DIFFERS row above")
        return
    if len(explanations) > 1:
        print(f"{len(explanations)} sets of known mistakes reproduce every number alike (these cases cannot tell "
              "them apart); one of them:")
    for number, found in enumerate(explanations, 1):
        if len(explanations) > 1:
            print(f"set {number}: {', '.join(m['name'] for m in found)}")
        elif len(found) > 1:
            print(f"{len(found)} deviations, which together reproduce every number:")
        for mistake in found:
            say = functools.partial(textwrap.fill, width=116, subsequent_indent="    ")
            print(say(f"{'deviation' if len(found) > 1 else 'likely mistake'}: {mistake['name']}: {mistake['what']}"))
            print(say(f"  explains: {', '.join(mistake['explains']) or 'nothing alone (only with the others)'}"))
            print(say(f"  in training: {mistake['training']}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("factory", help="MODULE:FACTORY, MODULE importable or a path to a .py file (with --mask: "
                                        "MODULE:FUNCTION, your masking function)")
    parser.add_argument("--layout", choices=LAYOUTS, default="official",
                        help="row order of your inputs: crop-major (as IBOTLoss), image-major, or per-view lists")
    parser.add_argument("--mask", action="store_true",
                        help="check a masking function FUNCTION(height, width, ratio) -> (height, width) bool against "
                             "block_mask instead of a loss")
    parser.add_argument("--draws", type=int, default=MASK_DRAWS, help="with --mask: masks drawn per grid and ratio")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for CI) instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: intra-op threads cost more than they save
    try:
        if args.draws < 2:
            raise UsageError(f"--draws must be at least 2, got {args.draws}")
        function = load_factory(args.factory)
        report = check_masks(function, args.draws) if args.mask else check(function, args.layout)
    except UsageError as error:
        print(f"check_loss: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, allow_nan=False))
    elif args.mask:
        print_mask_report(report)
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
