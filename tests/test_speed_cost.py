"""The measured-cost bound of the speed study (tokprune.eval.cost): the pieces it times follow the token schedule
of each case exactly, and the ceiling composes from the piece times as documented. A deterministic clock replaces
the real one, so nothing here compares times."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import tokprune
from tokprune import configs, flops
from tokprune.eval import bench, cost, speed
from tokprune.flops.count import probe_flops

TINY = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"]


class FakeClock:
    """Deterministic piece times: a linear function of the piece's shape; counts how often each piece is asked."""

    def __init__(self) -> None:
        self.asked: list[list[cost.Piece]] = []

    @staticmethod
    def ms(p: cost.Piece) -> float:
        scale = {"llm": 0.01, "enc": 0.0025, "proj": 0.00125}[p.part]  # well under the tiny model's prefill
        return scale * p.rows * p.tokens + 0.005 * len(p.windows)

    def time(self, pieces):
        self.asked.append(list(pieces))
        return {p: self.ms(p) for p in pieces}


@pytest.fixture(scope="module")
def llava():
    cfg = configs.load("tiny-llava")
    return cfg, configs.build_model(cfg, "cpu")


def _record(model, method, keep, batch=1):
    inputs = configs.example_inputs(model.config, n_text=10, batch=batch)
    with torch.inference_mode(), tokprune.pruned(model, method, keep=keep):
        model(**inputs, use_cache=True, logits_to_keep=1)
        record = tokprune.last_record(model)
    return record, inputs


@pytest.mark.parametrize("method", ["cls", "fastv", "pdrop", "transprune", "flowcut"])
def test_demand_counts_every_llm_layer_at_its_schedule_tokens(llava, method):
    cfg, model = llava
    record, inputs = _record(model, method, 4)
    (sched,) = flops.from_record(cfg, record, **flops.geometry_from_inputs(inputs))
    d = cost.demand(cfg, [sched])
    llm = flops.describe(cfg).llm
    expected: Counter = Counter(cost.Piece("llm", n, 1) for n in sched.tokens)
    for _, n, rows in sched.probes:  # a probe: its FLOPs share of one layer at its token count
        expected[cost.Piece("llm", n, 1)] += probe_flops(llm, n, rows) / flops.llm_layer_flops(llm, n)
    got = {p: v for p, v in d.items() if p.part == "llm"}
    assert got.keys() == expected.keys()
    assert all(got[p] == pytest.approx(expected[p]) for p in got)
    assert (len(sched.probes) > 0) == (method in ("pdrop", "transprune"))
    # the encoder pieces: one per ViT layer at the schedule's count; the projector at its ViT-level tokens
    (work,) = sched.images
    enc = Counter({p.tokens: v for p, v in d.items() if p.part == "enc"})
    assert enc == Counter(work.layer_tokens)
    assert [p.tokens for p in d if p.part == "proj"] == [work.projector_tokens]


def test_demand_of_a_batch_pads_to_the_longest_sample():
    cfg = configs.load("tiny-llava")
    full = flops.TokenSchedule.unpruned(cfg, n_text=10)
    short = full.pruned(1, 2)
    d = cost.demand(cfg, [full, short])
    assert d == cost.demand(cfg, [full, full])  # sample 0 is never shorter
    assert all(p.rows == 2 for p in d if p.part == "llm")


def test_ceiling_formula_by_hand():
    a, b, c = cost.Piece("llm", 10), cost.Piece("llm", 4), cost.Piece("enc", 5)
    times = {a: 7.0, b: 3.0, c: 2.0}
    full = {a: 2, c: 1}
    case = {a: 1, b: 1.25, c: 1}
    # 100 - (2 - 1) * 7 - (0 - 1.25) * 3 - 0 * 2: the encoder cancels
    assert cost.ceiling_ms(100.0, full, case, times) == pytest.approx(100 - 7 + 3.75)
    assert cost.ceiling_ms(100.0, full, case, {a: 7.0, b: 3.0}) == pytest.approx(96.75)  # c needs no time
    assert cost.rest_ms(100.0, full, times) == pytest.approx(100 - 14 - 2)


def test_windows_keep_the_token_count_and_proportions():
    assert cost._windows((64, 64, 32), 80) == (32, 32, 16)
    got = cost._windows((64, 48, 16, 16), 37)
    assert sum(got) == 37 and got[0] >= got[1] >= got[2]
    assert cost._windows((4, 4), 1) == (1,)


def test_speed_run_composes_the_cost_bound_from_injected_piece_times(llava):
    cfg, model = llava
    clock = FakeClock()
    cases = bench.grid(["cls", "fastv", "pdrop", "flowcut"], keeps=[4])
    report = speed.run(model, cases, bench.Prompt(n_text=10), min_repeats=2, max_repeats=2, warmup=0,
                       progress=False, piece_clock=clock)
    base = report.rows[0]
    assert base.cost_bound == pytest.approx(1.0) and base.speedup == 1.0
    full = cost.demand(cfg, [flops.TokenSchedule.unpruned(cfg, n_text=10)])
    geometry = flops.geometry_from_inputs(configs.example_inputs(cfg, n_text=10))
    # one call per round; every piece asked once per call (deduplicated across cases)
    assert len(clock.asked) == 2 and all(len(set(a)) == len(a) for a in clock.asked)
    for row in report.rows[1:]:
        assert row.error is None, row.error
        record, _ = _record(model, row.method, 4)
        (sched,) = flops.from_record(cfg, record, **geometry)
        llm = flops.describe(cfg).llm
        saved = sum(FakeClock.ms(cost.Piece("llm", n0)) - FakeClock.ms(cost.Piece("llm", n))
                    for n0, n in zip(full_tokens(full), sched.tokens))
        saved -= sum(FakeClock.ms(cost.Piece("llm", n)) * probe_flops(llm, n, r) / flops.llm_layer_flops(llm, n)
                     for _, n, r in sched.probes)
        (work,) = sched.images
        (w0,) = flops.TokenSchedule.unpruned(cfg, n_text=10).images
        if row.method == "flowcut":  # cuts inside the encoder: ViT layers and projector after the cut save time
            assert work.layer_tokens != w0.layer_tokens
        saved += sum(FakeClock.ms(cost.Piece("enc", n0)) - FakeClock.ms(cost.Piece("enc", n))
                     for n0, n in zip(w0.layer_tokens, work.layer_tokens))
        saved += FakeClock.ms(cost.Piece("proj", w0.projector_tokens)) - FakeClock.ms(
            cost.Piece("proj", work.projector_tokens))
        ceilings = [u - saved for u in report.rows[0].runs_ms]
        assert row.ceiling_ms == pytest.approx(sorted(ceilings)[0] / 2 + sorted(ceilings)[1] / 2, rel=1e-3)
        ratios = [u / (u - saved) for u in base.runs_ms]
        assert row.cost_bound == pytest.approx(sum(ratios) / 2, rel=1e-3)
        paired = [u / c for u, c in zip(base.runs_ms, row.runs_ms)]
        assert row.speedup == pytest.approx(sum(paired) / 2, rel=1e-3)
        assert row.of_cost_bound == pytest.approx(row.speedup / row.cost_bound)
    check = report.meta["cost_model"]
    assert check["rest_ms"] == pytest.approx(
        sorted(u - sum(d * FakeClock.ms(p) for p, d in full.items()) for u in base.runs_ms)[0] / 2
        + sorted(u - sum(d * FakeClock.ms(p) for p, d in full.items()) for u in base.runs_ms)[1] / 2, rel=1e-3)
    md = report.to_markdown()
    assert "cost model check" in md and "| speed goal: >= 95% of cost bound |" in md


def test_readme_snippet_shows_both_bounds_and_says_what_the_cost_bound_is(llava, tmp_path):
    _, model = llava
    report = speed.run(model, bench.grid(["cls"], keeps=[4]), bench.Prompt(n_text=10), min_repeats=1, max_repeats=1,
                       warmup=0, progress=False, piece_clock=FakeClock(), meta={"model": "tiny-llava"})
    js, _ = report.write(tmp_path)
    snippet = speed.readme_snippet([js])
    assert "| cost bound (measured) | measured / cost bound | analytic bound (this depth) |" in snippet
    assert speed.COST_BOUND_NOTE in snippet and "paired" in snippet
    row = next(line for line in snippet.splitlines() if line.startswith("| cls keep=4 |"))
    cls = report.rows[1]
    assert f"| {cls.cost_bound:.2f}x | {cls.of_cost_bound:.0%} | {cls.bound:.2f}x |" in row


def full_tokens(full: Counter) -> list[int]:
    """The unpruned schedule's per-layer token counts back from its demand (all layers alike)."""
    return [p.tokens for p, d in full.items() if p.part == "llm" for _ in range(int(d))]


@pytest.mark.parametrize("name", TINY)
def test_piece_clock_runs_the_real_modules_of_every_family(name):
    cfg = configs.load(name)
    model = configs.build_model(cfg, "cpu")
    inputs = configs.example_inputs(cfg, n_text=10)
    schedule = flops.TokenSchedule.unpruned(cfg, n_text=10, image_size=None)
    calls = []

    def timer(fn):
        calls.append(fn)
        return 1.0, fn()

    d = cost.demand(cfg, [schedule]) if schedule.images else Counter()
    if name == "tiny-llava-next":  # the unpruned schedule of a tiled image comes from the record's sizes
        record, inputs = _record(model, "random", 4)
        d = cost.demand(cfg, flops.from_record(cfg, record, **flops.geometry_from_inputs(inputs)))
    pieces = sorted(d) + [cost.Piece("llm", 7)]
    times = cost.PieceClock(model, timer).time(pieces)
    assert set(times) == set(pieces) and {p.part for p in pieces} == {"llm", "enc", "proj"}
    # the last piece ran the decoder layer on a batch x 7 hidden-state tensor
    with torch.inference_mode():
        out = calls[-1]()
    assert (out[0] if isinstance(out, tuple) else out).shape[:2] == (1, 7)
