"""DART: the pivot-and-duplication rule against an independent re-implementation of the authors' code
(``get_retained_image_token`` of ZichenWen1/DART, read in the fork xqy1111111/DART, written here in its own shape:
absolute sequence indices, a Python set of pivots, a list pool), on hand-made inputs with a known answer (the set
order accident and the score order give different kept sets), and on the tiny models (keys of layer K-1 captured
from SDPA's own call, hidden states from ``output_hidden_states``: no tokprune code), with the logits of the
masking oracle. The family x method matrix covers keep-all, batching, multi-image, generate and the schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_families import GEN, ZOO, assert_same_generation, inputs

import oracles
import tokprune
from tokprune.pruners.dart import DART
from tokprune.rules import dart as rules


# ---------------------------------------------------------------------------------------------- the reference
def authors_rule(hidden: torch.Tensor, keys: torch.Tensor, start: int, length: int, t: int, pivot_image: int = 4,
                 pivot_text: int = 4) -> list[int]:
    """The authors' selection for one batch-1 prompt: ``hidden`` (N, D) layer K-1's output through the final norm,
    ``keys`` (N, F) its keys with the heads concatenated, the image at ``[start, start + length)``, ``t`` tokens per
    pivot. Returns the kept image tokens' absolute indices, in the order of the set they come from."""
    img_norm = torch.norm(keys[start:start + length], p=1, dim=-1)
    txt_norm = torch.norm(keys[start + length:], p=1, dim=-1)
    image_indices = (img_norm.topk(pivot_image).indices + start).tolist()
    query_indices = (txt_norm.topk(pivot_text).indices + start + length).tolist()
    chosen = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(chosen):
        cos = -F.cosine_similarity(hidden[item, :], hidden[valid_list, :], dim=-1)
        top = cos.topk(t).indices
        real = [valid_list[i] for i in top]
        chosen.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    chosen.difference_update(query_indices)
    return list(chosen)


# ---------------------------------------------------------------------------------------------- hand-made
def crafted() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image slots 0..5 (absolute indices 4..9), text slots 6..12 (10..16); image pivot slot 5 (abs 9), text pivot
    slot 12 (abs 16): CPython iterates ``{9, 16}`` as [16, 9], the text pivot first. Hidden states: pivot I = e1,
    pivot T = e2; token 0 is least similar to both, token 1 next-least similar to I, token 2 next-least to T."""
    n = 13
    keys = torch.full((n, 1, 2), 0.1)
    keys[5] = 5.0
    keys[12] = 5.0
    hidden = torch.tensor([[1.0, 1.0, 0.0]] * n)
    hidden[5] = torch.tensor([1.0, 0.0, 0.0])
    hidden[12] = torch.tensor([0.0, 1.0, 0.0])
    hidden[0] = torch.tensor([-1.0, -1.0, 0.0])
    hidden[1] = torch.tensor([-0.5, 0.9, 0.0])
    hidden[2] = torch.tensor([0.9, -0.5, 0.0])
    absolute = torch.arange(n) + 4
    return hidden, keys, absolute, torch.arange(6), torch.arange(6, 13)


def test_pivot_order_is_the_sets_by_default_and_score_order_as_an_option():
    hidden, keys, absolute, pos, text = crafted()
    ref = DART(pivot_image=1, pivot_text=1)._image(hidden, keys, absolute, pos, text, 3)
    score = DART(pivot_image=1, pivot_text=1, pivot_order="score")._image(hidden, keys, absolute, pos, text, 3)
    # set order [16, 9]: the text pivot takes token 0 first, the image pivot then its next-least similar, token 1
    assert ref.tolist() == [0, 1, 5]
    # score order [9, 16]: the image pivot takes token 0, the text pivot its next-least similar, token 2
    assert score.tolist() == [0, 2, 5]
    # the authors' code on the same tensors, preceded by 4 prompt tokens so that the absolute indices are 4..16
    pre_h, pre_k = torch.tensor([[1.0, 1.0, 0.0]] * 4), torch.full((4, 2), 0.1)
    want = authors_rule(torch.cat([pre_h, hidden]), torch.cat([pre_k, keys.flatten(1)]), 4, 6, 1, 1, 1)
    assert [a - 4 for a in sorted(want)] == ref.tolist()


def test_counts_and_small_budgets():
    assert rules.share_counts(128, 8) == [16] * 8
    assert rules.share_counts(10, 4) == [3, 3, 2, 2]
    hidden, keys, absolute, pos, text = crafted()
    assert DART(pivot_image=4, pivot_text=4)._image(hidden, keys, absolute, pos, text, 2).numel() == 2
    assert DART()._image(hidden, keys, absolute, pos, text, 6).tolist() == list(range(6))  # keep-all


def test_duplicates_of_a_pivot_are_taken_last():
    """Tokens identical to the only pivot (cosine 1) are taken only when nothing else is left."""
    n = 8
    keys = torch.ones(n + 2, 1, 2) * 0.1
    keys[0] = 9.0
    keys[n] = 9.0
    hidden = torch.randn(n + 2, 4, generator=torch.Generator().manual_seed(0))
    hidden[1] = hidden[0]
    hidden[2] = hidden[0] * 3
    hidden[n] = hidden[0]  # the text pivot duplicates the image pivot too
    kept = DART(pivot_image=1, pivot_text=1)._image(hidden, keys, torch.arange(n + 2), torch.arange(n),
                                                     torch.arange(n, n + 2), 7)
    assert 0 in kept.tolist() and not {1, 2} <= set(kept.tolist())


def test_random_inputs_equal_the_authors_code():
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        start, length, n_text = 3 + trial, 40, 9
        n = start + length + n_text
        hidden = torch.randn(n, 16, generator=g)
        keys = torch.randn(n, 2, 8, generator=g)
        t = 2 + trial % 3
        want = sorted(authors_rule(hidden, keys.flatten(1), start, length, t))
        got = DART()._image(hidden, keys, torch.arange(n), torch.arange(start, start + length),
                            torch.arange(start + length, n), 4 + 8 * t)
        assert (got + start).tolist() == want


def test_options_are_validated():
    with pytest.raises(ValueError, match="pivot_order must be one of"):
        DART(pivot_order="sorted")
    with pytest.raises(ValueError, match="pivot_image must be an int >= 1"):
        DART(pivot_image=0)
    with pytest.raises(ValueError, match="reduction_ratio must be in"):
        DART(reduction_ratio=1.0)
    with pytest.raises(ValueError, match="not both"):
        tokprune.apply(ZOO["qwen2_vl"].model, "dart", keep=10, reduction_ratio=0.5)


def test_reduction_ratio_gives_the_reference_count():
    d = DART(reduction_ratio=0.778)
    n = 1024
    assert d.stage_budget(0, n, n // 4) == 4 + 8 * int(n * (1 - 0.778) / 8)
    assert d.stage_budget(0, n, n) == n  # keep-all stays keep-all


# ---------------------------------------------------------------------------------------------- tiny models
class LayerKeys:
    """Records the key tensor SDPA receives inside one decoder layer's attention (no tokprune code)."""

    def __init__(self, model, layer: int) -> None:
        self.attn = model.model.language_model.layers[layer].self_attn
        self.inside, self.keys = False, None

    def __enter__(self):
        self.orig = F.scaled_dot_product_attention
        self.handles = [self.attn.register_forward_pre_hook(lambda *a: setattr(self, "inside", True)),
                        self.attn.register_forward_hook(lambda *a: setattr(self, "inside", False))]

        def spy(q, k, *args, **kw):
            if self.inside:
                self.keys = k.detach()
            return self.orig(q, k, *args, **kw)
        torch.nn.functional.scaled_dot_product_attention = spy
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.orig
        for h in self.handles:
            h.remove()


#: LLaVA-NeXT is left out: the authors count its newlines as image tokens (pivots, pool), tokprune never scores them
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_tiny_model_kept_set_and_logits_equal_the_authors_rule(family):
    fam = ZOO[family]
    layer = 2
    x = inputs(fam, sizes=[(224, 196)])
    ids = x["input_ids"][0]
    img = (ids == fam.image_id).nonzero()[:, 0]
    start, length = int(img[0]), int(img.numel())
    entering = {}
    lm = fam.model.model.language_model

    def grab(mod, args, kw):
        entering.setdefault("h", (args[0] if args else kw["hidden_states"]).detach())

    handle = lm.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with LayerKeys(fam.model, layer - 1) as spy:
            hs = fam.model(**x, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    keys = spy.keys[0].transpose(0, 1).flatten(1)  # (N, heads * d)
    # layer K-1's output as it enters layer K (Qwen3-VL: after the DeepStack addition; elsewhere hidden_states[K])
    if family != "qwen3_vl":
        assert torch.equal(entering["h"], hs[layer])
    hidden = lm.norm(entering["h"])[0]
    t = 1 if length < 30 else 2
    want = sorted(authors_rule(hidden, keys, start, length, t))
    keep = 4 + 8 * t
    assert keep < length
    tokprune.apply(fam.model, "dart", keep=keep)
    try:
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
    finally:
        tokprune.remove(fam.model)
    assert (rec.kept[0][0] + start).tolist() == want
    mask = ids != fam.image_id
    mask[torch.tensor(want)] = True
    with oracles.CutMask(fam.model, [(layer, mask[None])]):
        ref = fam.model(**x).logits
        ref_gen = fam.model.generate(**x, **GEN)
    assert (out[0] - ref[0, mask]).abs().max() <= 1e-5
    assert_same_generation(gen, ref_gen)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_static_cache_and_sdpa_eager(family):
    from tokprune.testing import tiny_model
    x = inputs(ZOO[family])
    kept = []
    for attn in ("sdpa", "eager"):
        model, _ = tiny_model(family, attn=attn)
        with tokprune.pruned(model, "dart", keep=5):
            dyn = model.generate(**x, **GEN)
            kept.append(tokprune.last_record(model).kept)
            if attn == "sdpa":
                sta = model.generate(**x, cache_implementation="static", **GEN)
                assert_same_generation(dyn, sta)
    assert all(torch.equal(a, b) for ra, rb in zip(*kept) for a, b in zip(ra, rb))
    assert math.isfinite(float(dyn.logits[0].sum()))


def test_schedule_and_flops_count_the_cut_before_layer_k():
    from tokprune import configs, flops
    cfg = configs.load("llava-1.5-7b")
    sched = tokprune.api.schedule(cfg, "dart", keep=132)
    assert sched.plan() == [(2, 132)]
    ratio = flops.for_budget(cfg, sched, convention="3ndm")
    full = flops.for_budget(cfg, tokprune.api.schedule(cfg, "dart", keep=576), convention="3ndm")
    assert ratio.total < full.total


@torch.no_grad()
def test_reduction_ratio_alone_is_the_budget():
    fam = ZOO["qwen2_vl"]
    x = inputs(fam, sizes=[(224, 196)])
    n = int((x["input_ids"][0] == fam.image_id).sum())
    with tokprune.pruned(fam.model, "dart", reduction_ratio=0.778):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    assert rec.n_kept == [[4 + 8 * int(n * (1 - 0.778) / 8)]]
