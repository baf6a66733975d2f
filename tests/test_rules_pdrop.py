"""PyramidDrop rules: stage counts, layer scaling, FLOPs of the default schedule, ranking vs the reference."""

from __future__ import annotations

import math

import pytest
import torch

from tokprune.rules.pdrop import pdrop_ratios, pdrop_scores, pdrop_select, scale_layers, stage_counts


def test_ratios_and_counts():
    assert pdrop_ratios() == (0.5, 0.25, 0.125)
    assert stage_counts(576, pdrop_ratios()) == [288, 144, 72]
    assert stage_counts(576, pdrop_ratios(keep_ratio=0.125)) == [288, 144, 72]  # lambda = 0.5
    r = pdrop_ratios(keep_ratio=0.1)
    assert r[2] == pytest.approx(0.1) and r[0] == pytest.approx(0.1 ** (1 / 3))
    assert stage_counts(576, r) == [267, 124, 57]  # floor(576 * .464), floor(576 * .2154), floor(57.6)
    assert stage_counts(90, (0.7,)) == [62]  # the reference's int(62.99999999999999)
    assert stage_counts(90, (0.7,), tolerance=1e-9) == [63]
    with pytest.raises(ValueError, match="non-increasing"):
        pdrop_ratios(ratios=(0.25, 0.5))
    with pytest.raises(ValueError, match="not both"):
        pdrop_ratios(keep_ratio=0.5, ratios=(0.5,))


def test_layer_scaling():
    assert scale_layers(32) == (8, 16, 24)
    assert scale_layers(28) == (7, 14, 21)
    assert scale_layers(36) == (9, 18, 27)
    assert scale_layers(24) == (6, 12, 18)
    with pytest.raises(ValueError, match="give layers explicitly"):
        scale_layers(3)


def test_default_schedule_is_1_78_tflops_on_llava_7b():
    d, m, depth = 4096, 11008, 32
    counts = [576] + stage_counts(576, pdrop_ratios())
    cuts = [0, *scale_layers(depth), depth]

    def f(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    total = sum((cuts[i + 1] - cuts[i]) * f(counts[i]) for i in range(4))
    assert round(total / 1e12, 2) == 1.78


def test_scores_known():
    attn = torch.tensor([[[[0.1, 0.3, 0.0], [0.3, 0.1, 0.2]], [[0.1, 0.1, 0.4], [0.3, 0.3, 0.2]]]])  # (1,2,2,3)
    torch.testing.assert_close(pdrop_scores(attn), torch.tensor([[0.2, 0.2, 0.2]]))
    assert pdrop_select(torch.tensor([[0.3, 0.1, 0.5, 0.2]]), 2).tolist() == [[0, 2]]


def _reference_rank(q, k, image_index, n_image, keep, query_pos):
    """pdrop_rank_drop at inference on one sample: the last instruction token's causal row, head mean."""
    t = k.shape[1]
    w = torch.matmul(q[:, query_pos : query_pos + 1], k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    w = w + torch.where(torch.arange(t) > query_pos, float("-inf"), 0.0)
    w = torch.softmax(w, dim=-1).mean(0)[:, image_index : image_index + n_image].mean(0)
    return w.topk(keep).indices.sort().values


def test_training_queries_mean_over_rows():
    # two query rows (training: the tokens before each answer): their mean decides
    attn = torch.tensor([[[[0.9, 0.0, 0.1], [0.0, 0.6, 0.4]]]])
    torch.testing.assert_close(pdrop_scores(attn), torch.tensor([[0.45, 0.3, 0.25]]))
    assert pdrop_select(pdrop_scores(attn), 1).tolist() == [[0]]  # row 2 alone would pick token 1


def test_random_equals_reference_code():
    g = torch.Generator().manual_seed(0)
    h, t, d, img, n_img = 4, 40, 8, 5, 24
    q, k = torch.randn(h, t, d, generator=g), torch.randn(h, t, d, generator=g)
    qp = t - 3  # last prompt token (after it: padding)
    for keep in (1, 7, 12):
        want = _reference_rank(q, k, img, n_img, keep, qp)
        s = (q[:, qp : qp + 1] @ k.transpose(1, 2)) / math.sqrt(d)
        s = s.masked_fill(torch.arange(t) > qp, float("-inf")).softmax(-1)  # full causal row
        got = pdrop_select(pdrop_scores(s[None, :, :, img : img + n_img]), keep)[0]
        assert torch.equal(got, want)
