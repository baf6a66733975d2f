"""The measured-cost bound of the speed study (tokprune.eval.cost): the replay runs the unpatched model on exactly
a case's LLM token schedule (its logits prove it), the pieces it times follow the schedule exactly, and the ceiling
composes from the replay and piece times as documented. Deterministic clocks replace the real ones, so nothing here
compares times."""

from __future__ import annotations

import contextlib
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
        # well under the tiny model's prefill
        scale = {"llm": 0.01, "probe": 0.01, "enc": 0.0025, "proj": 0.00125}[p.part]
        return scale * p.rows * p.tokens + 0.005 * len(p.windows)

    def time(self, pieces):
        self.asked.append(list(pieces))
        return {p: self.ms(p) for p in pieces}


class FakeReplay:
    """Deterministic replay times: 0.01 ms per token per layer; records the schedules asked, in order."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, ...]] = []

    @staticmethod
    def ms(tokens) -> float:
        return 0.01 * sum(tokens)

    def time(self, tokens):
        self.asked.append(tuple(tokens))
        return self.ms(tokens)


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
        expected[cost.Piece("probe", n, 1)] += probe_flops(llm, n, rows) / flops.llm_layer_flops(llm, n)
    got = {p: v for p, v in d.items() if p.part in ("llm", "probe")}
    assert cost.llm_tokens([sched]) == tuple(sched.tokens)
    assert got.keys() == expected.keys()
    assert all(got[p] == pytest.approx(expected[p]) for p in got)
    assert (len(sched.probes) > 0) == (method in ("pdrop", "transprune"))
    # the encoder pieces: one per ViT layer at the schedule's count; the projector at its ViT-level tokens
    (work,) = sched.images
    enc = Counter({p.tokens: v for p, v in d.items() if p.part == "enc"})
    assert enc == Counter(work.layer_tokens)
    assert [p.tokens for p in d if p.part == "proj"] == [work.projector_tokens]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_demand_adds_a_received_attention_read_as_its_flops_share_of_the_layer(name):
    # HiPrune reads ViT layers' received attention (Qwen2.5-VL: a windowed and a full-attention block): each read
    # recomputes that layer's q k^T, so its encoder piece is run 1 + read / layer FLOPs times, where the unpruned
    # schedule runs it once; the ceiling then adds that share of the piece's time (pieces of other layers cancel)
    cfg = configs.load(name)
    model = configs.build_model(cfg, "cpu")
    record, inputs = _record(model, "hiprune", 4)
    (sched,) = flops.from_record(cfg, record, **flops.geometry_from_inputs(inputs))
    (work,) = sched.images
    assert len(work.reads) == (2 if "qwen" in name else 1)  # tiny-llava: HiPrune's two layers are one
    full = cost.demand(cfg, [flops.TokenSchedule.unpruned(cfg, n_text=10)])
    d = cost.demand(cfg, [sched])
    vision = flops.describe(cfg).vision
    extra = Counter()
    for e in work.reads:
        n = work.layer_tokens[e]
        windows = cost._windows(work.windows, n) if e in vision.windowed and work.windows else ()
        extra[cost.Piece("enc", n, 1, windows)] += (flops.read_flops(vision, work, e)
                                                    / flops.vit_layer_flops(vision, work, e))
    enc = {p for p in set(d) | set(full) if p.part == "enc"}
    assert {p for p in enc if d.get(p, 0) != full.get(p, 0)} == set(extra) == cost.timed_pieces(full, d)
    for p in enc:
        assert d.get(p, 0) == pytest.approx(full.get(p, 0) + extra.get(p, 0))
    assert all(0 < v < 0.5 for v in extra.values())  # q k^T alone: under half a layer
    times = {p: 10.0 for p in extra}
    assert cost.ceiling_ms(100.0, full, d, times) == pytest.approx(100.0 + 10.0 * sum(extra.values()))


def test_demand_of_a_batch_pads_to_the_longest_sample():
    cfg = configs.load("tiny-llava")
    full = flops.TokenSchedule.unpruned(cfg, n_text=10)
    short = full.pruned(1, 2)
    d = cost.demand(cfg, [full, short])
    assert d == cost.demand(cfg, [full, full])  # sample 0 is never shorter
    assert all(p.rows == 2 for p in d if p.part == "llm")


def test_ceiling_formula_by_hand():
    layer, probe, enc_full, enc_cut = (cost.Piece("llm", 10), cost.Piece("probe", 4), cost.Piece("enc", 5),
                                       cost.Piece("enc", 3))
    times = {probe: 3.0, enc_full: 2.0, enc_cut: 1.5}
    full = {layer: 2, enc_full: 2}
    case = {layer: 1, probe: 1.25, enc_full: 1, enc_cut: 1}
    # the replay (100) runs the layers and the whole encoder: + the probe, - what the encoder cut saves
    assert cost.timed_pieces(full, case) == {probe, enc_full, enc_cut}
    assert cost.ceiling_ms(100.0, full, case, times) == pytest.approx(100 + 1.25 * 3 - 2.0 + 1.5)
    same = {layer: 1, enc_full: 2}  # no probe, no encoder cut: the replay alone, no piece needs a time
    assert cost.timed_pieces(full, same) == set() and cost.ceiling_ms(100.0, full, same, {}) == 100.0


@pytest.mark.parametrize("name", TINY)
def test_replay_runs_the_unpatched_model_on_exactly_the_schedule(name):
    """Causal attention: a replay that cuts the sequence to a prefix at some layers gives, as its last logits, the
    unpatched model's logits at the last position it kept; each layer saw exactly its count of tokens."""
    cfg = configs.load(name)
    model = configs.build_model(cfg, "cpu")
    inputs = configs.example_inputs(cfg, n_text=10)
    if name == "tiny-qwen3-vl":
        with pytest.raises(NotImplementedError, match="DeepStack"):
            cost.ScheduleReplay(model)
        return
    length, layers = inputs["input_ids"].shape[1], model.model.language_model.layers
    tokens = [length - 3] + [length - 9] * (len(layers) - 2) + [length - 12]
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1] if a else
                                                                          k["hidden_states"].shape[1]),
                                             with_kwargs=True) for layer in layers]
    replay = cost.ScheduleReplay(model)
    with torch.inference_mode():
        full = model(**inputs).logits
        for h in hooks:  # registered before the replay's own hooks: they see the untrimmed input; re-add after
            h.remove()
        out = replay.run(tokens, lambda: model(**inputs, use_cache=True, logits_to_keep=1))
        hooks = [layer.register_forward_hook(lambda m, a, k, o: seen.append((o[0] if isinstance(o, tuple) else o
                                                                              ).shape[1]), with_kwargs=True)
                 for layer in layers]
        seen.clear()
        replay.run(tokens, lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    for h in hooks:
        h.remove()
    assert seen == tokens
    torch.testing.assert_close(out.logits[0, -1], full[0, tokens[-1] - 1], rtol=1e-4, atol=1e-5)
    assert not any(layer._forward_pre_hooks for layer in layers)  # the replay leaves no hook behind
    with pytest.raises(ValueError, match="never grows"):
        replay.run([length - 3, length] + [length] * (len(layers) - 2), lambda: model(**inputs))
    with pytest.raises(ValueError, match="decoder layers"):
        replay.run([length], lambda: model(**inputs))


def test_windows_keep_the_token_count_and_proportions():
    assert cost._windows((64, 64, 32), 80) == (32, 32, 16)
    got = cost._windows((64, 48, 16, 16), 37)
    assert sum(got) == 37 and got[0] >= got[1] >= got[2]
    assert cost._windows((4, 4), 1) == (1,)


def test_speed_run_composes_the_cost_bound_from_injected_replay_and_piece_times(llava):
    cfg, model = llava
    clock, replays = FakeClock(), FakeReplay()
    cases = bench.grid(["cls", "fastv", "pdrop", "flowcut", "random"], keeps=[4])
    report = speed.run(model, cases, bench.Prompt(n_text=10), min_repeats=2, max_repeats=2, warmup=0,
                       progress=False, piece_clock=clock, replay_clock=replays)
    base = report.rows[0]
    assert base.cost_bound == pytest.approx(1.0) and base.speedup == 1.0
    unpruned = flops.TokenSchedule.unpruned(cfg, n_text=10)
    geometry = flops.geometry_from_inputs(configs.example_inputs(cfg, n_text=10))
    schedules = {}
    for row in report.rows[1:]:
        assert row.error is None, row.error
        record, _ = _record(model, row.method, 4)
        (schedules[row.method],) = flops.from_record(cfg, record, **geometry)
    # each round: the unpruned schedule's replay (the check) and one replay per distinct LLM schedule (cls and
    # random share theirs), each right after the first case with it
    distinct = {tuple(unpruned.tokens)} | {tuple(s.tokens) for s in schedules.values()}
    assert len(replays.asked) == 2 * len(distinct) and set(replays.asked) == distinct
    assert report.meta["cost_model"]["replays_per_round"] == len(distinct)
    assert report.meta["cost_model"]["replay_check"] == pytest.approx(
        sorted(FakeReplay.ms(unpruned.tokens) / u for u in base.runs_ms)[0] / 2
        + sorted(FakeReplay.ms(unpruned.tokens) / u for u in base.runs_ms)[1] / 2, rel=1e-4)
    # pieces: one call per round, each piece once; only probes and encoder cuts (the replay runs the rest)
    assert len(clock.asked) == 2 and all(len(set(a)) == len(a) for a in clock.asked)
    assert {p.part for p in clock.asked[0]} == {"probe", "enc", "proj"}
    llm = flops.describe(cfg).llm
    for row in report.rows[1:]:
        sched = schedules[row.method]
        ceiling = FakeReplay.ms(sched.tokens)
        ceiling += sum(FakeClock.ms(cost.Piece("probe", n)) * probe_flops(llm, n, r) / flops.llm_layer_flops(llm, n)
                       for _, n, r in sched.probes)
        (work,) = sched.images
        (w0,) = unpruned.images
        assert (work.layer_tokens != w0.layer_tokens) == (row.method == "flowcut")  # cuts inside the encoder
        ceiling -= sum(FakeClock.ms(cost.Piece("enc", n0)) - FakeClock.ms(cost.Piece("enc", n))
                       for n0, n in zip(w0.layer_tokens, work.layer_tokens))
        ceiling -= FakeClock.ms(cost.Piece("proj", w0.projector_tokens)) - FakeClock.ms(
            cost.Piece("proj", work.projector_tokens))
        assert row.ceiling_ms == pytest.approx(ceiling, rel=1e-9)
        assert row.ceilings_ms == pytest.approx([ceiling] * 2, abs=1e-4)  # per round (4 decimals), kept in the JSON
        assert row.cost_bound == pytest.approx(sum(u / ceiling for u in base.runs_ms) / 2, rel=1e-4)
        assert row.of_cost_bound == pytest.approx(sum(ceiling / c for c in row.runs_ms) / 2, rel=1e-4)
        paired = [u / c for u, c in zip(base.runs_ms, row.runs_ms)]
        assert row.speedup == pytest.approx(sum(paired) / 2, rel=1e-3)
    md = report.to_markdown()
    assert "schedule replays per round" in md and "| speed goal: >= 95% of cost bound |" in md


def test_cases_with_one_schedule_run_next_to_their_replay(llava):
    """From round 2 on, the cases run grouped by LLM schedule (unpruned first), so each replay is timed beside
    every case it bounds."""
    _, model = llava
    order = []
    replays = FakeReplay()
    cases = bench.grid(["cls", "fastv", "random"], keeps=[4])  # cls and random share a schedule
    with _spy_apply(order):
        speed.run(model, cases, bench.Prompt(n_text=10), min_repeats=2, max_repeats=2, warmup=0, progress=False,
                  piece_clock=FakeClock(), replay_clock=replays)
    assert order[:3] == ["cls", "fastv", "random"]  # round 1: as given
    assert order[3:] == ["cls", "random", "fastv"]  # round 2: grouped
    assert len(replays.asked) == 6 and replays.asked[3:] == replays.asked[:3]  # one replay per schedule per round


@contextlib.contextmanager
def _spy_apply(order):
    original = tokprune.apply

    def spy(model, method, **kw):
        order.append(method)
        return original(model, method=method, **kw)

    tokprune.apply = spy
    try:
        yield
    finally:
        tokprune.apply = original


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
    pieces = sorted(d) + [cost.Piece("llm", 7), cost.Piece("probe", 7)]
    times = cost.PieceClock(model, timer).time(pieces)
    assert set(times) == set(pieces) and {p.part for p in pieces} == {"llm", "probe", "enc", "proj"}
    # the last piece (a probe stands for a share of a layer) ran the decoder layer on a batch x 7 hidden state
    with torch.inference_mode():
        out = calls[-1]()
    assert (out[0] if isinstance(out, tuple) else out).shape[:2] == (1, 7)
