"""Counts as the references compute them (issue 24, items 5 and 6).

* Progressive methods: every stage keeps ``int(N * r_s)`` of the image's *original* N, r_s from the reference's
  ratio list (Cooperx521/PyramidDrop ``modeling_llama_pdrop.py``: ``int(image_tokens * ratio)``; liaolea/TransPrune
  ``modeling_llama_transprune.py`` likewise). The rule is re-implemented here from those lines, at N = 300 and 604
  (where rounding the final count, or deriving earlier stages from it, differs) and at 576 / 1156, for every stage,
  in the schedule and in what a patched model's record keeps.
* LLaVA-NeXT budgets are counted once: the schedule (``tokprune.api.schedule``, ``tokprune flops``, ``flops_ratio``)
  applies the budget to the content tokens as the run does, and the record's per-stage counts equal it.
"""

from __future__ import annotations

import pytest
import torch
from test_families import ZOO, inputs

import tokprune
import tokprune.api as api
from tokprune import budget_solver

PDROP_RATIOS = (0.5, 0.25, 0.125)  # PyramidDrop's image_token_ratio_list
TRANSPRUNE_RATIOS = (0.875, 0.625, 0.125)  # TransPrune-High's --image_token_ratio_list


def reference_counts(n: int, ratios: tuple[float, ...]) -> list[int]:
    """The references' count at each stage: ``int(N * ratio)`` of the original N (Python's int(): truncation)."""
    return [int(n * r) for r in ratios]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for fam in ZOO.built.values():
        tokprune.remove(fam.model)


@pytest.mark.parametrize("n", [300, 604, 576, 1156])
@pytest.mark.parametrize("method, ratios", [("pdrop", PDROP_RATIOS), ("transprune", TRANSPRUNE_RATIOS)])
def test_progressive_schedules_count_int_n_r_at_every_stage(method, ratios, n):
    want = reference_counts(n, ratios)
    for budget in ({}, {"keep_ratio": ratios[-1]}):  # the paper default, and the same ratio given explicitly
        got = [st.keep for st in api.schedule("llava-1.5-7b", method, n_visual=n, **budget).stages]
        assert got == want, (budget, got, want)
    # the numbers of the audit, written out
    table = {("pdrop", 300): [150, 75, 37], ("transprune", 300): [262, 187, 37], ("transprune", 604): [528, 377, 75],
             ("pdrop", 1156): [578, 289, 144]}
    if (method, n) in table:
        assert want == table[(method, n)]


def test_a_count_budget_still_derives_the_stages_from_keep_over_n():
    """``keep=`` (a count, no ratio): the final count is exactly ``keep``, earlier stages ``int(N * r_s)`` with the
    shape of ``r = keep / N``."""
    n, keep = 300, 37
    got = [st.keep for st in api.schedule("llava-1.5-7b", "transprune", keep=keep, n_visual=n).stages]
    scale = (keep / n) / TRANSPRUNE_RATIOS[-1]
    assert got == [int(n * r * scale + 1e-9) for r in TRANSPRUNE_RATIOS[:-1]] + [keep]


@pytest.mark.parametrize("method", ["pdrop", "transprune"])
def test_the_run_keeps_the_reference_counts(method):
    """On the tiny LLaVA (16 image tokens) a ratio whose ``N r`` is not an integer: every LLM stage of the record
    keeps ``int(N r_s)`` (rounding to the nearest would keep 5 at the last stage, the reference keeps 4)."""
    fam = ZOO["llava"]
    x = inputs(fam)
    r = 0.3
    n = 16
    layers = {"layers": (1, 2, 3)}
    ratios = (r ** (1 / 3), r ** (2 / 3), r) if method == "pdrop" else tuple(
        min(1.0, q * r / TRANSPRUNE_RATIOS[-1]) for q in TRANSPRUNE_RATIOS[:-1]) + (r,)
    want = [int(n * q + 1e-9) for q in ratios]
    assert want[-1] == 4 and round(n * r) == 5
    opts = layers if method == "pdrop" else {**layers, "accumulate_layers": (0,)}
    with torch.no_grad(), tokprune.pruned(fam.model, method, keep_ratio=r, **opts):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    assert rec.n_visual[0][0] == n
    for j in range(len(rec.n_visual[0])):
        got = [int(st.kept[0][j].numel()) for st in rec.stages]
        assert got == [int(rec.n_visual[0][j] * q + 1e-9) for q in ratios]
    assert [int(st.kept[0][0].numel()) for st in rec.stages] == want


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
@pytest.mark.parametrize("method, opts", [("fastv", {"layer": 2}), ("pdrop", {"layers": (1, 2, 3)}),
                                          ("cls", {}), ("visionzip", {})])
def test_llava_next_schedule_counts_equal_the_records(method, opts):
    """The budget counts content tokens once: for every image of the prompt, the schedule built from its token
    count and newlines (the path ``tokprune flops`` and ``flops_ratio`` use) gives the LLM exactly what the run's
    record kept at every stage (content + the newlines the method keeps)."""
    fam = ZOO["llava_next"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, method, keep_ratio=0.5, **opts):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    for j, (n, sp) in enumerate(zip(rec.n_visual[0], rec.special[0])):
        newlines = int(sp.sum())
        assert newlines > 0
        sched = api.schedule(fam.model, method, keep_ratio=0.5, n_visual=n, newlines=newlines, **opts)
        assert sched.n_visual == n
        kept = [int(st.kept[0][j].numel()) for st in rec.stages]
        assert [count for _, count in sched.plan()] == kept, (sched.describe(), kept)


def test_llava_next_fastv_half_is_14_not_16():
    """The audit's case: 20 content tokens + 4 newlines, fastv keep_ratio 0.5: 10 + 4 = 14 (the run), not 16
    (0.5 of all 24 tokens, plus the newlines again)."""
    s = api.schedule(ZOO["llava_next"].model, "fastv", keep_ratio=0.5, n_visual=24, newlines=4)
    assert s.plan()[-1][1] == 14 and s.stages[-1].keep == 10


def test_flops_ratio_on_llava_next_solves_over_content_tokens():
    """``flops_ratio`` is solved on the default image's content tokens: its keep_ratio times the content count is
    the solved count, and the schedule at that ratio costs the target within 1%."""
    from tokprune.configs import load
    from tokprune.flops import for_budget, image_work

    config = load("llava-next-7b")
    work = image_work(config)
    assert work.newlines > 0
    pruner = api.make_pruner("pdrop", {"flops_ratio": 0.4})
    _, ratio = budget_solver.resolve("llava-next-7b", pruner, None, None)
    content = work.llm_tokens - work.newlines
    k = round(ratio * content)
    assert abs(ratio * content - k) < 1e-6
    sched = api.schedule("llava-next-7b", "pdrop", keep_ratio=ratio)
    assert sched.n_visual == work.llm_tokens and sched.stages[-1].keep == k
    assert abs(for_budget(config, schedule=sched, convention="3ndm").ratio(part="llm_prefill") / 0.4 - 1) <= 0.01
