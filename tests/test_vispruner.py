"""VisPruner: the important + duplicate-removal rule on hand-made inputs with known answers, an independent
re-implementation of the authors' code (Theia-4869/VisPruner ``llava_arch.py`` ``encode_images``, ``clip_encoder.py``
``feature_select``) on eager attention maps and hidden states of the tiny models, and end to end on every family
(kept sets and logits; Qwen: the received-attention variant)."""

from __future__ import annotations

import math

import pytest
import torch
from test_families import (
    GEN,
    TOL,
    ZOO,
    assert_same_generation,
    inputs,
    kept_tokens_reference,
)
from test_tile_reference import fed, spatial_kept, tile_pixels, tile_values

import oracles
import tokprune
from tokprune.pruners.vispruner import VisPruner
from tokprune.rules.vispruner import vispruner_counts, vispruner_select
from tokprune.testing import families, tiny_model


# ---------------------------------------------------------------------------------------------- the authors' rule
def authors_vispruner(features: torch.Tensor, attention: torch.Tensor, n_keep: int, ratio: float) -> torch.Tensor:
    """The reference's ``encode_images`` selection for one image, as its code writes it: ``int(T * r)`` important
    tokens by descending attention; the rest, in that order, lose ``min(8, R - diverse)`` tokens per round: the
    even-position tokens with the highest best-cosine against the odd-position ones (``a @ b.T``, re-multiplied
    every round); survivors = the kept evens in descending score order, then the odds. Returns the kept indices,
    ascending (the index mask's order). One image, so the reference's batch indexing is written for one row."""
    n_imp = int(n_keep * ratio)
    n_div = n_keep - n_imp
    order = attention.argsort(descending=True)
    important, residual = order[:n_imp], order[n_imp:]
    normed = features / features.norm(dim=-1, keepdim=True)
    while n_div > 0:
        n_res = residual.shape[0]
        r = min(8, n_res - n_div)
        if r <= 0:
            break
        tokens = normed[residual]
        a, b = tokens[::2], tokens[1::2]
        best = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = best.argsort(descending=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    selected = torch.cat([important, residual]) if n_div > 0 else important
    mask = torch.zeros(features.shape[0], dtype=torch.bool)
    mask[selected] = True
    return mask.nonzero()[:, 0]


# ---------------------------------------------------------------------------------------------- hand-made
def _basis(n: int) -> torch.Tensor:
    return torch.eye(n)


def test_known_duplicates_one_round():
    """Two important tokens, then eight in attention order whose even members have known best matches among the
    odd ones: p0 duplicates p1 (cos 1), p2 is 0.8 like p5, p4 0.5 like p3, p6 like none. ``diverse = 5`` removes
    ``min(8, 8 - 5) = 3``: p0, p2, p4. Stored in a shuffled order so that indices are not the answer."""
    e = _basis(10)
    p = [e[1], e[1], 0.8 * e[5] + 0.6 * e[2], e[3], 0.5 * e[3] + math.sqrt(0.75) * e[4], e[5], e[6], e[7]]
    tokens = torch.stack([e[8], e[9]] + p)  # i0, i1, p0..p7
    importance = torch.linspace(1.0, 0.1, 10)  # descending: i0, i1, p0, ..., p7
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    sel = vispruner_select(importance[perm], tokens[perm], keep=7, important_ratio=0.3)  # int(2.1) = 2 important
    names = ["i0", "i1"] + [f"p{j}" for j in range(8)]
    assert sorted(names[perm[i]] for i in sel.important.tolist()) == ["i0", "i1"]
    assert sorted(names[perm[i]] for i in sel.diverse.tolist()) == ["p1", "p3", "p5", "p6", "p7"]
    assert torch.equal(sel.kept, torch.cat([sel.important, sel.diverse]).sort().values)
    assert torch.equal(sel.kept, authors_vispruner(tokens[perm], importance[perm], 7, 0.3))


def test_known_duplicates_three_rounds_reorder_the_survivors():
    """Twelve remaining tokens, two diverse: round 1 removes every even one (r = 8 > 6), round 2 every even one of
    the six odd survivors (p1, p5, p9), leaving p3, p7, p11; round 3 (r = 1) removes the even one more like the
    odd one p7: p3, its duplicate. Diverse = {p7, p11}."""
    e = _basis(12)
    p = [e[j] for j in range(12)]
    p[3] = e[7]  # duplicate of p7
    p[11] = 0.6 * e[7] + 0.8 * e[11]  # cos 0.6 with p7: less alike than p3
    sel = vispruner_select(torch.linspace(1.0, 0.1, 12), torch.stack(p), keep=2, important_ratio=0.0)
    assert sel.important.numel() == 0
    assert sel.diverse.tolist() == [7, 11]


def test_ratio_one_is_the_attention_top_k_and_counts_floor():
    g = torch.Generator().manual_seed(4)
    imp, feats = torch.rand(40, generator=g), torch.randn(40, 6, generator=g)
    sel = vispruner_select(imp, feats, 9, important_ratio=1.0)
    assert sel.kept.tolist() == sorted(imp.topk(9).indices.tolist())
    assert vispruner_counts(64, 0.5) == (32, 32) and vispruner_counts(64, 0.75) == (48, 16)
    assert vispruner_counts(192, 0.7) == (134, 58)  # int(134.39999...) floors, as the reference's int()


@pytest.mark.parametrize("n, keep, ratio", [(576, 64, 0.5), (576, 128, 0.5), (576, 64, 0.75), (576, 192, 0.5),
                                            (100, 37, 0.4), (50, 20, 0.0)])
def test_equals_the_authors_rule_on_random_inputs(n, keep, ratio):
    g = torch.Generator().manual_seed(n + keep)
    imp, feats = torch.rand(n, generator=g), torch.randn(n, 32, generator=g)
    assert torch.equal(vispruner_select(imp, feats, keep, ratio).kept, authors_vispruner(feats, imp, keep, ratio))


def test_batched_rows_equal_single_rows_and_options_are_validated():
    g = torch.Generator().manual_seed(5)
    imp, feats = torch.rand(3, 50, generator=g), torch.randn(3, 50, 8, generator=g)
    sel = vispruner_select(imp, feats, 12)
    for b in range(3):
        assert torch.equal(sel.kept[b], vispruner_select(imp[b], feats[b], 12).kept)
    with pytest.raises(ValueError, match="important_ratio is the important tokens' share"):
        VisPruner(important_ratio=1.5)
    with pytest.raises(ValueError, match="per_round is the number of duplicates removed per round"):
        VisPruner(per_round=0)
    with pytest.raises(ValueError, match=r"keep must be an int in \[0, 50\]"):
        vispruner_select(imp, feats, 51)


# ---------------------------------------------------------------------------------------------- end to end
def _hidden_out(model, x, layer: int) -> list[torch.Tensor]:
    """Per image, the output hidden states of vision layer ``layer`` per LLM token, from an unpatched run (LLaVA:
    ``hidden_states[layer + 1]``, [CLS] dropped; NeXT packed; Qwen: the block's output, merge-unit mean, raster)."""
    inner = model.model
    if hasattr(inner, "visual"):
        seen = []
        h = inner.visual.blocks[layer].register_forward_hook(lambda m, a, out: seen.append(
            (out[0] if isinstance(out, tuple) else out).float()))
        try:
            with torch.no_grad():
                inner.visual(x["pixel_values"], grid_thw=x["image_grid_thw"])
        finally:
            h.remove()
        return oracles.per_token(model, x, [seen[0][None]])
    with torch.no_grad():
        hs = inner.vision_tower(oracles.clip_pixels(model, x), output_hidden_states=True).hidden_states[layer + 1]
    return oracles.per_token(model, x, [hs.float()])


def _importance(model, x, layer: int) -> list[torch.Tensor]:
    """Per image: head-mean [CLS] attention (LLaVA) or received attention (Qwen) at ``layer``, eager maps."""
    if hasattr(model.model, "visual") or not oracles.has_cls(model):  # Qwen, SigLIP (LLaVA-OneVision)
        return oracles.received(model, x, layer)
    att = oracles.vision_attention(model, x, layer)[0]
    return oracles.per_token(model, x, [att.mean(1)[:, 0]])


@pytest.mark.parametrize("family", families())
def test_kept_sets_and_logits_equal_the_authors_rule_on_every_family(family):
    """Two images per prompt. LLaVA: [CLS] attention of the feature layer; Qwen: received attention (the documented
    CLS-free variant); LLaVA-NeXT: ``tile_budget="per_tile_reference"`` (``T`` tokens in every tile, the
    reference's count and "spatial" layout: every tile's full grid, no newline, see tests/test_tile_reference.py;
    the reference's own ``mm_patch_merge_type.replace('_unpad', '')``). LLaVA-OneVision: received attention (no
    [CLS]), one budget over each image's content tokens (``tile_budget="global"``), newlines kept on top.

    The scores tokprune recorded must equal the eager maps' within float rounding, and the kept set must be the
    authors' rule applied to them. The rule runs on the recorded scores, not the eager ones, because this tiny
    LLaVA-OneVision prompt has scores that are tied in exact arithmetic: each tile is one token pooled from its 4
    patches, whose received attentions sum to 1, so every such token scores 1/4. Which of them ranks first is then
    decided by the last bit of each computation's rounding."""
    fam = ZOO[family]
    nxt = family == "llava_next"
    sizes = [(112, 84), (84, 112)] if nxt else [(64, 48), (56, 56)] if family == "llava" else None
    x = inputs(fam, sizes=sizes) if sizes else inputs(fam)
    # budgets where the duplicate scores decide (a round removes fewer than its even tokens): NeXT 1 important + 2
    # diverse of 4 per tile; LLaVA 3 + 4 of 16; Qwen 5 + 5 of 12 and 18
    k, ratio = (3, 0.34) if nxt else (7, 0.5) if family == "llava" else (10, 0.5)
    opts = {"tile_budget": "per_tile_reference"} if nxt else {}
    if family == "llava_onevision":  # received attention; one budget over each image's content tokens
        k, opts = 5, {"tile_budget": "global"}
    with torch.no_grad():
        tokprune.apply(fam.model, "vispruner", keep=k, important_ratio=ratio, record_scores=True, **opts)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        layer = tokprune.api.model_info(fam.model).feature_layer
        if nxt:
            ref, ref_gen = _next_reference(fam, x, rec, layer, k, ratio)
            assert (out - ref).abs().max() <= TOL
            assert_same_generation(gen, ref_gen)
            return
        scores, hidden = _importance(fam.model, x, layer), _hidden_out(fam.model, x, layer)
        ref = kept_tokens_reference(fam, x, rec.kept[0])
        ref_gen = kept_tokens_reference(fam, x, rec.kept[0], generate=True)
    for j, (eager_s, h) in enumerate(zip(scores, hidden)):
        kept, s = rec.kept[0][j].cpu(), rec.stages[0].scores[0][j].cpu()
        torch.testing.assert_close(s, eager_s.float(), atol=1e-6, rtol=0, equal_nan=True)
        content = (~torch.isnan(s)).nonzero()[:, 0]  # LLaVA-OneVision: newlines kept on top
        expected = content[authors_vispruner(h[content], s[content], k, ratio)]
        assert torch.equal(kept, torch.cat([expected, (torch.isnan(s)).nonzero()[:, 0]]).sort().values)
    assert (out - ref).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


@torch.no_grad()
def _next_reference(fam, x, rec, layer: int, k: int, ratio: float):
    """LLaVA-NeXT: the authors' rule on every tile's full grid, packed in the reference's spatial layout; checks
    the kept sets and returns the unpatched model's logits and decoding on those tokens."""
    feats, att, n_tiles = tile_values(fam.model, x)
    pixels, _ = tile_pixels(fam.model, x)
    hidden = fam.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer + 1][:, 1:]
    importance = att[layer][:, :, 0, 1:].mean(1)
    masks = torch.zeros_like(importance, dtype=torch.bool)
    for i in range(masks.shape[0]):
        masks[i, authors_vispruner(hidden[i].float(), importance[i], k, ratio)] = True
    tokens, kept = spatial_kept(fam.model, x, feats, torch.split(masks, n_tiles))
    assert [r.tolist() for r in rec.kept[0]] == [r.tolist() for r in kept]
    return fed(fam.model, x, tokens), fed(fam.model, x, tokens, generate=True)


@pytest.mark.parametrize("family", families())
def test_static_cache_and_sdpa_eager(family):
    """Static cache equals dynamic; SDPA and eager encoders give the same importance ranking, so the same kept set."""
    fam = ZOO[family]
    x = inputs(fam) if family != "llava" else inputs(fam, sizes=[(64, 48), (56, 56)])
    with torch.no_grad(), tokprune.pruned(fam.model, "vispruner", keep=4):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)
    kept = []
    for attn in ("sdpa", "eager"):
        model, _ = tiny_model(family, attn=attn)
        with torch.no_grad(), tokprune.pruned(model, "vispruner", keep=4):
            model(**x)
            kept.append(tokprune.last_record(model).kept[0])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_ratio_one_keeps_what_the_cls_pruner_keeps():
    """With every token important, VisPruner is FasterVLM (``cls``: head-mean [CLS] attention of the feature layer)."""
    fam = ZOO["llava"]
    x = inputs(fam, sizes=[(64, 48), (56, 56)])
    kept = []
    for method, opts in (("vispruner", {"important_ratio": 1.0}), ("cls", {})):
        with torch.no_grad(), tokprune.pruned(fam.model, method, keep=6, **opts):
            fam.model(**x)
            kept.append(tokprune.last_record(fam.model).kept[0])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_search_space_is_declared_and_a_tuned_config_applies():
    """``important_ratio`` is what ``tokprune tune`` searches; ``apply(config=...)`` takes a point of it and refuses
    one outside it. DivPrune has no numeric option, so no space."""
    from tokprune.eval import tune as tuning

    assert tuning.search_space("vispruner") == {"important_ratio": ("float", 0.0, 1.0)}
    assert "divprune" not in tuning.tunable_methods()
    fam = ZOO["llava"]
    x = inputs(fam, sizes=[(64, 48)])
    with torch.no_grad():
        tokprune.apply(fam.model, config={"method": "vispruner", "keep_ratio": 0.25,
                                          "options": {"important_ratio": 0.75}})
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
        with pytest.raises(ValueError, match="important_ratio"):
            tokprune.apply(fam.model, config={"method": "vispruner", "options": {"important_ratio": 1.5}})
    assert rec.n_kept == [[4]]
