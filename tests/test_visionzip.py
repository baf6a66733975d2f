"""VisionZip end to end on every family: kept slots, contextual tokens, record.merged and logits against a reference
written from the reference code's rule (dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward``) on eager
attention maps and keys of the tiny models (tests/oracles.py ``visionzip_reference``)."""

from __future__ import annotations

import pytest
import torch
from test_families import GEN, TOL, ZOO, assert_same_generation, inputs, kept_tokens_reference, next_tile_scores

import oracles
import tokprune
from tokprune.pruners.visionzip import VisionZip
from tokprune.testing import families, tiny_model

#: LLaVA-NeXT: per tile, below; LLaVA-OneVision: tiles and newlines, which this per-image oracle does not model
#: (its visionzip runs in the family x method matrix of tests/test_families.py)
FAMILIES = [f for f in families() if f not in ("llava_next", "llava_onevision")]


@pytest.mark.parametrize("family", FAMILIES)
def test_dominant_and_contextual_tokens_equal_the_reference_rule(family):
    fam = ZOO[family]
    x = inputs(fam) if family != "llava" else inputs(fam, sizes=[(64, 48), (56, 56)])
    k, c = 8, 3
    with torch.no_grad():
        tokprune.apply(fam.model, "visionzip", keep=k, contextual=c, merge="llm")  # the LLM-token merge option
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref = oracles.visionzip_reference(fam.model, x, k, contextual=c)

        def replace(j, full, fed):
            return ref[j][1](full)[ref[j][0]]

        logits = kept_tokens_reference(fam, x, rec.kept[0], replace=replace)
        ref_gen = kept_tokens_reference(fam, x, rec.kept[0], generate=True, replace=replace)
        scores, keys = oracles.visionzip_inputs(fam.model, x)
    for j, (slots, _) in enumerate(ref):
        assert torch.equal(rec.kept[0][j], slots)
        _, groups = oracles.visionzip_groups(scores[j], keys[j], k - c, c)
        merged = rec.merged[0][j]
        assert len(merged.sources) == c
        for src, slot, (g_slot, target, members) in zip(merged.sources, merged.slots, groups):
            assert torch.equal(src, torch.cat([target.view(1), members]).sort().values)
            assert int(slot) == int(g_slot)
    assert rec.n_kept[0] == [k, k]
    assert (out - logits).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


def test_next_llm_merge_selects_dominant_and_contextual_per_tile_and_keeps_newlines():
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # 5 full 2 x 2 tiles per image
    k = 15  # 3 per tile = 2 dominant + 1 contextual
    with torch.no_grad():
        tokprune.apply(fam.model, "visionzip", keep=k, dominant=2, merge="llm")
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        scores, keys = oracles.visionzip_inputs(fam.model, x)
        tiles = [t for t, _ in next_tile_scores(fam, x, [1])]
    expected, tile_groups = [], []
    for j, tile in enumerate(tiles):
        kept, groups = [(tile < 0).nonzero()[:, 0]], []
        for t in range(int(tile.max()) + 1):
            idx = (tile == t).nonzero()[:, 0]
            dom, g = oracles.visionzip_groups(scores[j][idx], keys[j][idx], 2, 1)
            kept += [idx[dom], idx[g[0][0]].view(1)]
            groups.append((idx, g))
        expected.append(torch.cat(kept).sort().values)
        tile_groups.append(groups)
        assert torch.equal(rec.kept[0][j], expected[-1])
        assert len(rec.merged[0][j].sources) == 5  # one contextual token per tile, inside its tile
        for src, (idx, g) in zip(rec.merged[0][j].sources, groups):
            assert torch.equal(src, idx[torch.cat([g[0][1].view(1), g[0][2]])].sort().values)

    def replace(j, full, fed):
        for idx, g in tile_groups[j]:
            full = oracles.merge_groups(full, g, idx)
        return full[expected[j]]

    with torch.no_grad():
        ref = kept_tokens_reference(fam, x, rec.kept[0], replace=replace)
    assert rec.n_kept[0] == [k + int(s.sum()) for s in rec.special[0]]
    assert (out - ref).abs().max() <= TOL


def test_llava_full_features_keep_the_cls_token_first():
    """With ``vision_feature_select_strategy="full"`` the [CLS] token is a visual token: it is kept (and counted in
    ``dominant``), the patches are the reference's top ``dominant - 1``."""
    model, proc = tiny_model("llava")
    model.config.vision_feature_select_strategy = "full"
    proc.vision_feature_select_strategy, proc.num_additional_image_tokens = "full", 1  # 1 + 16 placeholders
    fam = type(ZOO["llava"])("llava", model, proc)
    x = inputs(fam, sizes=[(56, 56)])
    k, c = 6, 2
    with torch.no_grad(), tokprune.pruned(model, "visionzip", keep=k, contextual=c, merge="llm"):
        model(**x)
        rec = tokprune.last_record(model)
    scores, _ = oracles.visionzip_inputs(model, x)  # per patch (the [CLS] column dropped)
    kept = rec.kept[0][0]
    assert rec.n_visual[0] == [17] and kept[0] == 0 and kept.numel() == k
    dominant = set((oracles.topk_sorted(scores[0], k - c - 1) + 1).tolist())
    assert dominant <= set(kept.tolist())
    assert set(kept.tolist()) - dominant - {0} == set(rec.merged[0][0].slots.tolist())


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_sdpa_and_eager_select_the_same_tokens(family):
    got = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny_model(family, attn=attn)
        fam = type(ZOO[family])(family, model, proc)
        with torch.no_grad(), tokprune.pruned(model, "visionzip", keep=6, contextual=2):
            model(**inputs(fam))
            rec = tokprune.last_record(model)
            got.append((rec.kept[0], [m.sources for m in rec.merged[0]]))
    assert all(torch.equal(a, b) for a, b in zip(got[0][0], got[1][0]))
    assert all(torch.equal(a, b) for sa, sb in zip(got[0][1], got[1][1]) for a, b in zip(sa, sb))


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_static_cache_matches_dynamic(family):
    fam = ZOO[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "visionzip", keep=6, contextual=2):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)


def test_split_defaults_to_the_papers_ratio_and_options_are_validated():
    assert VisionZip().split(64) == (54, 10)
    assert VisionZip().split(128) == (108, 20)
    assert VisionZip().split(192) == (162, 30)
    assert VisionZip(dominant=60).split(64) == (60, 4)
    assert VisionZip(contextual=0).split(64) == (64, 0)
    with pytest.raises(ValueError, match="non-negative int"):
        VisionZip(dominant=-1)
    with pytest.raises(ValueError, match="pass keep=64"):
        VisionZip(dominant=54, contextual=10).split(128)
    fam = ZOO["llava"]
    with tokprune.pruned(fam.model, "visionzip", keep=6, dominant=5, contextual=2), \
            pytest.raises(ValueError, match="must sum to the budget of each image"):
        fam.model(**inputs(fam))


def test_record_scores_hold_the_dominance_score():
    fam = ZOO["llava"]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "visionzip", keep=6, record_scores=True):
        fam.model(**x)
        scores = tokprune.last_record(fam.model).stages[0].scores[0]
    for got, want in zip(scores, oracles.visionzip_inputs(fam.model, x)[0]):
        assert torch.allclose(got, want.float(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the reference's tokens
@torch.no_grad()
def reference_llm_tokens(model, x, dominant: int, contextual: int) -> list[torch.Tensor]:
    """dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward`` (visionzip/clip_encoder.py) transcribed on
    the unpatched LLaVA-1.5, then its ``encode_images_visionzip``: the projector maps ``[CLS] + dominant +
    contextual`` built from the feature layer's hidden states (``visionzip(model, dominant=...)`` passes
    ``dominant - 1`` as ``dominant_num``). Per image, the LLM input tokens in the reference's order."""
    saved, _ = reference_saved(model, x, dominant, contextual)
    return list(model.model.multi_modal_projector(saved))


@torch.no_grad()
def reference_saved(model, x, dominant: int, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``CLIPVisionTower_VisionZip.forward`` on every encoder sequence (image or tile): ``hidden_states_save``
    ([CLS] + dominant + contextual, before the projector) and ``all_indices`` ([CLS] then the top patches + 1)."""
    inner, cfg = model.model, model.config
    layer = oracles._feature_layer(model)
    (attn_weights, keys), = oracles.eager_weights_and_keys(model, x, layer)
    hidden_states = inner.vision_tower(oracles.clip_pixels(model, x), output_hidden_states=True).hidden_states[
        cfg.vision_feature_layer]
    metric = keys.mean(1)  # the reference stores the head-mean raw keys of that layer
    dominant_num, contextual_num = dominant - 1, contextual
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], 1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    b, n, d = hidden_states.shape
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(b, dominant_num + 1, d)
    metric_filtered = metric[mask].view(b, n - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(b, n - (dominant_num + 1), d)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(b, int(others.sum()), contextual_num, dtype=hidden_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


@torch.no_grad()
def reference_logits(model, x, tokens: list[torch.Tensor], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unpatched model fed the reference's tokens: each image's run of placeholders shortened to its token
    count, the tokens in order, positions contiguous (what the reference's LLM gets); prefill logits and the
    last-token logits of ``steps`` greedy decode steps (recomputed without a cache)."""
    ids = x["input_ids"][0]
    pos = (ids == model.config.image_token_id).nonzero()[:, 0]
    n = pos.numel() // len(tokens)  # placeholders per image (runs of adjacent images touch)
    runs = [(int(pos[i]), int(pos[i]) + n) for i in range(0, pos.numel(), n)]
    pieces, last = [], 0
    for (a, e), t in zip(runs, tokens):
        pieces += [ids[last:a], torch.full((t.shape[0],), model.config.image_token_id)]
        last = e
    short = torch.cat(pieces + [ids[last:]])[None]
    emb = oracles.embed(model, short, tokens)
    embed = model.model.get_input_embeddings()
    prefill = model(inputs_embeds=emb).logits
    steps_out, seq = [], emb
    for _ in range(steps):
        logits = model(inputs_embeds=seq).logits[:, -1]
        steps_out.append(logits)
        seq = torch.cat([seq, embed(logits.argmax(-1, keepdim=True))], 1)
    return prefill, steps_out


@pytest.mark.parametrize("keep, contextual", [(8, 3), (6, 1), (10, 4)])
def test_llava_default_is_the_reference_pre_projector_merge(keep, contextual):
    """LLaVA-1.5 (HF "default" features, two images of different sizes): by default VisionZip builds the
    reference's ``[CLS] + dominant + contextual`` (contextual = target + mean of its members) before the projector;
    the logits of the prefill and of every greedy decode step (KV cache) equal the unpatched model fed the
    reference's tokens in its order at contiguous positions, within 1e-4; the LLM-token merge (an option) does
    not (the test can fail)."""
    fam = ZOO["llava"]
    x = inputs(fam, sizes=[(64, 48), (56, 56)])
    steps = 4
    gen_kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        tokprune.apply(fam.model, "visionzip", keep=keep, contextual=contextual)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        got = fam.model.generate(**x, **gen_kw)
        tokprune.apply(fam.model, "visionzip", keep=keep, contextual=contextual, merge="llm")
        other = fam.model(**x).logits
        tokprune.remove(fam.model)
        tokens = reference_llm_tokens(fam.model, x, keep - contextual, contextual)
        ref, ref_steps = reference_logits(fam.model, x, tokens, steps)
    assert [t.shape[0] for t in tokens] == [keep, keep] and rec.n_kept[0] == [keep, keep]
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4
    diffs = [float((g - r).abs().max()) for g, r in zip(got.logits, ref_steps)]
    assert len(diffs) == steps and max(diffs) <= 1e-4, diffs
    assert (other - ref).abs().max() > 1e-3
    # the record: every token is built before the projector; dominant patches and targets keep their own slots
    for j in range(2):
        merged = rec.merged[0][j]
        assert len(merged.sources) == keep and merged.sources[0].numel() == 0  # row 0: the [CLS] token
        assert all(src.numel() == 1 for src in merged.sources[1:keep - contextual])


def test_llava_keep_all_and_the_merge_option_are_checked():
    fam = ZOO["llava"]
    x = inputs(fam, sizes=[(64, 48)])
    with torch.no_grad():
        base = fam.model(**x).logits
        with tokprune.pruned(fam.model, "visionzip", keep=16):
            assert torch.equal(fam.model(**x).logits, base)
    with pytest.raises(ValueError, match="merge must be"):
        VisionZip(merge="before")
    for family, opts in (("llava_next", {"tile_budget": "global"}), ("qwen2_vl", {})):
        with pytest.raises(tokprune.UnsupportedError, match="merge='llm'"):
            tokprune.apply(ZOO[family].model, "visionzip", keep=4, merge="encoder", **opts)


def test_llava_full_strategy_keeps_the_reference_tokens_with_cls_at_its_own_slot():
    """With ``vision_feature_select_strategy="full"`` (17 placeholders, [CLS] a visual token) the default is the
    same reference token list; the [CLS] row sits at the [CLS] token's own slot 0."""
    model, proc = tiny_model("llava")
    model.config.vision_feature_select_strategy = "full"
    proc.vision_feature_select_strategy, proc.num_additional_image_tokens = "full", 1
    fam = type(ZOO["llava"])("llava", model, proc)
    x = inputs(fam, sizes=[(56, 56)])
    k, c = 7, 2
    with torch.no_grad():
        with tokprune.pruned(model, "visionzip", keep=k, contextual=c):
            out = model(**x).logits
            rec = tokprune.last_record(model)
        ref, _ = reference_logits(model, x, reference_llm_tokens(model, x, k - c, c), 0)
    assert rec.n_visual[0] == [17] and rec.kept[0][0][0] == 0 and rec.merged[0][0].slots[0] == 0
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT, reference
@torch.no_grad()
def reference_next_tokens(model, x, dominant: int, contextual: int) -> list[torch.Tensor]:
    """VisionZip's LLaVA-NeXT path (dvlab-research/VisionZip ``visionzip/llava_arch.py``: its "unpad" branch,
    ``restore_image_features_sorted``), transcribed: per tile the projected [CLS] + dominant + contextual; per
    image the base tile's tokens as they are, then the crops' dominant patches put back on the stitched grid of
    full crops (no unpadding) and read in raster order, then every crop's [CLS], then every crop's contextual
    tokens; no newline."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    cfg = model.config
    saved, keep_idx = reference_saved(model, x, dominant, contextual)
    feats = model.model.multi_modal_projector(saved)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n_tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
               for s in x["image_sizes"]]
    out = []
    for f, idx, size in zip(torch.split(feats, n_tiles), torch.split(keep_idx, n_tiles), x["image_sizes"]):
        crops, crop_idx = f[1:], idx[1:]
        n, d = crops.shape[0], crops.shape[-1]
        restore = crop_idx.sort(dim=1).values[:, 1:] - 1
        grid = torch.zeros(n, side * side, d)
        mask = torch.zeros(n, side * side, dtype=torch.bool)
        mask.scatter_(1, restore, True)
        grid[mask] = crops[:, 1:dominant].reshape(-1, d)
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        grid = grid.view(rows, cols, side, side, d).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d)
        mask = mask.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
        out.append(torch.cat([f[0], grid[mask], crops[:, 0], crops[:, dominant:].reshape(-1, d)]))
    return out


@pytest.mark.parametrize("sizes", [[(224, 168), (168, 224)], [(224, 112), (120, 224)]], ids=["unpadded", "padded"])
def test_next_reference_layout_merges_before_the_projector(sizes):
    """``tile_budget="per_tile_reference"`` on LLaVA-NeXT (tiles of 4 x 4 patches): by default the reference's
    tokens in the reference's order, logits of the prefill and of greedy decoding within 1e-4 of the unpatched
    model fed them; ``merge="llm"`` stays an option (and differs)."""
    from test_families import prompt
    from test_tile_reference import fed

    from tokprune.testing import make_image

    model, proc = tiny_model("llava_next", tile=56)
    x = proc(images=[make_image(w, h, seed=j) for j, (w, h) in enumerate(sizes)], text=prompt(ZOO["llava_next"], 2),
             return_tensors="pt")
    keep, contextual = 7, 2
    with torch.no_grad():
        tokprune.apply(model, "visionzip", keep=keep, contextual=contextual, tile_budget="per_tile_reference")
        out = model(**x).logits
        gen = model.generate(**x, **GEN)
        rec = tokprune.last_record(model)
        tokprune.apply(model, "visionzip", keep=keep, contextual=contextual, tile_budget="per_tile_reference",
                       merge="llm")
        other = model(**x).logits
        tokprune.remove(model)
    tokens = reference_next_tokens(model, x, keep - contextual, contextual)
    assert [int(t.shape[0]) for t in tokens] == [int(k.numel()) for k in rec.kept[0]]
    assert out.shape[1] == other.shape[1] and (out - fed(model, x, tokens)).abs().max() <= 1e-4
    assert (other - fed(model, x, tokens)).abs().max() > 1e-3
    assert_same_generation(gen, fed(model, x, tokens, generate=True), tol=1e-4)


def test_next_default_merges_before_the_projector_per_tile_in_hf_layout():
    """The default ``tile_budget="per_tile"`` (HF's unpadded layout, newlines kept): every tile builds the
    reference's ``[CLS] + dominant + contextual`` before the projector (``reference_saved`` on its tiles); each
    token sits at its slot in HF's layout (a dominant patch its own, a contextual token its target's, [CLS] the
    tile's lowest free one), newlines at theirs; the unpatched model fed those tokens gives the same logits."""
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # 5 full 2 x 2 tiles per image
    dom, ctx = 2, 1  # per tile: [CLS] + 1 dominant patch + 1 contextual token
    with torch.no_grad():
        tokprune.apply(fam.model, "visionzip", keep=5 * (dom + ctx), dominant=dom)
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        saved, all_indices = reference_saved(fam.model, x, dom, ctx)
        tokens = fam.model.model.multi_modal_projector(saved)  # (tiles, 1 + 1 + 1, D)
        tiles = [t for t, _ in next_tile_scores(fam, x, [1])]
        n_tiles = [int(t.max()) + 1 for t in tiles]
    built, kept = [], []
    for j, (tile, toks, idx_all) in enumerate(zip(tiles, torch.split(tokens, n_tiles),
                                                  torch.split(all_indices, n_tiles))):
        slot_token = {int(s): None for s in (tile < 0).nonzero()[:, 0]}  # newlines: as they are
        for t in range(n_tiles[j]):
            idx = (tile == t).nonzero()[:, 0]  # the tile's tokens in packed (raster) order
            p = idx.numel()
            free = torch.ones(p + 1, dtype=torch.bool)
            free[idx_all[t]] = False  # [CLS] and the dominant patches
            rest = free.nonzero()[:, 0]
            target = int(rest[torch.arange(0, rest.numel(), max(1, rest.numel() // ctx))[:ctx]][0]) - 1
            dominant = sorted(int(i) - 1 for i in idx_all[t][1:])
            cls_slot = min(set(range(p)) - set(dominant) - {target})
            slot_token[int(idx[cls_slot])] = toks[t, 0]
            for r, d in enumerate(dominant):
                slot_token[int(idx[d])] = toks[t, 1 + r]
            slot_token[int(idx[target])] = toks[t, dom]
        kept.append(torch.tensor(sorted(slot_token)))
        built.append(slot_token)
        assert torch.equal(rec.kept[0][j], kept[-1])

    def replace(j, full, fed):
        return torch.stack([full[s] if built[j][s] is None else built[j][s] for s in kept[j].tolist()])

    with torch.no_grad():
        ref = kept_tokens_reference(fam, x, rec.kept[0], replace=replace)
        with tokprune.pruned(fam.model, "visionzip", keep=5 * (dom + ctx), dominant=dom, merge="llm"):
            other = fam.model(**x).logits
    assert (out - ref).abs().max() <= 1e-4
    assert (other - ref).abs().max() > 1e-3  # the LLM-token merge differs (half the contextual norm)
