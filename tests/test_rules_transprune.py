"""TransPrune rules: TTV on vectors of known magnitude/direction, IGA rows, schedule, the reference rank-drop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokprune.rules.transprune import (
    DEFAULT_LAYERS,
    accumulate_ttv,
    iga_scores,
    layers_accumulated_before,
    normalise,
    transition_weight,
    transprune_counts,
    transprune_scores,
    transprune_select,
)


def test_ttv_known_magnitude_and_direction():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    y = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])  # same dir x2, orthogonal x3, opposite x1
    z = 1 + math.e + math.e**2  # softmax of delta = (0, 1, 2)
    torch.testing.assert_close(transition_weight(x, y), torch.tensor([[2 / z, 3 * math.e / z, math.e**2 / z]]))
    zp = 2 + math.e  # paper: 1 - |cos| = (0, 1, 0)
    want = torch.tensor([[2 / zp, 3 * math.e / zp, 1 / zp]])
    torch.testing.assert_close(transition_weight(x, y, direction="paper"), want)
    # padding excluded from the softmax
    valid = torch.tensor([[True, True, False]])
    zv = 1 + math.e
    torch.testing.assert_close(transition_weight(x, y, valid), torch.tensor([[2 / zv, 3 * math.e / zv, 0.0]]))
    with pytest.raises(ValueError, match="paper"):
        transition_weight(x, y, direction="abs")


def test_schedule_and_accumulation_layers():
    assert transprune_counts(576) == [504, 360, 72]
    assert [layers_accumulated_before(c) for c in DEFAULT_LAYERS] == [(6,), (6, 7, 8), (6, 7, 8, 9, 10, 11)]


def test_default_schedule_is_1_56_tflops_on_llava_7b():
    d, m = 4096, 11008
    counts = [576, *transprune_counts(576)]
    cuts = [0, *DEFAULT_LAYERS, 32]

    def f(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    assert round(sum((cuts[i + 1] - cuts[i]) * f(counts[i]) for i in range(4)) / 1e12, 2) == 1.56


def test_iga_and_combination_known():
    attn = torch.tensor([[[[0.2, 0.1, 0.1], [0.0, 0.3, 0.1]]]])  # (1, 1 head, 2 instruction rows, 3 image)
    iga = iga_scores(attn)
    torch.testing.assert_close(iga, torch.tensor([[0.1, 0.2, 0.1]]))
    ttv = torch.tensor([[3.0, 0.0, 1.0]])
    s = transprune_scores(ttv, iga)  # (.75, 0, .25) + (.25, .5, .25)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.5, 0.5]]), atol=1e-6, rtol=0)
    assert transprune_select(s, 1).tolist() == [[0]]
    torch.testing.assert_close(transprune_scores(ttv, iga, alpha=0.25), torch.tensor([[0.375, 0.375, 0.25]]))
    torch.testing.assert_close(normalise(torch.zeros(1, 2)), torch.zeros(1, 2))  # no NaN on an all-zero vector


def _ref_transf(before, after):
    """compute_transf_weight of the reference (batch 1)."""
    ratio = torch.norm(after, dim=-1) / torch.norm(before, dim=-1)
    e = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
    return ratio * (e / e.sum())


def test_random_three_cuts_equal_reference_rank_drop():
    g = torch.Generator().manual_seed(0)
    d, n0, img = 6, 32, 3  # 3 system tokens, 32 image tokens, then 5 instruction tokens
    text = 5
    ratios = (0.875, 0.625, 0.125)
    # reference state: per-layer full-sequence weights, re-indexed after each cut
    ref_weights, our_weights = [], []
    n = n0
    cur_img = torch.arange(n0)  # original image indices alive
    ref_alive = torch.arange(n0)
    for layer in range(12):
        t = img + n + text
        if layer in (6, 7, 8, 9, 10, 11):
            x1, y1, x2, y2 = (torch.randn(1, t, d, generator=g) for _ in range(4))
            w = _ref_transf(x1, y1) + _ref_transf(x2, y2)
            ref_weights.append(w[0])
            ours = transition_weight(x1, y1) + transition_weight(x2, y2)
            our_weights.append(ours[0, img : img + n])
        cut = layer + 1
        if cut in DEFAULT_LAYERS:
            stage = DEFAULT_LAYERS.index(cut)
            keep = int(n0 * ratios[stage])
            attn = torch.rand(1, 4, text, t, generator=g).softmax(-1)  # instruction rows over the causal row
            # reference
            a = attn[0].mean(0)[:, img : img + n].mean(0)
            acc = torch.zeros(n)
            for w in ref_weights:
                acc += w[img : img + n]
            score = acc / (acc.sum() + 1e-8) + a / (a.sum() + 1e-8)
            top = score.topk(keep).indices.sort().values
            ref_weights = [torch.cat([w[:img], w[img + top], w[img + n :]]) for w in ref_weights]
            ref_alive = ref_alive[top]
            # ours
            assert len(our_weights) == len(layers_accumulated_before(cut))
            s = transprune_scores(accumulate_ttv([w[None] for w in our_weights]), iga_scores(attn[..., img : img + n]))
            idx = transprune_select(s, keep)[0]
            our_weights = [w[idx] for w in our_weights]
            cur_img = cur_img[idx]
            assert torch.equal(cur_img, ref_alive)
            n = keep
    assert n == 4
