"""HiPrune end to end on every family: the kept set and the logits against a reference written from the reference
code's rule (Danielement321/HiPrune ``encode_images``) on eager attention maps of the tiny models."""

from __future__ import annotations

import pytest
import torch
from test_families import GEN, TOL, ZOO, assert_same_generation, inputs, kept_tokens_reference, next_tile_scores

import oracles
import tokprune
from tokprune.pruners.base import ModelInfo, Signal
from tokprune.pruners.hiprune import HiPrune
from tokprune.testing import families, tiny_model

#: (object layer, keep) per family: an object layer below the deep one (Qwen2.5-VL: a windowed block), one anchor
CASES = {"llava": (0, 10), "qwen2_vl": (0, 10), "qwen2_5_vl": (0, 10), "qwen3_vl": (0, 10)}
ALPHA = 0.5  # round(0.5 * 10 / 5) = 1 anchor


def reference_select(obj: torch.Tensor, deep: torch.Tensor, width: int, keep: int, alpha: float,
                     wrap_rows: bool = True) -> torch.Tensor:
    """The reference's selection, written as its code does it: anchors by topk, flat +-1 / +-W offsets clamped to
    the token range (``wrap_rows=False``: only true grid neighbours), chosen tokens' deep scores lowered by 1, the
    rest filled by topk of the deep scores, sorted."""
    n = obj.numel()
    n_anchor = round(keep * alpha / 5)
    anchors = obj.topk(n_anchor).indices
    if wrap_rows:
        buffers = torch.cat([anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    else:
        buffers = torch.tensor([j for a in anchors.tolist() for j, ok in (
            (a - 1, a % width > 0), (a + 1, a % width < width - 1 and a + 1 < n), (a - width, a - width >= 0),
            (a + width, a + width < n)) if ok], dtype=torch.long)
    chosen = torch.unique(torch.cat([anchors, buffers]))
    deep = deep.clone()
    deep[chosen] -= 1  # received attention is a mean (<= 1): chosen tokens fall below every other one
    registers = deep.topk(keep - chosen.numel()).indices
    return torch.cat([chosen, registers]).sort().values


def grid_width(family: str, x, j: int) -> int:
    if family.startswith("qwen"):
        return int(x["image_grid_thw"][j, 2]) // 2  # merged grid width
    return ZOO[family].model.config.vision_config.image_size // ZOO[family].model.config.vision_config.patch_size


@pytest.mark.parametrize("wrap_rows", [True, False])
@pytest.mark.parametrize("family", list(CASES))
def test_kept_set_and_logits_equal_the_reference_rule_on_eager_maps(family, wrap_rows):
    fam = ZOO[family]
    x = inputs(fam) if family != "llava" else inputs(fam, sizes=[(64, 48), (56, 56)])
    obj_layer, k = CASES[family]
    pruner = HiPrune(alpha=ALPHA, object_layer=obj_layer, wrap_rows=wrap_rows)
    with torch.no_grad():
        tokprune.apply(fam.model, pruner, keep=k)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        deep_layer = pruner.layers(tokprune.api.model_info(fam.model))[1]
        obj = oracles.received(fam.model, x, obj_layer)
        deep = oracles.received(fam.model, x, deep_layer)
        ref = kept_tokens_reference(fam, x, rec.kept[0])
        ref_gen = kept_tokens_reference(fam, x, rec.kept[0], generate=True)
    assert deep_layer == tokprune.api.model_info(fam.model).vision_layers - (2 if family == "llava" else 1)
    for j, (o, d) in enumerate(zip(obj, deep)):
        expected = reference_select(o, d, grid_width(family, x, j), k, ALPHA, wrap_rows)
        assert torch.equal(rec.kept[0][j], expected)
    assert (out - ref).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


def test_next_selects_per_tile_on_each_tile_grid_and_keeps_newlines():
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # 5 full 2 x 2 tiles per image, none unpadded away
    k = 15  # 3 per tile: round(1.0 * 3 / 5) = 1 anchor per tile and its 2 true neighbours
    with torch.no_grad():
        tokprune.apply(fam.model, "hiprune", keep=k, alpha=1.0, object_layer=0, wrap_rows=False)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        obj = oracles.received(fam.model, x, 0)
        deep = oracles.received(fam.model, x, 1)
        tiles = [t for t, _ in next_tile_scores(fam, x, [1])]
        ref = kept_tokens_reference(fam, x, rec.kept[0])
    for j, tile in enumerate(tiles):
        expected = [(tile < 0).nonzero()[:, 0]]  # every newline
        for t in range(int(tile.max()) + 1):
            idx = (tile == t).nonzero()[:, 0]
            width = grid_width("llava_next", x, j)
            assert idx.numel() == width * width
            expected.append(idx[reference_select(obj[j][idx], deep[j][idx], width, k // 5, 1.0, wrap_rows=False)])
        assert torch.equal(rec.kept[0][j], torch.cat(expected).sort().values)
    assert rec.n_kept[0] == [k + int(s.sum()) for s in rec.special[0]]
    assert (out - ref).abs().max() <= TOL


def test_next_global_tile_budget_is_refused():
    fam = ZOO["llava_next"]
    with tokprune.pruned(fam.model, "hiprune", keep=10, tile_budget="global"), \
            pytest.raises(tokprune.UnsupportedError, match="tile_budget='per_tile'"):
        fam.model(**inputs(fam))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_block_wise_received_attention_equals_the_eager_maps(family):
    """The seam's received attention (query chunks from q/k in the tap, never N x N) = the eager maps' column mean."""
    seen = {}

    class Spy(HiPrune):
        def select_vision(self, signals, ks):
            seen["signals"] = signals
            return super().select_vision(signals, ks)

    fam = ZOO[family]
    x = inputs(fam)
    pruner = Spy(object_layer=0, alpha=0.0)
    with torch.no_grad(), tokprune.pruned(fam.model, pruner, keep=4):
        fam.model(**x)
    for layer in pruner.layers(tokprune.api.model_info(fam.model)):
        for got, want in zip(seen["signals"][Signal("received", layer)], oracles.received(fam.model, x, layer)):
            assert torch.allclose(got.float(), want.float(), atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_sdpa_and_eager_select_the_same_tokens(family):
    kept = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny_model(family, attn=attn)
        fam = type(ZOO[family])(family, model, proc)
        with torch.no_grad(), tokprune.pruned(model, "hiprune", keep=5, alpha=1.0, object_layer=0):
            model(**inputs(fam))
            kept.append(tokprune.last_record(model).kept[0])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_static_cache_matches_dynamic(family):
    fam = ZOO[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "hiprune", keep=5, alpha=1.0, object_layer=0):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)


def test_default_layers_follow_the_reference_and_scale_with_depth():
    clip = ModelInfo("llava", 24, 22, True, 32, True)
    qwen = ModelInfo("qwen2_5_vl", 32, 31, False, 28, False)
    assert HiPrune().layers(clip) == (8, 22)
    assert HiPrune().layers(qwen) == (15, 31)
    assert HiPrune().layers(ModelInfo("llava", 12, 10, True, 32, True)) == (4, 10)
    assert HiPrune(object_layer=-3, deep_layer=20).layers(clip) == (21, 20)
    assert HiPrune().anchors(192) == 4 and HiPrune().anchors(128) == 3 and HiPrune().anchors(64) == 1


def test_options_are_validated_with_the_fix():
    with pytest.raises(ValueError, match="alpha must be a number in"):
        HiPrune(alpha=-1)
    with pytest.raises(TypeError, match="wrap_rows must be True"):
        HiPrune(wrap_rows="yes")
    fam = ZOO["llava"]
    with pytest.raises(ValueError, match=r"object_layer=7 is out of range .* pass a layer in \[0, 2\]"):
        tokprune.apply(fam.model, "hiprune", keep=4, object_layer=7)
    assert not tokprune.is_patched(fam.model)
    with tokprune.pruned(fam.model, "hiprune", keep=4, alpha=2.0), pytest.raises(ValueError, match="lower alpha"):
        fam.model(**inputs(fam))


def test_runs_on_every_family():
    # LLaVA-NeXT: per tile above; LLaVA-OneVision: per tile in tests/test_onevision.py
    assert set(CASES) | {"llava_next", "llava_onevision"} == set(families())


def test_record_scores_hold_the_deep_layer_statistic():
    fam = ZOO["qwen2_vl"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "hiprune", keep=4, record_scores=True):
        fam.model(**x)
        scores = tokprune.last_record(fam.model).stages[0].scores[0]
    for got, want in zip(scores, oracles.received(fam.model, x, 1)):
        assert torch.allclose(got, want.float(), atol=1e-6)


def test_windowed_block_received_attention_is_summed_over_all_queries():
    """Qwen2.5-VL block 0 attends within windows (one call per window; edge windows are smaller). The received
    attention every method reads there is the full-attention definition, as HiPrune's reference computes it (one
    masked attention over the image, summed over all queries): a window's column sum over the image's patch count.
    The per-window column mean (what tokprune computed before) ranks differently on this input, so the check can
    fail; the kept set of HiPrune with that object layer is the reference rule's on the corrected statistic."""
    fam = ZOO["qwen2_5_vl"]
    x = inputs(fam)
    info = tokprune.api.model_info(fam.model)
    assert 0 not in fam.model.config.vision_config.fullatt_block_indexes
    with torch.no_grad():
        maps = oracles.vision_attention(fam.model, x, 0)
        assert len({int(a.shape[-1]) for a in maps}) > 1  # windows of different sizes
        per_window_mean = oracles.per_token(fam.model, x, [a.mean(1).mean(-2) for a in maps])
        want = oracles.received(fam.model, x, 0)
    assert any(not torch.equal(w.argsort(), m.argsort()) for w, m in zip(want, per_window_mean))
    seen = {}

    class Spy(HiPrune):
        def select_vision(self, signals, ks):
            seen["signals"] = signals
            return super().select_vision(signals, ks)

    pruner = Spy(object_layer=0, alpha=1.0)
    with torch.no_grad(), tokprune.pruned(fam.model, pruner, keep=10):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    got = seen["signals"][Signal("received", 0)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        deep = oracles.received(fam.model, x, pruner.layers(info)[1])
    for j, (o, d) in enumerate(zip(want, deep)):
        assert torch.equal(rec.kept[0][j], reference_select(o, d, grid_width("qwen2_5_vl", x, j), 10, 1.0))


def test_hub_rows_on_a_windowed_block_are_refused():
    fam = ZOO["qwen2_5_vl"]
    with pytest.raises(tokprune.UnsupportedError, match="attends within windows"):
        tokprune.apply(fam.model, "vflowopt", keep=4, vision_layer=0)
    assert not tokprune.is_patched(fam.model)
