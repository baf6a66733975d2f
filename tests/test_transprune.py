"""TransPrune (``transprune``): schedules and FLOPs, TTV on hand-made module I/O with known magnitude and direction,
the selection of every cut against independent references (hooks + hand-written next-layer rows on LLaVA at both
position modes; eager instruction rows and forward-hook TTV under the multi-cut oracle on every family), generate,
static cache and ``flops_ratio``. The family matrix (tests/test_families.py, tests/test_llava.py) runs it too."""

from __future__ import annotations

import pytest
import torch
from progressive_ref import Recorder, TransPruneScorer, llava_loop, normalised, topk_sorted, ttv_reference
from test_families import GEN as FGEN
from test_families import ZOO, assert_same_generation, image_runs, inputs
from test_seams import _cuts

import oracles
import tokprune
import tokprune.api as api
from tokprune import flops
from tokprune.configs import load
from tokprune.pruners.base import LLMSignals, Observed
from tokprune.pruners.transprune import TransPrune
from tokprune.testing import families, image_prompt, make_image

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
LLAVA7B = "llava-1.5-7b"


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for fam in ZOO.built.values():
        tokprune.remove(fam.model)


# ---------------------------------------------------------------------------------------------- schedules, FLOPs
def test_default_schedule_on_llava_7b_costs_1_56_tflops():
    s = api.schedule(LLAVA7B, "transprune")
    assert [(st.layer, st.keep) for st in s.stages] == [(7, 504), (9, 360), (12, 72)]
    report = flops.for_budget(load(LLAVA7B), schedule=s, convention="3ndm")
    assert round(report.tflops, 2) == 1.56 and round(report.ratio(part="llm_prefill"), 3) == 0.408
    assert api.schedule(LLAVA7B, "transprune", keep_ratio=0.125) == s
    assert api.schedule(LLAVA7B, "transprune", schedule={7: 0.875, 9: 0.625, 12: 0.125}) == s
    # keep_ratio scales the default fractions by r / 0.125 (at most 1)
    half = api.schedule(LLAVA7B, "transprune", keep=36)
    assert [st.keep for st in half.stages] == [252, 180, 36]


def test_layers_and_accumulation_scale_with_depth():
    info32, info28 = api.model_info(LLAVA7B), api.model_info("qwen2.5-vl-7b")
    assert TransPrune().accumulated(info32) == (6, 7, 8, 9, 10, 11)
    assert TransPrune().llm_layers(info28) == (6, 8, 10) and TransPrune().accumulated(info28) == (5, 6, 7, 8, 9)
    tiny = api.model_info(ZOO["llava"].model)
    assert TransPrune().llm_layers(tiny) == (1, 2, 3) and TransPrune().accumulated(tiny) == (0, 1, 2)
    assert TransPrune().llm_request(info32).observe == (6, 7, 8, 9, 10, 11)
    assert TransPrune().llm_request(info32).queries == "instruction"


@pytest.mark.parametrize("target", [0.25, 0.408, 0.6])
def test_flops_ratio_is_solved_within_one_percent(target):
    s = api.schedule(LLAVA7B, "transprune", flops_ratio=target)
    got = flops.for_budget(load(LLAVA7B), schedule=s, convention="3ndm").ratio(part="llm_prefill")
    assert abs(got / target - 1) <= 0.01
    with pytest.raises(ValueError, match="cannot be met"):
        api.schedule(LLAVA7B, "transprune", flops_ratio=0.1)  # 7 of 32 layers see every token


def test_options_are_validated():
    with pytest.raises(ValueError, match="direction"):
        TransPrune(direction="abs")
    with pytest.raises(ValueError, match="alpha"):
        TransPrune(alpha=2.0)
    with pytest.raises(ValueError, match="need their ratios"):
        TransPrune(layers=(2, 3))


# ---------------------------------------------------------------------------------------------- TTV, hand-made
def test_ttv_of_known_magnitudes_and_directions_follows_the_survivors():
    """One observed layer over 5 slots (slot 3 dead): y = 2x (ratio 2, cos 1), y = -x (ratio 1, 1 - cos = 2),
    y orthogonal to x with |y| = 3|x| (ratio 3, 1 - cos = 1). The cut sees 3 of the slots, reordered by position."""
    x = torch.tensor([[1.0, 0], [0, 2.0], [3.0, 0], [1.0, 1.0], [0, 1.0]])
    y = torch.stack([2 * x[0], -x[1], torch.tensor([0, 9.0]), x[3], 2 * x[4]])
    valid = torch.tensor([[True, True, True, False, True]])
    obs = Observed.of(x[None], y[None], torch.tensor([[0, 1, 2, 3, 4]]), valid)
    zero = Observed.of(x[None], torch.zeros_like(x)[None] + 1e-30, obs.positions, valid)  # mlp contributes ~0
    e = torch.exp(torch.tensor([0.0, 2.0, 1.0, 0.0]))  # deltas of the valid slots 0, 1, 2, 4
    expect = {0: 2 * e[0] / e.sum(), 1: 1 * e[1] / e.sum(), 2: 3 * e[2] / e.sum(), 4: 2 * e[3] / e.sum()}
    sig = LLMSignals(layer=1, hidden=torch.zeros(1, 3, 2), attention=torch.zeros(1, 3), visual=[[torch.arange(3)]],
                     positions=torch.tensor([[1, 2, 4]]), observed={(0, "attn"): obs, (0, "mlp"): zero})
    got = TransPrune(direction="code").ttv(sig)[0]
    assert torch.allclose(got, torch.stack([expect[1], expect[2], expect[4]]), atol=1e-6)
    paper = TransPrune(direction="paper").ttv(sig)[0]  # 1 - |cos|: deltas 0, 0, 1, 0
    e2 = torch.exp(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(paper, torch.stack([1 * e2[1], 3 * e2[2], 2 * e2[3]]) / e2.sum(), atol=1e-6)
    # the score: normalised TTV plus normalised IGA over the image's current tokens
    sig.attention = torch.tensor([[0.2, 0.6, 0.2]])
    score = TransPrune().llm_scores(sig)[0]
    assert torch.allclose(score, normalised(got) + torch.tensor([0.2, 0.6, 0.2]), atol=1e-6)


# ---------------------------------------------------------------------------------------------- LLaVA, both positions
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_llava_keep_k_equals_the_layer_loop_and_generates_like_it(positions):
    fam = ZOO["llava"]
    model, proc = fam.model, fam.proc
    x = proc(images=[make_image(64, 48, seed=1)], text=image_prompt(proc, 1, "what color is the big shape ?"),
             return_tensors="pt")
    compact = positions == "compact"
    with torch.no_grad():
        tokprune.apply(model, "transprune", keep=2, positions=positions)
        out = model(**x).logits
        rec = tokprune.last_record(model)
        gen = model.generate(**x, **GEN)
        tokprune.remove(model)
        ids = x["input_ids"]
        feats = oracles.features(model, x["pixel_values"])
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        cuts = [(st.layer, st.keep) for st in api.schedule(model, "transprune", keep=2, n_visual=img.numel()).stages]
        scorer = TransPruneScorer(first_instruction=int(img.max()) + 1)
        ref, _, kept = llava_loop(model, oracles.embed(model, ids, feats), img, cuts, compact, scorer=scorer,
                                  observe=(0, 1, 2))
        masks = []
        for (c, _), kk in zip(cuts, kept):
            m = torch.ones(ids.shape[1], dtype=torch.bool)
            m[img] = False
            m[img[kk]] = True
            masks.append((c, m))
        seq = ids
        for _ in range(GEN["max_new_tokens"]):
            ext = [(c, torch.cat([m, torch.ones(seq.shape[1] - ids.shape[1], dtype=torch.bool)])) for c, m in masks]
            logits, _, _ = llava_loop(model, oracles.embed(model, seq, feats), img, ext, compact)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert [(st.layer, int(st.kept[0][0].numel())) for st in rec.stages] == [(1, 14), (2, 10), (3, 2)]
    assert all(torch.equal(a, st.kept[0][0]) for a, st in zip(kept, rec.stages))
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    assert torch.equal(gen, seq)


# ---------------------------------------------------------------------------------------------- every family
@torch.no_grad()
def expected_cut(fam, x, cuts, s, layer, acc, runs, survivors, specials, ks):
    """Per image: top-k of norm(TTV) + norm(IGA) among the surviving content tokens, from forward hooks and eager
    instruction rows of the unpatched model under the earlier cuts (masking oracle, original positions)."""
    model = fam.model
    layers = model.model.language_model.layers
    observed = [lay for lay in acc if lay < layer]
    rec = Recorder(layers, observed)
    try:
        with oracles.CutMask(model, cuts[:s]) if s else torch.no_grad():
            model(**x)
    finally:
        rec.close()
    n = x["input_ids"].shape[1]
    ttv = torch.zeros(n)
    for lay in observed:
        alive = torch.ones(n, dtype=torch.bool)
        for c, keep in cuts[:s]:
            if c <= lay:
                alive &= keep[0]
        for part in ("attn", "mlp"):
            xi, yi = rec.io[(lay, part)]
            ttv[alive] += ttv_reference(xi[alive], yi[alive])
    probs = oracles.eager_rows_under_cuts(model, x, cuts[:s], layer)[0]
    ids = x["input_ids"][0]
    instruction = torch.arange(n) > int((ids == fam.image_id).nonzero().max())
    iga = probs[:, instruction].mean(1).mean(0)
    out = []
    for run, alive, sp, k in zip(runs, survivors, specials, ks):
        content = alive[~sp[alive]]
        score = normalised(ttv[run][content]) + normalised(iga[run][content].float())
        out.append(torch.cat([content[topk_sorted(score, k)], alive[sp[alive]]]).sort().values)
    return out


@pytest.mark.parametrize("family", families())
def test_each_cut_keeps_the_top_ttv_plus_instruction_attention(family):
    fam = ZOO[family]
    x = inputs(fam)
    k = 2  # small enough that the earlier cuts drop tokens too
    with torch.no_grad():
        tokprune.apply(fam.model, "transprune", keep=k, positions="original")
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **FGEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        cuts = _cuts(fam, x, rec)
        with oracles.CutMask(fam.model, cuts):
            ref = fam.model(**x).logits
            ref_gen = fam.model.generate(**x, **FGEN)
    acc = TransPrune().accumulated(api.model_info(fam.model))
    runs = image_runs(fam, x["input_ids"], rec.n_visual[0])
    survivors = [torch.arange(n) for n in rec.n_visual[0]]
    for s, st in enumerate(rec.stages):
        ks = [TransPrune().stage_budget(s, int((~sp).sum()), k) for sp in rec.special[0]]
        exp = expected_cut(fam, x, cuts, s, st.layer, acc, runs, survivors, rec.special[0], ks)
        assert all(torch.equal(a, b) for a, b in zip(st.kept[0], exp)), (s, st.kept[0], exp)
        survivors = st.kept[0]
    assert (out[0] - ref[0, cuts[-1][1][0]]).abs().max() <= 1e-5
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next"])
def test_static_cache_matches_dynamic(family):
    fam = ZOO[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "transprune", keep=3):
        dyn = fam.model.generate(**x, **FGEN)
        sta = fam.model.generate(**x, cache_implementation="static", **FGEN)
    assert_same_generation(dyn, sta)


def test_flops_ratio_applies_to_a_model_and_the_record_averages_layers():
    fam = ZOO["qwen2_5_vl"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "transprune", flops_ratio=0.5):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    assert [st.layer for st in rec.stages] == [1, 2, 3]
    n = rec.n_visual[0][0]
    counts = [int(st.kept[0][0].numel()) for st in rec.stages]
    assert rec.layer_average()[0][0] == pytest.approx((n + sum(counts)) / 4)


def test_eval_runs_flops_ratio_cells_for_the_methods_that_take_them(tmp_path):
    """``tokprune eval --flops-ratio`` on the offline reference model: cells for pdrop and transprune, none for the
    baselines that take no flops_ratio budget."""
    import json

    from tokprune.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--model", "llava-shapes", "--methods", "pdrop,transprune", "--flops-ratio", "0.5",
                 "--tasks", "shapes", "--limit", "4", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["options"], r.get("error")) for r in rows] == [
        ("unpruned", {}, None), ("pdrop", {"flops_ratio": 0.5}, None), ("transprune", {"flops_ratio": 0.5}, None)]


class _Known(torch.nn.Module):
    """Stands in for a decoder module: y = fn(x) per token (attention modules return (y, None))."""

    def __init__(self, fn, attn: bool) -> None:
        super().__init__()
        self.fn, self.attn = fn, attn

    def forward(self, hidden_states, *args, **kwargs):
        y = self.fn(hidden_states)
        return (y, None) if self.attn else y


def test_ttv_through_the_hooks_on_modules_of_known_magnitude_and_direction():
    """Layer 0's attention scales token j by j + 1 (magnitude j + 1, 1 - cos = 0) and its FFN flips every other
    token (magnitude 1, 1 - cos = 2 or 0): TTV_j = (j + 1) / n + e^{d_j} / sum e^d, read through the forward hooks of
    the observed modules; with alpha = 1 the cut before layer 1 ranks by it alone."""
    fam = ZOO["llava"]
    model, proc = fam.model, fam.proc
    x = proc(images=[make_image(64, 48, seed=2)], text=image_prompt(proc, 1, "what is it ?"), return_tensors="pt")
    n = x["input_ids"].shape[1]
    scale = (torch.arange(n) + 1.0)[None, :, None]
    sign = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0)[None, :, None]
    layer = model.model.language_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    layer.self_attn, layer.mlp = _Known(lambda h: h * scale, True), _Known(lambda h: h * sign, False)
    try:
        with torch.no_grad(), tokprune.pruned(model, TransPrune(layers=(1,), ratios=(0.25,), accumulate_layers=(0,),
                                                                 alpha=1.0), record_scores=True):
            model(**x, use_cache=False)
            rec = tokprune.last_record(model)
    finally:
        layer.self_attn, layer.mlp = attn, mlp
    d = torch.where(torch.arange(n) % 2 == 0, 2.0, 0.0)
    ttv = (torch.arange(n) + 1.0) / n + d.exp() / d.exp().sum()
    img = oracles.image_positions(x["input_ids"][0], model.config.image_token_id)
    expect = ttv[img] / (ttv[img].sum() + 1e-8)
    assert torch.allclose(rec.stages[0].scores[0][0], expect, atol=1e-5)
    assert torch.equal(rec.stages[0].kept[0][0], topk_sorted(expect, int(img.numel()) // 4))
