"""LLaVA-OneVision specifics on the tiny model (the family x method matrix runs in tests/test_families.py).

What the matrix does not reach: an anyres_max interpolated crop grid and its tiles, true multi-image samples
(``batch_num_images`` > 1: base tile + one newline per image), mixed batches of those, the refusals (video, an
in-encoder cut, [CLS] methods) and the keyword calls into HF's ``pack_image_features``. References are the
unpatched model fed the kept tokens (``mm_encoder_outputs``) or the masking oracle of ``tests/oracles.py``.
"""

from __future__ import annotations

import pytest
import torch

import oracles
import tokprune
from tokprune.testing import image_prompt, make_image, tiny_model

TOL = 1e-5
N_NEW = 6
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)
SIZES = [(112, 84), (168, 84)]  # (W, H): a 2x2-tile image (crop grid 4x4 -> resized to 2x2) and a 1x2-tile one


@pytest.fixture(scope="module")
def ov():
    return tiny_model("llava_onevision")


@pytest.fixture(autouse=True)
def _unpatched(ov):
    yield
    tokprune.remove(ov[0])


def images(sizes=SIZES, seed: int = 0):
    return [make_image(w, h, seed=seed + j) for j, (w, h) in enumerate(sizes)]


@torch.no_grad()
def fed_kept(model, x, kept: list[torch.Tensor], generate: bool = False):
    """The unpatched model fed only the kept visual tokens of a one-row prompt (contiguous positions, as the
    unpatched model numbers a shorter prompt)."""
    out = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"],
                                         batch_num_images=x["batch_num_images"], return_dict=True)
    ids = x["input_ids"]
    pos = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    keep = ids[0] != model.config.image_token_id
    for run, k in zip(torch.split(pos, [f.shape[0] for f in out.pooler_output]), kept):
        keep[run[k]] = True
    fed = out.__class__(**dict(out.items()))
    fed.pooler_output = [f[k] for f, k in zip(out.pooler_output, kept)]
    kw = dict(input_ids=ids[:, keep], mm_encoder_outputs={"image": fed})
    if not generate:
        return model(**kw).logits
    return oracles.greedy_decode(model, N_NEW, position_ids=torch.arange(int(keep.sum()))[None], **kw)


def test_the_tiny_model_resizes_one_crop_grid_and_not_the_other(ov):
    model, proc = ov
    x = proc(images=images(), text=image_prompt(proc, 2), return_tensors="pt")
    feats = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    # base 2x2 + crop grid + one newline per crop row: 4x4 resized to 2x2 (anyres_max_2), 2x4 kept as it is
    assert [f.shape[0] for f in feats] == [4 + 2 * 2 + 2, 4 + 2 * 4 + 2]


def test_tiles_of_a_resized_grid_and_the_per_tile_budget(ov):
    """The 4x4 crop grid of a 2x2-tile image, halved by the bilinear resize: each resized token is the mean of a
    2x2 block of patches, which lies in one tile (tile side 2 patches), so the layout is known by hand."""
    model, proc = ov
    x = proc(images=images(), text=image_prompt(proc, 2), return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "vispruner", keep=5, tile_budget="per_tile"):
        model(**x)
        adapter = model.tokprune._adapter
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"],
                                               batch_num_images=x["batch_num_images"]).pooler_output
        layout = adapter.tile_layout(list(feats))
        rec = tokprune.last_record(model)
    assert layout[0].tolist() == [0, 0, 0, 0, 1, 2, -1, 3, 4, -1]
    assert layout[1].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, -1, 1, 1, 2, 2, -1]
    kept = rec.kept[0][0]
    content = kept[layout[0][kept] >= 0]
    # keep 5 over tiles of 4, 1, 1, 1, 1 content tokens: one per tile, and both newlines on top
    assert sorted(layout[0][content].tolist()) == [0, 1, 2, 3, 4]
    assert set(kept.tolist()) >= {6, 9}


@pytest.mark.parametrize("method", ["random", "vispruner", "divprune"])
def test_multi_image_sample_keeps_k_like_the_model_fed_them(ov, method):
    """A nested image list: one sample, two images, each its base tile (4 tokens) plus one newline."""
    model, proc = ov
    x = proc(images=[images()], text=image_prompt(proc, 2), return_tensors="pt")
    assert x["batch_num_images"].tolist() == [2]
    k = 2
    with torch.no_grad():
        tokprune.apply(model, method, keep=k)
        out = model(**x).logits
        gen = model.generate(**x, **GEN)
        rec = tokprune.last_record(model)
        tokprune.remove(model)
        ref = fed_kept(model, x, rec.kept[0])
        ref_gen = fed_kept(model, x, rec.kept[0], generate=True)
    assert rec.n_visual == [[5, 5]] and rec.n_kept == [[k + 1, k + 1]]
    assert all(int(kept[-1]) == 4 for kept in rec.kept[0])  # the newline is kept
    assert (out - ref).abs().max() <= TOL
    assert torch.equal(gen.sequences[:, -N_NEW:], ref_gen.sequences[:, -N_NEW:])
    assert max((a - b).abs().max().item() for a, b in zip(gen.logits, ref_gen.logits)) <= TOL


def test_multi_image_fastv_equals_the_masking_oracle(ov):
    model, proc = ov
    x = proc(images=[images()], text=image_prompt(proc, 2), return_tensors="pt")
    with torch.no_grad():
        tokprune.apply(model, "fastv", keep=2, layer=2)
        out = model(**x).logits
        rec = tokprune.last_record(model)
        tokprune.remove(model)
        ids = x["input_ids"][0]
        runs = torch.split((ids == model.config.image_token_id).nonzero()[:, 0], rec.n_visual[0])
        keep = ids != model.config.image_token_id
        for run, kept in zip(runs, rec.kept[0]):
            keep[run[kept]] = True
        with oracles.CutMask(model, [(2, keep[None])]):
            ref = model(**x).logits
    assert rec.n_kept == [[3, 3]]
    assert (out[0] - ref[0, keep]).abs().max() <= TOL


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_batch_of_a_two_image_sample_and_an_anyres_one_matches_single_runs(ov, method):
    """batch_num_images [2, 1]: the first sample's images are base tiles only, the second's is tiled (anyres)."""
    model, proc = ov
    ims = images([(112, 84), (56, 84), (84, 112)])
    texts = [image_prompt(proc, 2, "compare the first and second picture ?"), image_prompt(proc, 1, "what ?")]
    batch = proc(images=[ims[:2], ims[2:]], text=texts, return_tensors="pt", padding=True)
    assert batch["batch_num_images"].tolist() == [2, 1] and (batch["attention_mask"] == 0).any()
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5):
        gen = model.generate(**batch, **GEN)
        rec = tokprune.last_record(model)
        singles = [model.generate(**proc(images=[im], text=t, return_tensors="pt"), **GEN)
                   for t, im in zip(texts, (ims[:2], ims[2:]))]
    assert rec.n_visual[0] == [5, 5] and rec.n_visual[1][0] > 5
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


def test_video_inputs_raise(ov):
    model, proc = ov
    x = proc(images=images()[:1], text=image_prompt(proc, 1), return_tensors="pt")
    tokprune.apply(model, "random", keep=2)
    with pytest.raises(Exception, match="does not prune video inputs"):
        model(**x, pixel_values_videos=torch.zeros(1, 2, 3, 28, 28))


def test_methods_that_need_what_siglip_lacks_refuse(ov):
    model, _ = ov
    with pytest.raises(tokprune.UnsupportedError, match=r"no \[CLS\] token.*fastv.*random"):
        tokprune.apply(model, "cls", keep=4)
    with pytest.raises(tokprune.UnsupportedError, match=r"drops tokens inside the vision encoder.*fastv.*visionzip"):
        tokprune.apply(model, "flowcut", keep=4)
    assert not tokprune.is_patched(model)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_pack_image_features_is_called_by_keyword(family, monkeypatch):
    """HF may reorder its private ``pack_image_features`` parameters (OneVision's order differs from NeXT's; a
    positional call written for one breaks on the other): tokprune's calls are by keyword, so a reordered version
    gives the same pruned logits; a renamed parameter fails at ``apply``, naming it."""
    model, proc = tiny_model(family)
    x = proc(images=images(), text=image_prompt(proc, 2), return_tensors="pt")
    base_cls = type(model.model)
    original = base_cls.pack_image_features
    with torch.no_grad(), tokprune.pruned(model, "visionzip", keep=4):
        ref = model(**x).logits

    def reordered(self, image_features, image_sizes, image_newline=None, **options):  # OneVision's order on NeXT
        return original(self, image_features=image_features, image_sizes=image_sizes, image_newline=image_newline,
                        **options)

    monkeypatch.setattr(base_cls, "pack_image_features", reordered)
    with torch.no_grad(), tokprune.pruned(model, "visionzip", keep=4):
        assert torch.equal(model(**x).logits, ref)

    def renamed(self, image_features, sizes, image_newline=None, **options):
        return original(self, image_features, sizes, image_newline=image_newline, **options)

    monkeypatch.setattr(base_cls, "pack_image_features", renamed)
    with pytest.raises(RuntimeError, match="has no parameter image_sizes"):
        tokprune.apply(model, "visionzip", keep=4)


@pytest.mark.parametrize("hw", [(384, 384), (768, 768), (500, 1900), (2304, 2304), (1000, 3000)])
def test_flops_token_count_of_the_7b_config_is_the_processors(hw):
    """``tokprune.flops.image_work`` on llava-onevision-7b (anyres_max_9 over up to 6x6 tiles of 27x27 SigLIP
    patches) gives the visual tokens HF's processor writes for an image of that size (the 2304 px square is
    resized: 162x162 -> 81x81)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from tokprune import configs, flops
    config = configs.load("llava-onevision-7b")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                         image_grid_pinpoints=config.image_grid_pinpoints)
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # no video processor needed for the count
    proc.image_processor, proc.num_image_tokens, proc.vision_aspect_ratio = ip, 729, "anyres_max_9"
    work = flops.image_work(config, image_size=hw)
    assert work.llm_tokens == proc._get_number_of_features(*hw, 384, 384)
    assert work.sequences * 729 == work.projector_tokens and work.cls == 0


def test_feature_layer_signal_projects_to_the_features_where_nothing_is_resized(ov):
    """``Signal("hidden_out", feature layer)`` pushed through the packing: on the image whose crop grid is not
    resized its projection is exactly what the LLM receives; on the resized one the packing blends hidden states
    (a blend of projections there: the projector is not linear), so only the base tile and newlines agree."""
    from tokprune.pruners.base import Pruner, Signal, VisionRequest

    seen = {}

    class Hidden(Pruner):
        def vision_request(self, info):
            return VisionRequest((Signal("hidden_out", info.feature_layer),))

        def vision_scores(self, signals):
            seen["signals"] = signals
            return [torch.zeros(len(i)) for i in signals.special]

    model, proc = ov
    x = proc(images=images(), text=image_prompt(proc, 2), return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, Hidden(), keep=2, tile_budget="global"):
        model(**x)
        sig = seen["signals"]
        hidden = sig[Signal("hidden_out", 2)]
        proj = [model.model.multi_modal_projector(h) for h in hidden]
    content = [f[~sp] for f, sp in zip(sig.features, sig.special)]
    assert torch.allclose(proj[1], content[1], atol=1e-5)
    assert torch.allclose(proj[0][:4], content[0][:4], atol=1e-5) and not torch.allclose(proj[0], content[0])


def test_hiprune_selects_per_tile_like_its_reference_rule(ov):
    """Two images whose crop grids are not resized (1x2 and 2x1 tiles of 2x2 patches): HiPrune per tile (received
    attention: SigLIP has no [CLS]) equals its reference rule on each tile's tokens; the tile of every packed token
    is written by hand from the packing order, newlines on top."""
    from test_hiprune import reference_select

    from tokprune.info import model_info
    from tokprune.pruners.hiprune import HiPrune

    model, proc = ov
    x = proc(images=images([(168, 84), (84, 168)]), text=image_prompt(proc, 2), return_tensors="pt")
    tiles = [torch.tensor([0] * 4 + [1, 1, 2, 2, -1] * 2),
             torch.tensor([0] * 4 + [1, 1, -1] * 2 + [2, 2, -1] * 2)]
    k = 9  # 3 per tile: round(1.0 * 3 / 5) = 1 anchor and its 2 true neighbours
    pruner = HiPrune(alpha=1.0, object_layer=0, wrap_rows=False)
    with torch.no_grad():
        tokprune.apply(model, pruner, keep=k)
        out = model(**x).logits
        rec = tokprune.last_record(model)
        tokprune.remove(model)
        obj_layer, deep_layer = pruner.layers(model_info(model))
        obj, deep = oracles.received(model, x, obj_layer), oracles.received(model, x, deep_layer)
        ref = fed_kept(model, x, rec.kept[0])
    assert rec.n_visual == [[14, 16]]
    for j, tile in enumerate(tiles):
        expected = [(tile < 0).nonzero()[:, 0]]
        for t in range(3):
            idx = (tile == t).nonzero()[:, 0]
            expected.append(idx[reference_select(obj[j][idx], deep[j][idx], 2, k // 3, 1.0, wrap_rows=False)])
        assert torch.equal(rec.kept[0][j], torch.cat(expected).sort().values)
    assert (out - ref).abs().max() <= TOL
