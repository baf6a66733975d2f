"""VFlowOpt (``vflowopt``): hand-made hubs (an empty hub set included), recycling cells and weights, entropy on
0-255 pixels, the layer-average budget solver and the tuner's search space; on the tiny models every stage's
selection and the outputs against independent references (tests/oracles.py: eager maps, loop recycling, the
layer-by-layer LLaVA loop of tests/progressive_ref.py, the multi-cut masking oracle), generate, batch, static
cache, sdpa == eager. The family matrix (tests/test_families.py, tests/test_llava.py) runs it too."""

from __future__ import annotations

import random

import pytest
import torch
from progressive_ref import llava_loop
from test_families import GEN as FGEN
from test_families import ZOO, assert_same_generation, inputs, keep_mask, kept_tokens_reference

import oracles
import tokprune
import tokprune.api as api
from tokprune import flops
from tokprune.configs import load
from tokprune.patches.vision_stage import chosen_rows
from tokprune.pruners.base import Signal, VisionSignals
from tokprune.pruners.vflowopt import Hubs, VFlowOpt
from tokprune.rules import vflowopt as rules
from tokprune.testing import families, image_prompt, make_image, tiny_model

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
#: the tiny random encoders attend almost uniformly: thresholds just above their mean find a few hubs per image
#: (the released t = 34.76 finds none there: the fallback, which the family matrix runs)
HUB_T = {"llava": 1.05, "llava_next": 1.01, "qwen2_vl": 1.002, "qwen2_5_vl": 1.002, "qwen3_vl": 1.002}
OPTS = dict(cell=2.0, r2=0.6, r3=0.5)


def opts(family: str) -> dict:
    return {**OPTS, "t": HUB_T[family]}


def n_hubs(model, x, t: float) -> list[int]:
    """Hubs per encoder attention call of the feature layer (eager maps), to show a test runs real hub rows."""
    out = []
    for a in oracles.vision_attention(model, x, oracles._feature_layer(model)):
        r = a.float().mean(1).mean(1)
        out += (r > t * r.mean(-1, keepdim=True)).sum(-1).tolist()
    return out
QWEN = [f for f in families() if f.startswith("qwen")]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for fam in ZOO.built.values():
        tokprune.remove(fam.model)


# ---------------------------------------------------------------------------------------------- hand-made inputs
def test_hub_rows_from_a_bool_mask_and_nan_without_hubs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    dense = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)  # (B, H, 5, 5)
    chosen = torch.zeros(2, 5, dtype=torch.bool)
    chosen[0, [1, 3]] = True  # sequence 0: two hubs; sequence 1: none
    got = chosen_rows(chosen, q, k, None, 0.5)
    torch.testing.assert_close(got[0], dense[0][:, [1, 3]].mean(1))
    assert torch.isnan(got[1]).all()
    # the hub rule: received > t * mean (mean of a received row is 1 / n)
    rec = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.2] * 5])
    assert Hubs(1.5)(rec).tolist() == [[False, True, False, False, False], [False] * 5]
    assert Hubs(0.0)(rec).all()  # t = 0: every token is a hub (c = the received attention's own rows)


def test_empty_hub_set_falls_back_to_received_attention_in_the_model():
    """The released t finds no hub among the tiny encoder's 17 tokens: the importance is the received attention."""
    fam = ZOO["llava"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep=6, record_scores=True):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    assert not any(n_hubs(fam.model, x, rules.RELEASED_25["t"]))
    want = oracles.received(fam.model, x, 1)
    for got, w in zip(rec.stages[0].scores[0], want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, w.float(), atol=1e-6, rtol=1e-5)


def _grid4():
    return torch.arange(16) // 4, torch.arange(16) % 4


def test_recycling_cells_weights_and_the_exact_count():
    # 4x4 grid, a = 2: cells (0,0) = {0,1,4,5}, (0,1) = {2,3,6,7}, (1,0) = {8,9,12,13}, (1,1) = {10,11,14,15}
    imp = torch.arange(1, 17, dtype=torch.float32)
    imp[[0, 1, 4, 5]] = torch.tensor([20.0, 19, 18, 17])
    rows, cols = _grid4()
    # keep 7: the 12 lowest go (16 - 12 + 3 cells = 7; 9, 10, 11 leave 10, 9, 8), one comes back per cell
    res = rules.recycle_to(imp, rows, cols, 7, 2.0)
    assert res.kept.tolist() == [0, 1, 4, 5] and res.reps.tolist() == [7, 13, 15]
    assert res.assign.tolist() == [-1, -1, 0, 0, -1, -1, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2]
    feats = torch.arange(16, dtype=torch.float32)[:, None]
    from tokprune.kernels import merge_tokens

    new = merge_tokens(feats, res.assign, res.weights, num_targets=3)
    assert new[0].item() == pytest.approx((3 * 2 + 4 * 3 + 7 * 6 + 8 * 7) / 22)  # sum I t / sum I
    # the same as the reference's loop at its own count (round(16 * 0.5) + int(16 / 4) = 12 dropped)
    ref = rules.recycle(imp, feats, rows, cols, keep_ratio=0.5, cell=2.0)
    assert ref.kept.tolist() == sorted(res.kept.tolist() + res.reps.tolist())
    torch.testing.assert_close(ref.features[[4, 5, 6]], new)
    # fewer slots than cells: all dropped, the 2 cells with the best representatives recycled, the others gone
    two = rules.recycle_to(imp, rows, cols, 2, 2.0)
    assert two.kept.tolist() == [] and two.reps.tolist() == [0, 15]
    assert (two.assign[[2, 3, 6, 7, 8, 9, 12, 13]] == -1).all()
    # negative importance (alpha < 0): weights clamped at 0, a cell summing to 0 merges with equal weights
    neg = rules.recycle_to(-imp, rows, cols, 7, 2.0)
    assert (neg.weights[neg.assign >= 0] == 1).all()


@pytest.mark.parametrize("seed", range(4))
def test_random_recycling_equals_the_loop_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    n_side = 6
    imp = torch.rand(n_side * n_side, generator=g)
    rows, cols = torch.arange(36) // n_side, torch.arange(36) % n_side
    group = (torch.arange(36) >= 18).long()
    a = [2.0, 2.5, 3.0, 4.0][seed]
    for keep in (13, 20, 30):  # at least one slot per cell (fewer: the hand-made test)
        res = rules.recycle_to(imp, rows, cols, keep, a, group)
        kept, groups = oracles.vflowopt_recycle(imp, rows.tolist(), cols.tolist(), keep, a, group.tolist())
        assert sorted(res.kept.tolist() + res.reps.tolist()) == kept
        assert res.kept.numel() + res.reps.numel() == keep
        assert [(int(r), (res.assign == m).nonzero()[:, 0].tolist()) for m, r in enumerate(res.reps)] == groups


def test_entropy_of_raw_0_255_token_pixels():
    px = torch.zeros(3, 3, 196)
    px[1, :, 98:] = 255.0  # half black, half white: 1 bit
    px[2] = torch.tensor([0.0, 80.0, 160.0, 255.0]).repeat_interleave(49)  # 4 equal levels: 2 bits
    torch.testing.assert_close(rules.token_entropy(px), torch.tensor([0.0, 1.0, 2.0]), atol=1e-6, rtol=0)
    img = torch.zeros(1, 3, 14, 28)
    img[..., 7:, 14:] = 255.0
    patches = img.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5).reshape(2, 3, 196)
    torch.testing.assert_close(rules.token_entropy(patches), rules.patch_entropy(img)[0])


def test_entropy_takes_each_channel_to_its_integer_level_first():
    """The reference casts each channel to uint8 before the grey sum: un-normalised pixels a fraction of a level
    off their integers (float error, bf16 pixel_values) have the entropy of the integer image. Half the patch is
    (10, 10, 11) -> grey 10, half (10, 10, 12) -> grey 11: 1 bit; summing the unrounded (10.3, 10.3, 11.3) first
    would give grey 11 everywhere, 0 bits."""
    px = torch.empty(1, 3, 196)
    px[0, :, :98] = torch.tensor([10.3, 10.3, 11.3])[:, None]
    px[0, :, 98:] = torch.tensor([10.0, 10.0, 12.0])[:, None]
    torch.testing.assert_close(rules.token_entropy(px), torch.tensor([1.0]), atol=1e-6, rtol=0)
    img = torch.empty(1, 3, 14, 14)
    img[..., :7, :] = torch.tensor([10.3, 10.3, 11.3]).view(1, 3, 1, 1)
    img[..., 7:, :] = torch.tensor([9.8, 10.2, 12.4]).view(1, 3, 1, 1)
    torch.testing.assert_close(rules.patch_entropy(img), torch.tensor([[1.0]]), atol=1e-6, rtol=0)
    assert rules.pixel_levels(torch.tensor([-3.0, 0.4, 254.6, 300.0])).tolist() == [0.0, 0.0, 255.0, 255.0]


def test_entropy_softmax_runs_per_encoder_tile():
    """The reference's softmax(H) runs over each crop's patches (LLaVA-NeXT: base tile and each high-res tile on
    its own): entropies (1, 1, 2, 2) on tiles (0, 0, 1, 1) give 1/2 each, not e/(2e + 2e^2) and e^2/(2e + 2e^2)."""
    c = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    h = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    got = rules.importance_map(c, h, 0.5, groups=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(got, c + 0.25)
    one = rules.importance_map(c, h, 0.5)  # one group: the whole row
    torch.testing.assert_close(one, c + 0.5 * h.softmax(-1))
    # the pruner hands each part's tile ids: a two-tile part scored with alpha = 1 and no hub (t = 1e9)
    from types import SimpleNamespace

    pr = VFlowOpt(t=1e9, alpha=1.0, cell=2.0)
    received, hubs = Signal("received", 0), Signal("rows", 0, queries=Hubs(pr.t))
    px = torch.zeros(4, 3, 196)
    px[2:, :, 98:] = 1.0  # un-normalised [0, 1] pixels; tokens 2, 3: half black, half white (1 bit); 0, 1: 0 bits
    grid = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]])
    sig = VisionSignals(features=[torch.zeros(4, 2)], grid=[grid], special=[torch.zeros(4, dtype=torch.bool)],
                        values={received: [c[0]], hubs: [torch.full((4,), float("nan"))],
                                Signal("pixels"): [px]},
                        ctx=SimpleNamespace(info=SimpleNamespace(feature_layer=0, vision_layers=1), state={}))
    torch.testing.assert_close(pr.vision_scores(sig)[0], c[0] + 0.5)


def test_signed_merge_weights_are_the_reference_formula():
    """``merge_weights="signed"``: the reference's ``sum I t / sum I`` with the signed importance (alpha < 0 can
    make it negative); the default clamps at 0. Cell (0, 0) of the 4x4 grid drops tokens 2, 3, 6, 7 with
    importance (-1, 3, 2, 4): signed (-1*2 + 3*3 + 2*6 + 4*7) / 8 = 47 / 8, clamped (9 + 12 + 28) / 9 = 49 / 9."""
    from tokprune.kernels import merge_tokens

    imp = torch.arange(1, 17, dtype=torch.float32)
    imp[[0, 1, 4, 5]] = torch.tensor([20.0, 19, 18, 17])
    imp[[2, 3, 6, 7]] = torch.tensor([-1.0, 3, 2, 4])
    rows, cols = _grid4()
    feats = torch.arange(16, dtype=torch.float32)[:, None]
    signed = rules.recycle_to(imp, rows, cols, 7, 2.0, weights="signed")
    clamped = rules.recycle_to(imp, rows, cols, 7, 2.0)
    assert signed.reps.tolist() == clamped.reps.tolist() == [7, 13, 15]
    assert merge_tokens(feats, signed.assign, signed.weights, num_targets=3)[0].item() == pytest.approx(47 / 8)
    assert merge_tokens(feats, clamped.assign, clamped.weights, num_targets=3)[0].item() == pytest.approx(49 / 9)
    ref = rules.recycle(imp, feats, rows, cols, keep_ratio=0.5, cell=2.0)  # the reference's loop, signed
    torch.testing.assert_close(ref.features[ref.kept.tolist().index(7)], torch.tensor([47 / 8]))
    with pytest.raises(ValueError, match="merge_weights must be 'clamped'"):
        VFlowOpt(merge_weights="raw")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_entropy_term_reads_raw_pixels_from_the_processor_mean_and_std(family):
    """With alpha != 0 the importance adds softmax(entropy) of the raw 0..255 pixels: the oracle's un-normalised
    pixels are the processor's own un-normalised ones, and the recorded importance equals the oracle's."""
    fam = ZOO[family]
    x = inputs(fam)
    raw = fam.proc(images=[make_image(112, 84, seed=0), make_image(168, 84, seed=1)], text=image_prompt(fam.proc, 2),
                   return_tensors="pt", do_normalize=False)
    got_px = oracles.raw_token_pixels(fam.model, x)  # un-normalised from the normalised pixel_values
    if fam.qwen:  # Qwen rows are (C, T, p, p) flattened: compare with the processor's [0, 1] values x 255
        pv = raw["pixel_values"].reshape(raw["pixel_values"].shape[0], 3, -1)
        want_px = list(torch.split(255 * pv.unflatten(0, (-1, 4)).permute(0, 2, 1, 3).flatten(2),
                                   (raw["image_grid_thw"].prod(-1) // 4).tolist()))
    else:
        p = fam.model.config.vision_config.patch_size
        pv = raw["pixel_values"]
        want_px = list(255 * pv.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(1, 2).flatten(-2))
    for a, b in zip(got_px, want_px):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    t = HUB_T[family]
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep=6, alpha=0.7, t=t, record_scores=True):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    want = oracles.vflowopt_importance(fam.model, x, t, alpha=0.7)
    plain = oracles.vflowopt_importance(fam.model, x, t)
    for got, w, p0 in zip(rec.stages[0].scores[0], want, plain):
        torch.testing.assert_close(got, w.float(), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, p0.float(), atol=1e-5)  # the entropy term is really there


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("config", ["llava-1.5-7b", "qwen2.5-vl-7b"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
def test_keep_ratio_is_the_layer_average_within_a_token(config, ratio):
    s = api.schedule(config, "vflowopt", keep_ratio=ratio)
    depth = api.model_info(config).llm_layers
    spans = (depth // 3, depth // 3, depth - 2 * (depth // 3))
    assert [st.layer for st in s.stages[1:]] == [depth // 3, 2 * (depth // 3)]  # 10 / 20 on 32, 9 / 18 on 28
    counts = tuple(st.keep for st in s.stages)
    avg = sum(c * sp for c, sp in zip(counts, spans)) / depth
    assert abs(avg - ratio * s.n_visual) <= 1.0 and s.meaning == "layer_average"
    r2, r3 = rules.RELEASED_25["ratios"][1:]
    assert counts == oracles.vflowopt_counts(s.n_visual, round(ratio * s.n_visual), r2, r3, spans)


def test_released_configuration_and_explicit_ratios():
    cfg = "qwen2.5-vl-7b"  # 28 layers: the released spans 9 / 9 / 10
    solved = api.schedule(cfg, "vflowopt")  # default: 25 % on layer average, R1 solved from the released R2, R3
    assert [st.keep for st in solved.stages] == [152, 149, 131]  # R1 = 0.264 (released 0.2651)
    explicit = api.schedule(cfg, "vflowopt", ratios=rules.RELEASED_25["ratios"])
    n = explicit.n_visual
    k1 = n - round(n * (1 - 0.2651))
    k2 = k1 - round(k1 * (1 - 0.9833))
    assert [st.keep for st in explicit.stages] == [k1, k2, k2 - round(k2 * (1 - 0.8773))]
    assert api.schedule(cfg, "vflowopt", ratios=rules.RELEASED_25["ratios"], keep_ratio=0.25) == explicit
    with pytest.raises(ValueError, match="pass ratios= without keep"):
        api.schedule(cfg, "vflowopt", ratios=rules.RELEASED_25["ratios"], keep_ratio=0.5)
    assert api.schedule(cfg, "vflowopt", keep_ratio=1.0).plan() == [(0, n), (9, n), (18, n)]
    assert api.schedule(cfg, "vflowopt", layers=(4, 20), keep_ratio=0.25).plan()[1][0] == 4


def test_record_layer_average_meets_the_budget_on_a_model():
    fam = ZOO["qwen2_5_vl"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep_ratio=0.4, **opts("qwen2_5_vl")):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    for n, avg in zip(rec.n_visual[0], rec.layer_average()[0]):
        assert abs(avg - 0.4 * n) <= 1.0


@pytest.mark.parametrize("target", [0.2, 0.35])
def test_flops_ratio_is_solved_within_one_percent(target):
    s = api.schedule("llava-1.5-7b", "vflowopt", flops_ratio=target)
    got = flops.for_budget(load("llava-1.5-7b"), schedule=s, convention="3ndm").ratio(part="llm_prefill")
    assert abs(got / target - 1) <= 0.01


def test_search_space_is_the_tuner_contract():
    space = VFlowOpt.search_space
    options = {f for f in VFlowOpt.__dataclass_fields__}
    assert set(space) <= options and set(space) == {"t", "alpha", "cell", "r2", "r3"}
    rng = random.Random(0)
    for kind, low, high in space.values():
        assert kind in ("float", "int", "log") and low < high
    for _ in range(5):  # any point meets the layer-averaged target (the tuner's constraint)
        point = {k: rng.uniform(lo, hi) for k, (_, lo, hi) in space.items()}
        s = api.schedule("qwen2.5-vl-7b", "vflowopt", keep_ratio=0.25, **point)
        avg = sum(st.keep * sp for st, sp in zip(s.stages, (9, 9, 10))) / 28
        assert abs(avg - 0.25 * s.n_visual) <= 1.0
    fam = ZOO["llava"]
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep_ratio=0.25, **point):
        fam.model(**inputs(fam))
        assert abs(tokprune.last_record(fam.model).layer_average()[0][0] - 4) <= 1.0


def test_bad_options_raise_naming_the_fix():
    for bad, match in [(dict(t=-1), "t must be"), (dict(cell=0.5), "cell must be"), (dict(r2=1.5), "r2 must be"),
                       (dict(ratios=(0.5, 0.5)), "three kept fractions"),
                       (dict(ratios=(0.5, 1, 1), r2=0.5), "not both"),
                       (dict(layers=(3,)), "two 0-based decoder layers"),
                       (dict(ratios=(0.5, 1, 1), flops_ratio=0.3), "without ratios"), (dict(alpha="x"), "alpha")]:
        with pytest.raises((ValueError, TypeError), match=match):
            VFlowOpt(**bad)
    fam = ZOO["llava"]
    with pytest.raises(ValueError, match="out of range"):
        tokprune.apply(fam.model, "vflowopt", keep=4, vision_layer=9)
    with pytest.raises(ValueError, match="out of range"):
        tokprune.apply(fam.model, "vflowopt", keep=4, layers=(2, 7))
    with pytest.raises(ValueError, match="strictly increasing"):
        tokprune.apply(fam.model, "vflowopt", keep=4, layers=(2, 2))
    assert not tokprune.is_patched(fam.model)


# ---------------------------------------------------------------------------------------------- the models
def _expected(imp: torch.Tensor, rows, cols, counts, cell: float):
    """Per image: (stage-1 slots, groups, cut-1 kept, cut-2 kept) from the oracle's importance."""
    kept, groups = oracles.vflowopt_recycle(imp, rows, cols, counts[0], cell)
    kept = torch.tensor(kept)
    cut1 = kept[oracles.topk_sorted(imp[kept], counts[1])]
    cut2 = cut1[oracles.topk_sorted(imp[cut1], counts[2])]
    return kept, groups, cut1, cut2


def _counts(model, n: int, keep: int) -> tuple[int, int, int]:
    depth = api.model_info(model).llm_layers
    spans = (depth // 3, depth // 3, depth - 2 * (depth // 3))
    return oracles.vflowopt_counts(n, keep, OPTS["r2"], OPTS["r3"], spans)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_llava_every_stage_equals_the_layer_loop_and_generates_like_it(positions):
    """LLaVA-1.5: the vision stage's cells and weights, both LLM cuts (vision importance of the survivors) and the
    logits / greedy ids equal the decoder run layer by layer (tests/progressive_ref.py) on the recycled features,
    each stage's tokens removed from its layer on; original positions or re-indexed at every cut (options; the
    default, the reference's policy, is tested below)."""
    compact = positions == "compact"
    model, proc = ZOO["llava"].model, ZOO["llava"].proc
    x = proc(images=[make_image(64, 48, seed=1)], text=image_prompt(proc, 1, "what color is the big shape ?"),
             return_tensors="pt")
    keep = 5
    with torch.no_grad():
        tokprune.apply(model, "vflowopt", keep=keep, positions=positions, **opts("llava"))
        out = model(**x).logits
        rec = tokprune.last_record(model)
        gen = model.generate(**x, **GEN)
        tokprune.remove(model)
        ids = x["input_ids"]
        feats = oracles.features(model, x["pixel_values"])
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        imp = oracles.vflowopt_importance(model, x, HUB_T["llava"])[0]
        assert all(n_hubs(model, x, HUB_T["llava"]))
        counts = _counts(model, img.numel(), keep)
        idx = torch.arange(img.numel())
        kept, groups, cut1, cut2 = _expected(imp, (idx // 4).tolist(), (idx % 4).tolist(), counts, OPTS["cell"])
        assert len(groups) > 1 and counts[0] > counts[1] > counts[2]  # several cells; every cut drops tokens
        merged = oracles.vflowopt_merge(feats[0], groups, imp)
        masks = []
        for layer, k in [(0, kept), (1, cut1), (2, cut2)]:
            m = torch.ones(ids.shape[1], dtype=torch.bool)
            m[img] = False
            m[img[k]] = True
            masks.append((layer, m))
        ref, _, _ = llava_loop(model, oracles.embed(model, ids, [merged]), img, masks, compact=compact)
        seq = ids
        for _ in range(GEN["max_new_tokens"]):
            ext = [(c, torch.cat([m, torch.ones(seq.shape[1] - ids.shape[1], dtype=torch.bool)])) for c, m in masks]
            logits, _, _ = llava_loop(model, oracles.embed(model, seq, [merged]), img, ext, compact=compact)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert [st.kept[0][0].tolist() for st in rec.stages] == [kept.tolist(), cut1.tolist(), cut2.tolist()]
    assert [(int(s), src.tolist()) for s, src in zip(rec.merged[0][0].slots, rec.merged[0][0].sources)] == groups
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    assert torch.equal(gen, seq)


def test_llava_default_positions_are_the_reference_policy_over_prefill_and_decode():
    """The reference's positions (sihany077/VFlowOpt): the pre-LLM cut shortens the sequence, which the LLM numbers
    0..L1-1; the two LLM cuts keep those ids; decode goes on at L1 + t. An independent loop applies that policy: the
    stage-1 survivors (recycled features) as a new, shorter prompt, run layer by layer with each LLM cut's tokens
    removed and positions = slots of that shorter prompt, the generated tokens appended. Logits of the prefill and
    of every decode step match the default patched model (KV cache), and 'original' does not (the test can fail)."""
    model, proc = ZOO["llava"].model, ZOO["llava"].proc
    x = proc(images=[make_image(64, 48, seed=3)], text=image_prompt(proc, 1, "what shape is on the left ?"),
             return_tensors="pt")
    keep, steps = 5, 5
    gen_kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        tokprune.apply(model, "vflowopt", keep=keep, **opts("llava"))
        out = model(**x).logits
        got = model.generate(**x, **gen_kw)
        tokprune.apply(model, "vflowopt", keep=keep, positions="original", **opts("llava"))
        other = model.generate(**x, **gen_kw)
        tokprune.remove(model)
        ids = x["input_ids"]
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        imp = oracles.vflowopt_importance(model, x, HUB_T["llava"])[0]
        counts = _counts(model, img.numel(), keep)
        idx = torch.arange(img.numel())
        kept, groups, cut1, cut2 = _expected(imp, (idx // 4).tolist(), (idx % 4).tolist(), counts, OPTS["cell"])
        merged = oracles.vflowopt_merge(oracles.features(model, x["pixel_values"])[0], groups, imp)
        stage1 = torch.ones(ids.shape[1], dtype=torch.bool)
        stage1[img] = False
        stage1[img[kept]] = True
        emb = oracles.embed(model, ids, [merged])[:, stage1]  # the shorter prompt the reference's LLM receives
        img1 = torch.arange(ids.shape[1])[stage1]
        img1 = torch.isin(img1, img).nonzero()[:, 0]  # image slots of the shorter prompt
        depth = api.model_info(model).llm_layers
        cuts = []
        for layer, k in [(depth // 3, cut1), (2 * (depth // 3), cut2)]:
            m = torch.ones(emb.shape[1], dtype=torch.bool)
            m[img1] = False
            m[img1[torch.isin(kept, k)]] = True
            cuts.append((layer, m))
        ref0, _, _ = llava_loop(model, emb, img1, cuts, compact=False)  # positions: slots of the shorter prompt
        embed = model.model.get_input_embeddings()
        seq_emb, toks, step_logits = emb, [], []
        for _ in range(steps):
            ext = [(c, torch.cat([m, torch.ones(seq_emb.shape[1] - emb.shape[1], dtype=torch.bool)])) for c, m in cuts]
            logits, _, _ = llava_loop(model, seq_emb, img1, ext, compact=False)
            step_logits.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            seq_emb = torch.cat([seq_emb, embed(nxt)], 1)
    assert out.shape == ref0.shape and (out - ref0).abs().max() <= 1e-5
    assert torch.equal(got.sequences[:, ids.shape[1]:], torch.cat(toks, 1))
    diffs = [float((g - r).abs().max()) for g, r in zip(got.logits, step_logits)]
    assert len(diffs) == steps and max(diffs) <= 1e-5, diffs
    # the other policy decodes at n0 + t with gaps: its logits differ from the reference's (the check can fail)
    assert max(float((g - r).abs().max()) for g, r in zip(other.logits, step_logits)) > 1e-3


def _qwen_grid(x, j: int) -> tuple[list[int], list[int]]:
    t, h, w = x["image_grid_thw"][j].tolist()
    i = torch.arange(t * (h // 2) * (w // 2))
    return (i // (w // 2) % (h // 2)).tolist(), (i % (w // 2)).tolist()


@pytest.mark.parametrize("family", QWEN)
def test_qwen_every_stage_equals_the_oracle_and_generates_like_it(family):
    """Two images of different sizes: per image the merged-grid cells, the LLM cuts and the outputs equal the
    unpatched model fed the recycled tokens with each cut hidden from its layer on (M-RoPE positions kept)."""
    fam = ZOO[family]
    x = inputs(fam)
    keep = 4
    with torch.no_grad():
        tokprune.apply(fam.model, "vflowopt", keep=keep, **opts(family))
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **FGEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        imps = oracles.vflowopt_importance(fam.model, x, HUB_T[family])
        assert any(n_hubs(fam.model, x, HUB_T[family]))  # real hub rows (a call without hubs: the fallback)
        expected = [_expected(imp, *_qwen_grid(x, j), _counts(fam.model, imp.numel(), keep), OPTS["cell"])
                    for j, imp in enumerate(imps)]
        for s, st in enumerate(rec.stages):
            assert [k.tolist() for k in st.kept[0]] == [e[0 if s == 0 else s + 1].tolist() for e in expected]
        for j, e in enumerate(expected):
            assert [(int(s), src.tolist()) for s, src in zip(rec.merged[0][j].slots, rec.merged[0][j].sources)] == e[1]
        fed = [e[0] for e in expected]
        ids = x["input_ids"]
        prompt_keep = keep_mask(fam, ids, rec.n_visual[0], fed)
        cuts = [(st.layer, keep_mask(fam, ids, rec.n_visual[0], st.kept[0])[prompt_keep][None])
                for st in rec.stages[1:]]

        def replace(j, full, got):
            return oracles.vflowopt_merge(full, expected[j][1], imps[j])[fed[j]]

        with oracles.CutMask(fam.model, cuts):
            ref = kept_tokens_reference(fam, x, fed, replace=replace)
            ref_gen = kept_tokens_reference(fam, x, fed, generate=True, replace=replace)
    assert (out[0] - ref[0, cuts[-1][1][0]]).abs().max() <= 1e-5
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batch_with_padding_and_different_counts_equals_single_runs(family):
    fam = ZOO[family]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(112, 84), (56, 84), (84, 112)])]
    texts = [image_prompt(fam.proc, 2, "compare the first and second picture ?"), image_prompt(fam.proc, 1, "what ?")]
    batch = fam.proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep_ratio=0.4, **opts(family)):
        gen = fam.model.generate(**batch, **FGEN)
        rec = tokprune.last_record(fam.model)
        singles = [fam.model.generate(**fam.proc(images=ims, text=t, return_tensors="pt"), **FGEN)
                   for t, ims in zip(texts, (images[:2], images[2:]))]
    if fam.qwen:
        assert len({k for row in rec.n_kept for k in row}) > 1  # different kept counts in one batch
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -FGEN["max_new_tokens"]:], g.sequences[0, -FGEN["max_new_tokens"]:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next"])
def test_static_cache_matches_dynamic(family):
    fam = ZOO[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "vflowopt", keep=4, **opts(family)):
        dyn = fam.model.generate(**x, **FGEN)
        sta = fam.model.generate(**x, cache_implementation="static", **FGEN)
    assert_same_generation(dyn, sta)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sdpa_and_eager_select_the_same_tokens(family):
    kept = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny_model(family, attn=attn)
        fam = type(ZOO[family])(family, model, proc)
        with torch.no_grad(), tokprune.pruned(model, "vflowopt", keep=4, **opts(family)):
            model(**inputs(fam))
            kept.append([st.kept[0] for st in tokprune.last_record(model).stages])
    assert all(torch.equal(a, b) for sa, sb in zip(*kept) for a, b in zip(sa, sb))


@pytest.mark.parametrize("tile_budget", ["per_tile", "global"])
def test_llava_next_budgets_newlines_and_the_schedule_reference(tile_budget):
    """LLaVA-NeXT: the layer-averaged budget counts content tokens, newlines ride on top at every stage, and the
    logits equal the unpatched model fed the recycled tokens (weights from eager maps) under the cut masks;
    ``tile_budget="global"`` is the reference's one budget over the image (base and stitched crops as two grids)."""
    from test_families import schedule_reference

    fam = ZOO["llava_next"]
    x = inputs(fam)
    with torch.no_grad():
        tokprune.apply(fam.model, "vflowopt", keep=5, tile_budget=tile_budget, cell=2.0, r2=0.6, r3=0.5,
                       positions="original")  # the oracle feeds original positions
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref, final = schedule_reference(fam, x, rec)
    assert rec.merged is not None
    for j, sp in enumerate(rec.special[0]):
        n = int((~sp).sum())
        plan = api.schedule(fam.model, "vflowopt", keep=5, n_visual=n, cell=2.0, r2=0.6, r3=0.5)
        for st, want in zip(rec.stages, plan.stages):
            kept = st.kept[0][j]
            assert int((~sp[kept]).sum()) == want.keep and sp[kept].sum() == sp.sum()  # newlines all kept
    assert (out[0] - ref[0, final]).abs().max() <= 1e-5
