"""PyramidDrop (``pdrop``): schedules and FLOPs, the selection of every cut against independent references (the
next layer's attention rows by hand on LLaVA at both position modes, eager maps under the multi-cut oracle on every
family), generate with cache, static cache, explicit schedules and ``flops_ratio`` budgets. The family matrix
(tests/test_families.py, tests/test_llava.py) runs it too: keep-all, keep-k against the multi-cut oracle, padded
batches with different kept counts."""

from __future__ import annotations

import math

import pytest
import torch
from progressive_ref import llava_loop, pdrop_scorer
from test_families import GEN as FGEN
from test_families import ZOO, assert_same_generation, image_runs, inputs
from test_seams import _cuts, _expected

import oracles
import tokprune
import tokprune.api as api
from tokprune import flops
from tokprune.configs import load
from tokprune.pruners.pdrop import PyramidDrop
from tokprune.testing import families, image_prompt, make_image

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
LLAVA7B = "llava-1.5-7b"


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for fam in ZOO.built.values():
        tokprune.remove(fam.model)


def llava_inputs(proc, question="what is in the image ?"):
    return proc(images=[make_image(64, 48, seed=0)], text=image_prompt(proc, 1, question), return_tensors="pt")


# ---------------------------------------------------------------------------------------------- schedules, FLOPs
def test_default_schedule_on_llava_7b_costs_1_78_tflops():
    s = api.schedule(LLAVA7B, "pdrop", keep_ratio=0.125)
    assert [(st.kind, st.layer, st.keep) for st in s.stages] == [("llm", 8, 288), ("llm", 16, 144), ("llm", 24, 72)]
    report = flops.for_budget(load(LLAVA7B), schedule=s, convention="3ndm")
    assert round(report.tflops, 2) == 1.78
    assert api.schedule(LLAVA7B, "pdrop") == s  # no budget: the paper's ratios
    assert api.schedule(LLAVA7B, "pdrop", schedule={8: 0.5, 16: 0.25, 24: 0.125}) == s


def test_keep_ratio_gives_geometric_stages_and_layers_scale_with_depth():
    s = api.schedule(LLAVA7B, "pdrop", keep_ratio=0.216)  # int(N r^(i/3)) of the ratio itself (the reference's int)
    r = 0.216
    assert [st.keep for st in s.stages] == [math.floor(576 * r ** (1 / 3)), math.floor(576 * r ** (2 / 3)), 124]
    assert [st.keep for st in api.schedule(LLAVA7B, "pdrop", keep=124).stages] == [  # a count: r = keep / N
        math.floor(576 * (124 / 576) ** (1 / 3)), math.floor(576 * (124 / 576) ** (2 / 3)), 124]
    assert [st.layer for st in api.schedule("qwen2.5-vl-7b", "pdrop", keep_ratio=0.125).stages] == [7, 14, 21]
    assert [st.layer for st in api.schedule("qwen2.5-vl-3b", "pdrop", keep_ratio=0.125).stages] == [9, 18, 27]
    assert [(st.layer, st.keep) for st in api.schedule(ZOO["llava"].model, "pdrop", keep=2, n_visual=16).stages] == [
        (1, 8), (2, 4), (3, 2)]
    custom = api.schedule(LLAVA7B, "pdrop", schedule={4: 0.75, 20: 0.2})
    assert [(st.layer, st.keep) for st in custom.stages] == [(4, 432), (20, 115)]


def test_options_are_validated():
    with pytest.raises(ValueError, match="non-increasing"):
        PyramidDrop(ratios=(0.25, 0.5, 0.1))
    with pytest.raises(ValueError, match="2 ratios for 3 cut layers"):
        PyramidDrop(ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match="out of range"):
        api.schedule(ZOO["llava"].model, "pdrop", keep=2, n_visual=16, layers=(1, 2, 9))
    with pytest.raises(ValueError, match="flops_ratio or keep"):
        api.schedule(LLAVA7B, "pdrop", keep=8, flops_ratio=0.5)


@pytest.mark.parametrize("target", [0.3, 0.4656, 0.7])
def test_flops_ratio_is_solved_within_one_percent(target):
    s = api.schedule(LLAVA7B, "pdrop", flops_ratio=target)
    got = flops.for_budget(load(LLAVA7B), schedule=s, convention="3ndm").ratio(part="llm_prefill")
    assert abs(got / target - 1) <= 0.01


def test_flops_ratio_below_what_the_schedule_reaches_raises():
    with pytest.raises(ValueError, match="cannot be met within 1%"):
        api.schedule(LLAVA7B, "pdrop", flops_ratio=0.2)  # 8 of 32 layers always see every token


# ---------------------------------------------------------------------------------------------- LLaVA, both positions
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_llava_keep_k_equals_the_layer_loop_and_generates_like_it(positions):
    fam = ZOO["llava"]
    model, proc = fam.model, fam.proc
    x = llava_inputs(proc)
    compact = positions == "compact"
    with torch.no_grad():
        tokprune.apply(model, "pdrop", keep=3, positions=positions)
        out = model(**x).logits
        rec = tokprune.last_record(model)
        gen = model.generate(**x, **GEN)
        tokprune.remove(model)
        ids = x["input_ids"]
        feats = oracles.features(model, x["pixel_values"])
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        cuts = [(st.layer, st.keep) for st in api.schedule(model, "pdrop", keep=3, n_visual=img.numel()).stages]
        ref, _, kept = llava_loop(model, oracles.embed(model, ids, feats), img, cuts, compact, scorer=pdrop_scorer)
        masks = []
        for (c, _), kk in zip(cuts, kept):
            m = torch.ones(ids.shape[1], dtype=torch.bool)
            m[img] = False
            m[img[kk]] = True
            masks.append((c, m))
        seq = ids
        for _ in range(GEN["max_new_tokens"]):  # no cache: the whole sequence again, the prefill's cuts
            ext = [(c, torch.cat([m, torch.ones(seq.shape[1] - ids.shape[1], dtype=torch.bool)])) for c, m in masks]
            logits, _, _ = llava_loop(model, oracles.embed(model, seq, feats), img, ext, compact)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert [(st.kind, st.layer) for st in rec.stages] == [("llm", 1), ("llm", 2), ("llm", 3)]
    assert all(torch.equal(a, st.kept[0][0]) for a, st in zip(kept, rec.stages))
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    assert torch.equal(gen, seq)
    assert [int(st.kept[0][0].numel()) for st in rec.stages] == [9, 5, 3]  # 16 (3/16)^(1/3), 16 (3/16)^(2/3), 3
    assert rec.layer_average() == [[(16 + 9 + 5 + 3) / 4]]


# ---------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", families())
def test_each_cut_keeps_the_top_next_layer_rows_of_the_last_token(family):
    fam = ZOO[family]
    x = inputs(fam)
    k = 3
    with torch.no_grad():
        tokprune.apply(fam.model, "pdrop", keep=k, positions="original")
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **FGEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        cuts = _cuts(fam, x, rec)
        with oracles.CutMask(fam.model, cuts):
            ref = fam.model(**x).logits
            ref_gen = fam.model.generate(**x, **FGEN)
    runs = image_runs(fam, x["input_ids"], rec.n_visual[0])
    survivors = [torch.arange(n) for n in rec.n_visual[0]]
    for s, st in enumerate(rec.stages):
        ks = [PyramidDrop().stage_budget(s, int((~sp).sum()), k) for sp in rec.special[0]]
        att = oracles.eager_rows_under_cuts(fam.model, x, cuts[:s], st.layer)[0, :, -1].mean(0)
        assert all(torch.equal(a, b) for a, b in zip(st.kept[0], _expected(att, runs, survivors, rec.special[0], ks)))
        survivors = st.kept[0]
    assert (out[0] - ref[0, cuts[-1][1][0]]).abs().max() <= 1e-5
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next"])
def test_static_cache_matches_dynamic(family):
    fam = ZOO[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "pdrop", keep=3):
        dyn = fam.model.generate(**x, **FGEN)
        sta = fam.model.generate(**x, cache_implementation="static", **FGEN)
    assert_same_generation(dyn, sta)


def test_flops_ratio_and_schedule_budgets_apply_to_a_model():
    fam = ZOO["qwen2_5_vl"]
    x = inputs(fam)
    with torch.no_grad():
        tokprune.apply(fam.model, "pdrop", flops_ratio=0.6)
        assert fam.model.tokprune.pruner.flops_ratio == 0.6 and fam.model.tokprune.budget.keep_ratio is not None
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
        assert len(rec.stages) == 3
        tokprune.apply(fam.model, "pdrop", schedule={1: 0.5, 3: 0.25})
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    assert [st.layer for st in rec.stages] == [1, 3]
    assert [[int(k.numel()) for k in st.kept[0]] for st in rec.stages] == [
        [n // 2 for n in rec.n_visual[0]], [round(n / 4) for n in rec.n_visual[0]]]
