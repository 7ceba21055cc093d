"""Tests for check_loss.py: its mutated reference equals IBOTLoss when no mistake is applied (hypothesis), IBOTLoss
passes in every layout, every known mistake is named alone, in pairs and in triples, with the terms it explains
(from the mutated reference and from a loss written independently in the official code's style), the verdicts on
DINOv2's and lightly's iBOT losses, and the command line's output, JSON and usage errors.
"""

import functools
import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import check_loss as cl
import ibot_min as M

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: on a small shared CPU, intra-op threads cost more in hand-offs than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# ---- user losses written here, independently of check_loss ----


class BatchMajorIBOT(nn.Module):
    """IBOTLoss behind image-major rows (b*V + v), as a user with that layout would have it."""

    def __init__(self, out_dim, patch_out_dim, n_global_crops, n_local_crops):
        super().__init__()
        self.inner = M.IBOTLoss(out_dim, patch_out_dim, n_global_crops, n_local_crops)
        self.g, self.V = n_global_crops, n_global_crops + n_local_crops
        self.center, self.patch_center = self.inner.center, self.inner.patch_center

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, tau_t, tau_tp):
        def crop_major(x, views):  # row b*views + v -> row v*B + b
            B = x.shape[0] // views
            return torch.stack([x[b * views + v] for v in range(views) for b in range(B)])
        g = self.g
        return self.inner(crop_major(student_cls, self.V), crop_major(student_patch, g), crop_major(teacher_cls, g),
                          crop_major(teacher_patch, g), crop_major(masks, g), tau_t, tau_tp)


class PerCropIBOT(M.IBOTLoss):
    """IBOTLoss behind lists of per-view tensors, as lightly and DINOv2 pass them."""

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, tau_t, tau_tp):
        return super().forward(torch.cat(student_cls), torch.cat(student_patch), torch.cat(teacher_cls),
                               torch.cat(teacher_patch), torch.cat(masks), tau_t, tau_tp)


class OfficialStyleLoss(nn.Module):
    """A loss written as the official iBOT code writes it (loops over chunked crops, centres `center` (1, K) and
    `center2` (1, 1, K_p)), where `mistakes` switches on known mistakes in the way a user would make them, or
    "no-clamp", which is not among them: 0/0 for an image without a masked patch."""

    def __init__(self, out_dim, patch_out_dim, n_global_crops, n_local_crops, mistakes=()):
        super().__init__()
        self.g, self.V, self.mistakes = n_global_crops, n_global_crops + n_local_crops, set(mistakes)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, teacher_temp, teacher_patch_temp):
        if "centre-before-targets" in self.mistakes:
            self.update_center(teacher_cls, teacher_patch)
        if "teacher-not-detached" not in self.mistakes:
            teacher_cls, teacher_patch = teacher_cls.detach(), teacher_patch.detach()
        log_p = F.softmax if "softmax-student" in self.mistakes else F.log_softmax
        center2 = 0 if "no-patch-centring" in self.mistakes else self.center2
        student_cls_c = (student_cls / 0.1).chunk(self.V)
        student_patch_c = (student_patch / 0.1).chunk(self.g)
        teacher_cls_c = F.softmax((teacher_cls - self.center) / teacher_temp, dim=-1).chunk(self.g)
        teacher_patch_c = F.softmax((teacher_patch - center2) / teacher_patch_temp, dim=-1).chunk(self.g)
        masks_c = masks.float().chunk(self.g)
        total1 = total2 = 0
        n1 = n2 = 0
        for q in range(self.g):
            for v in range(self.V):
                if v == q:
                    loss2 = torch.sum(-teacher_patch_c[q] * log_p(student_patch_c[v], dim=-1), dim=-1)
                    mask = masks_c[v]
                    if "patch-mean-over-batch" in self.mistakes:
                        total2 = total2 + (loss2 * mask).sum() / mask.sum().clamp(min=1.0)
                    else:
                        masked = mask.sum(dim=-1) if "no-clamp" in self.mistakes else mask.sum(dim=-1).clamp(min=1.0)
                        total2 = total2 + (torch.sum(loss2 * mask, dim=-1) / masked).mean()
                    n2 += 1
                    if "cls-same-view-pairs" not in self.mistakes:
                        continue
                loss1 = torch.sum(-teacher_cls_c[q] * log_p(student_cls_c[v], dim=-1), dim=-1)
                total1 = total1 + loss1.mean()
                n1 += 1
        total1, total2 = total1 / n1, total2 / n2
        if "centre-before-targets" not in self.mistakes:
            self.update_center(teacher_cls, teacher_patch)
        return {"cls": total1, "patch": total2, "loss": total1 + total2}

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        self.center = self.center * 0.9 + teacher_cls.sum(0, keepdim=True) / len(teacher_cls) * 0.1
        patch_center = teacher_patch.mean(1).sum(0, keepdim=True) / len(teacher_patch)
        self.center2 = self.center2 * 0.9 + patch_center * 0.1


# ---------------------------------------------------------------------------------------------------
# ---- 1. the mutated reference without a mistake is IBOTLoss; the layouts round-trip ----


@FAST
@given(gl=st.tuples(st.integers(1, 3), st.integers(0, 3)).filter(lambda gl: sum(gl) >= 2), B=st.integers(1, 3),
       N=st.integers(1, 6), K=st.integers(2, 8), K_p=st.integers(2, 8), tau_t=st.floats(0.02, 0.2),
       tau_tp=st.floats(0.02, 0.2), p_mask=st.sampled_from([0.0, 0.4, 1.0]), scale=st.sampled_from([1.0, 20.0]),
       seed=st.integers(0, 2**16))
def test_reference_without_mistake_is_ibot_loss(gl, B, N, K, K_p, tau_t, tau_tp, p_mask, scale, seed):
    g, l = gl
    gen = torch.Generator().manual_seed(seed)
    logits = [scale * torch.randn(shape, generator=gen) for shape in
              [((g + l) * B, K), (g * B, N, K_p), (g * B, K), (g * B, N, K_p)]]
    masks = torch.rand(g * B, N, generator=gen) < p_mask
    ours = M.IBOTLoss(K, K_p, g, l)
    ours.center.copy_(torch.randn(1, K, generator=gen))
    ours.patch_center.copy_(torch.randn(1, 1, K_p, generator=gen))
    center, patch_center = ours.center.flatten().clone(), ours.patch_center.flatten().clone()

    leaves_ours = [x.clone().requires_grad_() for x in logits]
    expected = ours(*leaves_ours, masks, tau_t, tau_tp)
    expected["loss"].backward()
    leaves_ref = [x.clone().requires_grad_() for x in logits]
    terms, new_center, new_patch_center = cl.reference_loss(*leaves_ref, masks, tau_t, tau_tp, center, patch_center, g)
    terms["loss"].backward()

    tol = dict(rtol=cl.RTOL, atol=cl.ATOL)
    for name in ("cls", "patch", "loss"):
        torch.testing.assert_close(terms[name], expected[name], **tol)
    for mine, theirs in zip(leaves_ref[:2], leaves_ours[:2]):
        torch.testing.assert_close(mine.grad, theirs.grad, **tol)
    torch.testing.assert_close(new_center, ours.center.flatten(), **tol)
    torch.testing.assert_close(new_patch_center, ours.patch_center.flatten(), **tol)


@FAST
@given(views=st.integers(1, 4), B=st.integers(1, 4), layout=st.sampled_from(cl.LAYOUTS))
def test_layouts_round_trip_and_order_rows(views, B, layout):
    x = torch.arange(views * B).view(-1, 1)  # crop-major: row v*B + b holds v*B + b
    y = cl.to_layout(x, views, layout)
    torch.testing.assert_close(cl.from_layout(y, views, layout), x)
    if layout == "batch-major":
        assert [int(y[b * views + v]) for v in range(views) for b in range(B)] == list(range(views * B))
    if layout == "per-crop":
        assert len(y) == views and all(int(t[b]) == v * B + b for v, t in enumerate(y) for b in range(B))


def test_unknown_mistake_is_refused():
    with pytest.raises(ValueError, match="unknown mistake 'cls-typo'; expected one of cls-same-view-pairs"):
        cl.MutatedReference(4, 4, 1, 1, ["cls-typo"])(*[torch.zeros(2, 4), torch.zeros(1, 1, 4), torch.zeros(1, 4),
                                                       torch.zeros(1, 1, 4)], torch.ones(1, 1, dtype=torch.bool),
                                                     0.04, 0.04)


# ---------------------------------------------------------------------------------------------------
# ---- 2. correct losses pass, in every layout; a wrong layout fails ----


@pytest.mark.parametrize("layout, factory", [("official", M.IBOTLoss), ("batch-major", BatchMajorIBOT),
                                             ("per-crop", PerCropIBOT), ("official", OfficialStyleLoss)])
def test_correct_losses_pass(layout, factory):
    report = cl.check(factory, layout)
    assert report["ok"] and report["mistakes"] == [] and report["not_compared"] == []
    terms = {r["term"] for r in report["rows"]}
    assert terms == {"loss", "cls", "patch", "centre c", "centre c'", "grad student_cls", "grad student_patch",
                     "grad teacher_cls", "grad teacher_patch"}
    assert len(report["rows"]) == len(cl.CASES) * cl.CALLS * len(terms)


def test_ibot_loss_in_the_wrong_layout_fails():
    report = cl.check(M.IBOTLoss, "batch-major")
    assert not report["ok"]
    assert all(r["ok"] for r in report["rows"] if r["case"] == "1 global + 1 local, B=1")  # B = 1: same rows


def test_a_total_without_terms_or_centres_is_checked_on_what_it_gives():
    def factory(**sizes):
        loss = M.IBOTLoss(**sizes)
        return lambda *args: loss(*args)["loss"]
    report = cl.check(factory)
    assert report["ok"] and report["not_compared"] == ["centre c", "centre c'", "cls", "patch"]


# ---------------------------------------------------------------------------------------------------
# ---- 3. every known mistake is named, alone and in pairs, with the terms it explains ----

COMPATIBLE_PAIRS = [pair for pair in itertools.combinations(cl.MISTAKES, 2) if cl.compatible(pair)]


def named_sets(report):
    return [tuple(m["name"] for m in found) for found in report["explanations"]]


@pytest.mark.parametrize("mistake", list(cl.MISTAKES))
def test_each_mutation_is_named_alone(mistake):
    report = cl.check(functools.partial(cl.MutatedReference, mistakes=[mistake]))
    assert not report["ok"]
    assert named_sets(report) == [(mistake,)] and report["mistakes"] == [mistake]
    (named,) = report["explanations"][0]
    assert named["explains"] and named["training"] == cl.MISTAKES[mistake].training


@settings(max_examples=25, deadline=None)
@given(pair=st.sampled_from(COMPATIBLE_PAIRS))
def test_two_mutations_are_both_named(pair):
    report = cl.check(functools.partial(cl.MutatedReference, mistakes=pair))
    assert named_sets(report) == [pair]  # both, and no other set of up to MAX_COMBINED fits
    assert all(m["explains"] for m in report["explanations"][0])  # each explains some difference of its own


@settings(max_examples=4, deadline=None)
@given(triple=st.sampled_from([t for t in itertools.combinations(cl.MISTAKES, 3) if cl.compatible(t)]))
def test_three_mutations_are_all_named(triple):
    report = cl.check(functools.partial(cl.MutatedReference, mistakes=triple))
    assert named_sets(report) == [triple]


def test_mistakes_of_one_line_are_not_combined():
    assert len(COMPATIBLE_PAIRS) < len(cl.MISTAKES) * (len(cl.MISTAKES) - 1) // 2
    assert not cl.compatible(("cls-count-g-V", "cls-count-V-V1"))
    assert cl.compatible(("cls-count-g-V", "patch-mean-over-batch", "teacher-not-detached"))


def test_each_deviation_explains_its_own_terms():
    report = cl.check(functools.partial(cl.MutatedReference, mistakes=("cls-count-g-V", "teacher-not-detached")))
    explains = {m["name"]: m["explains"] for m in report["explanations"][0]}
    assert explains == {"cls-count-g-V": ["loss", "cls", "grad student_cls", "grad teacher_cls"],
                        "teacher-not-detached": ["grad teacher_cls", "grad teacher_patch"]}


@pytest.mark.parametrize("mistakes", [("cls-same-view-pairs",), ("patch-mean-over-batch",), ("centre-before-targets",),
                                      ("no-patch-centring",), ("teacher-not-detached",), ("softmax-student",),
                                      ("patch-mean-over-batch", "teacher-not-detached"),
                                      ("cls-same-view-pairs", "centre-before-targets", "no-patch-centring")])
def test_hand_written_mistakes_are_named(mistakes):
    report = cl.check(functools.partial(OfficialStyleLoss, mistakes=mistakes))
    assert not report["ok"]
    assert named_sets(report) == [tuple(m for m in cl.MISTAKES if m in mistakes)]


def test_teacher_gradients_alone_reveal_an_undetached_target():
    report = cl.check(functools.partial(OfficialStyleLoss, mistakes=["teacher-not-detached"]))
    bad = {r["term"] for r in report["rows"] if not r["ok"]}
    assert bad == {"grad teacher_cls", "grad teacher_patch"}


def test_an_unknown_mistake_is_reported_as_such(capsys):
    class DoubledPatch(M.IBOTLoss):
        def forward(self, *args):
            out = super().forward(*args)
            return {"cls": out["cls"], "patch": 2 * out["patch"], "loss": out["cls"] + 2 * out["patch"]}
    report = cl.check(DoubledPatch)
    assert not report["ok"] and report["explanations"] == [] and report["mistakes"] == []
    cl.print_report(report)
    assert f"nor any set of up to {cl.MAX_COMBINED}, reproduces your numbers" in capsys.readouterr().out


def test_a_nan_is_shown_and_kept_out_of_the_json(capsys):
    report = cl.check(functools.partial(OfficialStyleLoss, mistakes=["no-clamp"]))  # 0/0 for an image without masks
    assert not report["ok"] and report["mistakes"] == []
    assert {r["case"] for r in report["rows"] if not r["finite"]} == {"unmasked and fully masked images"}
    json.loads(json.dumps(report, allow_nan=False))
    cl.print_report(report)
    assert "DIFFERS at call 1, not finite" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# ---- 4. real libraries: lightly's losses (where installed) and DINOv2's, restated from its source ----

FIXTURES = ROOT / "tests" / "fixtures_loss"


@pytest.fixture
def restore_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_factory adds the file's folder


@pytest.mark.parametrize("factory, expected", [
    ("make_loss", ("cls-count-plus-one-without-local", "patch-centre-from-masked")),
    ("make_loss_one_temperature", ("cls-count-plus-one-without-local", "patch-centre-from-masked",
                                   "cls-temp-for-patches")),
])
def test_dinov2_verdicts(restore_path, factory, expected):
    report = cl.check(cl.load_factory(f"{FIXTURES / 'dinov2_ibot.py'}:{factory}"))
    assert named_sets(report) == [expected]
    explains = {m["name"]: m["explains"] for m in report["explanations"][0]}
    assert explains["cls-count-plus-one-without-local"] == ["loss", "cls", "grad student_cls"]
    bad_cases = {r["case"] for r in report["rows"] if not r["ok"] and r["term"] == "cls"}
    assert bad_cases == {"2 global, no local"}  # the only case without local crops


@pytest.mark.parametrize("factory, expected", [
    ("make_loss", ("patch-centre-from-masked", "teacher-not-detached")),
    ("make_loss_detached", ("patch-centre-from-masked",)),
    ("make_loss_one_temperature", ("patch-centre-from-masked", "cls-temp-for-patches", "teacher-not-detached")),
])
def test_lightly_verdicts(restore_path, capsys, factory, expected):
    pytest.importorskip("lightly", reason="lightly is not installed (pip install lightly)")
    report = cl.check(cl.load_factory(f"{FIXTURES / 'lightly_ibot.py'}:{factory}"), "per-crop")
    assert named_sets(report) == [expected]
    cl.print_report(report)
    out = " ".join(capsys.readouterr().out.replace("\n    ", " ").split())  # lines unwrapped
    assert "in training: the patch centre follows fewer tokens" in out and "as in DINOv2 and lightly" in out
    harmless = "in training: harmless if the teacher runs under torch.no_grad()"
    assert (harmless in out) == ("teacher-not-detached" in expected)


# ---------------------------------------------------------------------------------------------------
# ---- 5. masks: a masking function against block_mask ----


def flood_fill_blocks(mask: torch.Tensor) -> int:
    """4-connected blocks of one (H, W) mask, counted by a plain flood fill."""
    H, W = mask.shape
    seen, count = set(), 0
    for start in zip(*torch.nonzero(mask, as_tuple=True)):
        start = tuple(int(i) for i in start)
        if start in seen:
            continue
        count += 1
        stack = [start]
        while stack:
            r, c = stack.pop()
            if (r, c) in seen or not (0 <= r < H and 0 <= c < W) or not mask[r, c]:
                continue
            seen.add((r, c))
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


@FAST
@given(H=st.integers(1, 7), W=st.integers(1, 7), p=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_blocks_are_the_4_connected_components(H, W, p, seed):
    masks = torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed)) < p
    stats = cl.mask_statistics(masks)
    assert stats["blocks per mask"].tolist() == [flood_fill_blocks(m) for m in masks]
    torch.testing.assert_close(stats["masked fraction"], masks.float().mean((1, 2)))


def test_block_statistics_of_a_known_mask():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, :2, :4] = True  # a 2x4 block
    mask[0, 4:, 5] = True  # a 2x1 block
    stats = cl.mask_statistics(mask)
    assert stats["blocks per mask"].tolist() == [2.0]
    torch.testing.assert_close(stats["patches per block"], torch.tensor([5.0]))
    torch.testing.assert_close(stats["|log aspect|"], torch.tensor([(math.log(2) + math.log(2)) / 2]))


def test_block_mask_matches_itself_on_other_draws():
    report = cl.check_masks(lambda h, w, ratio: M.block_mask(h, w, ratio), draws=100)
    assert report["ok"], [r for r in report["rows"] if r["differs"]]


def test_uniform_masks_differ_in_block_shapes():
    report = cl.check_masks(M.random_mask, draws=60)
    assert not report["ok"]
    assert all({"blocks per mask", "patches per block"} <= set(r["differs"]) for r in report["rows"])


def test_a_mask_that_ignores_the_ratio_differs_in_its_masked_fraction():
    report = cl.check_masks(lambda h, w, ratio: M.block_mask(h, w, 0.3), draws=60)
    differs = {r["ratio"]: "masked fraction" in r["differs"] for r in report["rows"] if r["grid"] == "14x14"}
    assert differs == {0.1: True, 0.2: True, 0.3: False, 0.4: True, 0.5: True}


def test_lightly_block_masks_are_smaller_on_a_14x14_grid():
    utils = pytest.importorskip("lightly.models.utils", reason="lightly is not installed (pip install lightly)")
    report = cl.check_masks(lambda h, w, r: utils.random_block_mask_image((h, w), num_masks=int(r * h * w)), draws=80)
    for r in report["rows"]:
        if r["grid"] == "14x14":  # its smallest block is 4 patches, block_mask's (14 // 3)^2 = 16
            assert "patches per block" in r["differs"]
            assert r["statistics"]["patches per block"]["yours"] < r["statistics"]["patches per block"]["ours"]


def test_mask_draws_leave_the_global_generators_as_they_were():
    before = torch.random.get_rng_state(), random.getstate()
    cl.draw_masks(M.block_mask, 4, 4, 0.3, draws=3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before[0]) and random.getstate() == before[1]


# ---------------------------------------------------------------------------------------------------
# ---- 6. the command line ----

WRONG_LOSS = '''
import ibot_min as M

class SharedTemperature(M.IBOTLoss):
    def forward(self, s_cls, s_patch, t_cls, t_patch, masks, teacher_temp, teacher_patch_temp):
        return super().forward(s_cls, s_patch, t_cls, t_patch, masks, teacher_temp, teacher_temp)

def make_loss(**sizes):
    return SharedTemperature(**sizes)

def make_ours(**sizes):
    return M.IBOTLoss(**sizes)

def make_broken(out_dim, patch_out_dim, n_global_crops, n_local_crops):
    raise RuntimeError("no GPU here")

def make_two_argument_loss(**sizes):
    return lambda student_cls, teacher_cls: 0.0

def make_tuple_loss(**sizes):
    loss = M.IBOTLoss(**sizes)
    return lambda *args: tuple(loss(*args).values())

def our_mask(height, width, ratio):
    return M.block_mask(height, width, ratio)

def flat_mask(height, width, ratio):
    return M.block_mask(height, width, ratio).flatten()

def failing_mask(height, width, ratio):
    raise IndexError("grid too small")
'''


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_factory adds the file's folder
    path = tmp_path / "my_loss.py"
    path.write_text(WRONG_LOSS)
    return path


def test_cli_passes_ibot_loss_and_names_a_mistake(user_file):
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, cwd=user_file.parent)
    ours = run([sys.executable, str(ROOT / "check_loss.py"), "my_loss.py:make_ours"])
    assert ours.returncode == 0, ours.stderr
    assert "PASS: your loss agrees with IBOTLoss in all 7 cases" in ours.stdout and ours.stderr == ""
    wrong = run([sys.executable, str(ROOT / "check_loss.py"), "my_loss:make_loss", "--json"])  # importable name
    assert wrong.returncode == 1, wrong.stderr
    report = json.loads(wrong.stdout)
    assert not report["ok"] and report["mistakes"] == ["cls-temp-for-patches"]
    assert report["explanations"][0][0]["training"] == cl.MISTAKES["cls-temp-for-patches"].training


def test_table_names_the_mistake(user_file, capsys):
    assert cl.main([f"{user_file}:make_loss"]) == 1
    out = capsys.readouterr().out
    assert "patch    " in out and "DIFFERS at call 1" in out
    assert "likely mistake: cls-temp-for-patches: the [CLS] temperature tau_t used for the patch targets" in out


@pytest.mark.parametrize("spec, message", [
    ("my_loss.py", "expected MODULE:FACTORY (e.g. my_loss.py:make_loss), got 'my_loss.py'"),
    ("no_such_module:make", "cannot import no_such_module: ModuleNotFoundError: No module named 'no_such_module'"),
    ("missing.py:make", "no such file: missing.py"),
    ("{file}:make_nothing", "has no callable named 'make_nothing'"),
    ("{file}:make_broken", "make_broken(out_dim=16, patch_out_dim=12, n_global_crops=1, n_local_crops=1) raised "
                           "RuntimeError: no GPU here"),
    ("{file}:make_two_argument_loss", "your loss raised TypeError: "),
    ("{file}:make_tuple_loss", "your loss returned tuple; expected a tensor or a dict with 'loss'"),
    ("{file}:flat_mask --mask", "your mask function returned torch.bool (196,) for height 14, width 14; expected a "
                                "bool (14, 14) mask"),
    ("{file}:failing_mask --mask", "your mask function raised IndexError: grid too small (height 14, width 14, "
                                   "ratio 0.1)"),
    ("{file}:our_mask --mask --draws 1", "--draws must be at least 2, got 1"),
])
def test_usage_errors_give_one_line_and_exit_2(user_file, capsys, spec, message):
    assert cl.main(spec.format(file=user_file).split()) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("check_loss: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_mask_command_line(user_file, capsys):
    assert cl.main([f"{user_file}:our_mask", "--mask", "--draws", "30", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["rows"]) == len(cl.MASK_GRIDS) * len(cl.MASK_RATIOS)
    assert cl.main([f"{user_file}:our_mask", "--mask", "--draws", "30"]) == 0
    assert "PASS: your masks match block_mask's in every statistic" in capsys.readouterr().out


def test_bad_syntax_in_the_user_file_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "broken.py").write_text("def make_loss(:\n")
    assert cl.main([f"{tmp_path / 'broken.py'}:make_loss"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("check_loss: cannot import ") and "SyntaxError" in err and "Traceback" not in err
