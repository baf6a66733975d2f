"""LLaVA-NeXT ``tile_budget="per_tile_reference"``: the references' count *and* layout.

FasterVLM (Theia-4869/FasterVLM ``llava/model/llava_arch.py``) and HiPrune (Danielement321/HiPrune
``LLaVA/llava/model/llava_arch.py``) select per tile, on every tile's full patch grid, and hard-code
``mm_patch_merge_type = 'spatial'``: the base tile's kept tokens in raster order, then the crops' kept tokens in the
raster order of the stitched grid of *full* crops (padding patches included), no unpadding, no newline token.
:func:`spatial_reference` re-implements that from the authors' code (index masks per tile, the crops' masks viewed
as (rows, cols, side, side), rows and crops interleaved, flattened), without tokprune; the unpatched model is then
fed those tokens at contiguous positions (the reference rebuilds the sequence).
"""

from __future__ import annotations

import pytest
import torch
from test_families import GEN, N_NEW, TOL, ZOO, assert_same_generation, inputs, make_image, prompt
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import oracles
import tokprune
import tokprune.api
from tokprune.testing import tiny_model

#: image sizes (w, h): the first pair loses nothing to unpadding; the second pads (the reference keeps padding)
UNPADDED, PADDED = [(112, 84), (84, 112)], [(112, 56), (60, 112)]


def tile_pixels(model, x) -> tuple[torch.Tensor, list[int]]:
    """Every image's tiles' pixels (all tiles, image by image) and the tiles per image."""
    cfg = model.config
    sizes = x["image_sizes"]
    n_tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    return torch.cat([p[:n] for p, n in zip(x["pixel_values"], n_tiles)]), n_tiles


@torch.no_grad()
def tile_values(model, x) -> tuple[list[torch.Tensor], tuple, list[int]]:
    """Per image, its tiles' projected patch features (n_tiles, side * side, D) as the model computes them, the
    vision tower's eager attention maps of all tiles (per layer: (tiles, heads, 1 + P, 1 + P)), tiles per image."""
    m, cfg = model.model, model.config
    pixels, n_tiles = tile_pixels(model, x)
    hidden = m.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
    feats = torch.split(m.multi_modal_projector(hidden), n_tiles)
    m.vision_tower.set_attn_implementation("eager")
    try:
        att = m.vision_tower(pixels, output_attentions=True).attentions
    finally:
        m.vision_tower.set_attn_implementation("sdpa")
    return list(feats), att, n_tiles


def spatial_order(mask: torch.Tensor, size: torch.Tensor, cfg) -> torch.Tensor:
    """The reference's spatial flattening of per-tile values (n_tiles, side * side, ...) of one image: the base
    tile, then ``crops.view(rows, cols, h, w).permute(0, 2, 1, 3).flatten``."""
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    crops = mask[1:].view(rows, cols, side, side, *mask.shape[2:]).permute(0, 2, 1, 3, *range(4, mask.dim() + 2))
    return torch.cat([mask[0], crops.flatten(0, 3)])


def fastervlm_masks(att, layer: int, t: int) -> torch.Tensor:
    """FasterVLM's ``encode_images``: per tile, the top ``t`` patches by head-mean [CLS] attention."""
    cls = att[layer][:, :, 0, 1:].mean(1)
    mask = torch.zeros_like(cls, dtype=torch.bool)
    mask.scatter_(1, cls.topk(t, dim=1).indices, True)
    return mask


def hiprune_masks(att, object_layer: int, deep_layer: int, t: int, alpha: float, side: int) -> torch.Tensor:
    """HiPrune's ``encode_images`` per tile: anchors by received attention (head mean, query mean, [CLS] column
    dropped) at the object layer, their ``-1, +1, -side, +side`` buffers clamped to the tile, then the best
    remaining patches at the deep layer."""
    deep = att[deep_layer].mean(1).mean(1)[:, 1:].clone()
    shallow = att[object_layer].mean(1).mean(1)[:, 1:]
    n_anchor = round(t * alpha / 5)
    masks = []
    for i in range(deep.shape[0]):
        a = shallow[i].topk(n_anchor).indices
        near = torch.cat([a, a - 1, a + 1, a - side, a + side]).clamp(0, side * side - 1).unique()
        chosen = torch.zeros(side * side, dtype=torch.bool)
        chosen[near] = True
        rest = (deep[i] - chosen.float()).topk(t - near.numel()).indices
        chosen[rest] = True
        masks.append(chosen)
    return torch.stack(masks)


@torch.no_grad()
def spatial_reference(model, x, masks_of) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image of a one-row prompt: the reference's LLM tokens and their indices in the spatial layout."""
    feats, att, n_tiles = tile_values(model, x)
    return spatial_kept(model, x, feats, torch.split(masks_of(att), n_tiles))


def spatial_kept(model, x, feats: list[torch.Tensor], masks: list[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the tokens the per-tile index ``masks`` keep from ``feats``, in the spatial order, and their
    indices in the spatial layout."""
    tokens, kept = [], []
    for f, mask, size in zip(feats, masks, x["image_sizes"]):
        flat_mask = spatial_order(mask, size, model.config)
        tokens.append(spatial_order(f, size, model.config)[flat_mask])
        kept.append(flat_mask.nonzero()[:, 0])
    return tokens, kept


@torch.no_grad()
def fed(model, x, tokens: list[torch.Tensor], generate: bool = False):
    """The unpatched model fed ``tokens`` per image in place of the processor's placeholder runs (one row),
    positions 0..L-1."""
    ids = x["input_ids"][0]
    img = model.config.image_token_id
    counts = [int(f.shape[0]) for f in model.model.get_image_features(
        pixel_values=x["pixel_values"], image_sizes=x["image_sizes"], return_dict=True).pooler_output]
    runs = torch.split((ids == img).nonzero()[:, 0], counts)
    pieces, cursor = [], 0
    for run, t in zip(runs, tokens):
        pieces += [ids[cursor:int(run[0])], torch.full((t.shape[0],), img)]
        cursor = int(run[-1]) + 1
    new_ids = torch.cat([*pieces, ids[cursor:]])[None]
    out = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"],
                                         return_dict=True)
    out.pooler_output = tokens
    kw = dict(input_ids=new_ids, mm_encoder_outputs={"image": out})
    if not generate:
        return model(**kw).logits
    return oracles.greedy_decode(model, N_NEW, position_ids=torch.arange(new_ids.shape[1])[None],
                                 attention_mask=torch.ones_like(new_ids), **kw)


@pytest.mark.parametrize("sizes", [UNPADDED, PADDED], ids=["unpadded", "padded"])
@pytest.mark.parametrize("budget", [dict(keep=3), dict(keep_ratio=0.5)])
def test_cls_is_fastervlms_spatial_layout(sizes, budget):
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=sizes)
    t = budget.get("keep", 2)  # keep_ratio 0.5 of a 2 x 2 tile
    with torch.no_grad():
        tokprune.apply(fam.model, "cls", tile_budget="per_tile_reference", **budget)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
    tokens, kept = spatial_reference(fam.model, x, lambda att: fastervlm_masks(att, 1, t))
    n_tiles = [int(k.numel()) // t for k in kept]
    assert rec.n_visual[0] == [4 * n for n in n_tiles]  # every tile's full 2 x 2 grid, no newline
    assert not any(bool(sp.any()) for sp in rec.special[0])
    assert [k.tolist() for k in rec.kept[0]] == [k.tolist() for k in kept]
    assert out.shape[1] == x["input_ids"].shape[1] - sum(
        int(f.shape[0]) for f in fam.model.model.get_image_features(
            pixel_values=x["pixel_values"], image_sizes=x["image_sizes"], return_dict=True).pooler_output
    ) + sum(int(k.numel()) for k in kept)
    assert (out - fed(fam.model, x, tokens)).abs().max() <= TOL
    assert_same_generation(gen, fed(fam.model, x, tokens, generate=True))


def test_hiprune_is_the_authors_rule_on_full_tiles():
    """Tiles of 4 x 4 patches (``tile=56``), so anchors have buffers; ``-side`` / ``+side`` on the full tile."""
    model, proc = tiny_model("llava_next", tile=56)
    images = [make_image(w, h, seed=j) for j, (w, h) in enumerate([(224, 112), (120, 224)])]
    x = proc(images=images, text=prompt(ZOO["llava_next"], 2), return_tensors="pt")
    t, alpha = 7, 0.8  # one anchor (round(7 * 0.8 / 5) = 1), up to 5 with its buffers, the rest registers
    with torch.no_grad():
        tokprune.apply(model, "hiprune", keep=t, alpha=alpha, object_layer=0, tile_budget="per_tile_reference")
        out = model(**x).logits
        rec = tokprune.last_record(model)
        tokprune.remove(model)
    tokens, kept = spatial_reference(model, x, lambda att: hiprune_masks(att, 0, 1, t, alpha, 4))
    assert [k.tolist() for k in rec.kept[0]] == [k.tolist() for k in kept]
    assert (out - fed(model, x, tokens)).abs().max() <= TOL


#: every method that runs only a vision stage on LLaVA-NeXT (the ones ``per_tile_reference`` accepts)
VISION_ONLY = [m for m in tokprune.methods() if all(
    st.kind == "vision" for st in tokprune.api.schedule(ZOO["llava_next"].model, m, keep=1, n_visual=16).stages)]


@pytest.mark.parametrize("method", VISION_ONLY)
def test_batch_with_padding_matches_single_rows(method):
    """Every vision-only method in the references' layout: ``T`` per tile, no newline, and a left-padded batch of
    rows with different images (and different placeholder changes per row) decodes as the rows alone."""
    fam = ZOO["llava_next"]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(112, 56), (56, 84), (84, 112)])]
    texts = [prompt(fam, 2, "compare the first and second picture ?"), prompt(fam, 1, "what ?")]
    batch = fam.proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad(), tokprune.pruned(fam.model, method, keep=2, tile_budget="per_tile_reference"):
        gen = fam.model.generate(**batch, **GEN)
        rec = tokprune.last_record(fam.model)
        single = [fam.model.generate(**fam.proc(images=ims, text=t, return_tensors="pt"), **GEN)
                  for t, ims in zip(texts, (images[:2], images[2:]))]
    assert [[n % 4 for n in row] for row in rec.n_visual] == [[0, 0], [0]]  # whole 2 x 2 tiles, no newline
    assert rec.n_kept == [[n // 2 for n in row] for row in rec.n_visual]  # 2 of every tile's 4
    for b, g in enumerate(single):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


def test_keep_all_and_llm_methods():
    """A count that keeps whole tiles leaves HF's layout: keep-all is the unpatched model."""
    fam = ZOO["llava_next"]
    x = inputs(fam)
    with torch.no_grad():
        ref = fam.model(**x).logits
        for budget in (dict(keep_ratio=1.0), dict(keep=4)):
            with tokprune.pruned(fam.model, "cls", tile_budget="per_tile_reference", **budget):
                assert torch.equal(fam.model(**x).logits, ref)
    with pytest.raises(ValueError, match="use tile_budget='per_tile' or 'global'"):
        tokprune.apply(fam.model, "fastv", keep=4, tile_budget="per_tile_reference")
    assert not tokprune.is_patched(fam.model)


def test_static_cache_matches_dynamic():
    """The resized prompt and the pruned cache under a static cache (VisionZip: encoder-space rows as well)."""
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=PADDED)
    with torch.no_grad(), tokprune.pruned(fam.model, "visionzip", keep=3, tile_budget="per_tile_reference"):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)


@pytest.mark.parametrize("method", ["cls", "visionzip"])
def test_beam_search_equals_each_row_expanded_by_hand(method):
    """Beams share an encoded image (``generate`` repeats its outputs): the resized prompt of every beam row and
    the kept sets equal each row's beam search with its inputs repeated by hand (tests/test_beam.py's oracle)."""
    from test_beam import ROWS, assert_rows_equal, batch_inputs, beams, by_hand, row_inputs, same_kept, zoo

    model, _ = zoo("llava_next")
    x = batch_inputs("llava_next")
    with torch.no_grad(), tokprune.pruned(model, method, keep=2, tile_budget="per_tile_reference"):
        got = model.generate(**x, **beams(2))
        rec = tokprune.last_record(model)
        refs = [(by_hand(model, row_inputs("llava_next", r), **beams(2)), tokprune.last_record(model))
                for r in range(len(ROWS))]
    assert all(n % 4 == 0 for row in rec.n_visual for n in row)  # whole tiles: the spatial layout
    for row, (ref, ref_rec) in enumerate(refs):
        assert_rows_equal(got, ref, slice(2 * row, 2 * (row + 1)))
        assert same_kept(rec, ref_rec, slice(2 * row, 2 * (row + 1)))
