"""VisionZip rules: known dominant set, contextual assignment and merge weights; the reference code's rule."""

from __future__ import annotations

import pytest
import torch

from tokprune.rules.visionzip import contextual_merge, visionzip_select, visionzip_split


def test_split_scales_the_paper_54_10():
    assert visionzip_split(64) == (54, 10)
    assert visionzip_split(128) == (108, 20)
    assert visionzip_split(192) == (162, 30)
    assert visionzip_split(64, dominant=60) == (60, 4)
    assert visionzip_split(64, contextual=0) == (64, 0)
    with pytest.raises(ValueError, match="sum to keep"):
        visionzip_split(64, dominant=60, contextual=10)


def _hand_made():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.0, 0.3, 0.8, 0.05, 0.01]])  # dominant patches: 1 and 5
    metric = torch.tensor(
        [[[1.0, 0.0], [9.0, 9.0], [2.0, 0.1], [0.1, 3.0], [0.0, 5.0], [9.0, 9.0], [3.0, 1.0], [0.5, 0.6]]]
    )
    hidden = torch.tensor([10.0, 20, 30, 40, 50, 60, 70, 80]).view(1, 8, 1)
    return scores, metric, hidden


def test_known_assignment_and_merge_weights():
    scores, metric, hidden = _hand_made()
    sel = visionzip_select(scores, metric, hidden, dominant=3, contextual=2)  # [CLS] + 2 patches
    assert sel.dominant.tolist() == [[1, 5]]
    # remaining [0, 2, 3, 4, 6, 7]; step 6 // 2 = 3 -> targets at positions 0, 3 = patches 0, 4.
    assert sel.targets.tolist() == [[0, 4]]
    # patch 6 = (3, 1): raw dot prefers target 4 (5 > 3) but the normalised keys prefer target 0
    assert sel.assignment.tolist() == [[0, -1, 0, 1, 1, -1, 0, 1]]
    assert sel.sources == [[[0, 2, 6], [4, 3, 7]]]
    # target + mean of its members: 10 + (30 + 70) / 2 ; 50 + (40 + 80) / 2
    assert sel.contextual.flatten().tolist() == [60.0, 110.0]


def test_target_nobody_joins_stays_itself():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2]]])
    hidden = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    tokens, targets, assign = contextual_merge(metric, hidden, torch.zeros(1, 0, dtype=torch.long), 2)
    assert targets.tolist() == [[0, 2]]  # step 2
    # patch 1 -> target 2? cos((0,1),(1,.1)) = .0995 > cos((0,1),(1,0)) = 0 ; patch 3 -> target 2
    assert assign.tolist() == [[0, 1, 1, 1]]
    assert tokens.flatten().tolist() == [1.0, 3.0 + (2.0 + 4.0) / 2]


def _reference(attn, hidden_full, metric_full, dominant_num, contextual_num):
    """VisionZip's CLIPVisionTower forward on the full sequence ([CLS] at 0), as in the reference code."""
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)
    topk = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_idx = torch.cat([torch.zeros_like(topk[:, :1]), topk], dim=1)
    mask = torch.ones_like(hidden_full[:, :, 0], dtype=torch.bool).scatter_(1, all_idx, False)
    b, n, d = hidden_full.shape
    dom = hidden_full.masked_select(~mask[..., None]).view(b, dominant_num + 1, d)
    met = metric_full[mask].view(b, n - dominant_num - 1, -1)
    hid = hidden_full.masked_select(mask[..., None]).view(b, n - dominant_num - 1, d)
    met = met / met.norm(dim=-1, keepdim=True)
    step = max(1, met.shape[1] // contextual_num)
    t_idx = torch.arange(0, met.shape[1], step)[:contextual_num]
    others = ~torch.isin(torch.arange(met.shape[1]), t_idx)
    sim = torch.bmm(met[:, others], met[:, t_idx].transpose(1, 2))
    one = torch.zeros(b, int(others.sum()), contextual_num).scatter_(2, sim.argmax(2)[..., None], 1)
    counts = one.sum(1).clamp(min=1)[..., None]
    ctx = hid[:, t_idx] + torch.bmm(one.transpose(1, 2), hid[:, others]) / counts
    return torch.cat([dom, ctx], dim=1)


@pytest.mark.parametrize("dominant,contextual", [(54, 10), (20, 7), (5, 30)])
def test_random_equals_reference_code(dominant, contextual):
    g = torch.Generator().manual_seed(dominant)
    b, n, heads = 2, 1 + 81, 4
    attn = torch.rand(b, heads, n, n, generator=g).softmax(-1)
    hidden_full = torch.randn(b, n, 16, generator=g)
    metric_full = torch.randn(b, n, 8, generator=g)
    ref = _reference(attn, hidden_full, metric_full, dominant - 1, contextual)
    sel = visionzip_select(
        attn[:, :, 0, 1:].sum(dim=1), metric_full[:, 1:], hidden_full[:, 1:], dominant, contextual
    )
    ours = torch.cat(
        [hidden_full[:, :1], torch.gather(hidden_full[:, 1:], 1, sel.dominant[..., None].expand(-1, -1, 16)),
         sel.contextual],
        dim=1,
    )
    torch.testing.assert_close(ours, ref)
    # every non-dominant patch is absorbed exactly once
    for per in sel.sources:
        flat = sorted(j for s in per for j in s)
        assert len(flat) == 81 - (dominant - 1)


def test_cls_free_variant_uses_every_slot_for_patches():
    scores, metric, hidden = _hand_made()
    sel = visionzip_select(scores, metric, hidden, dominant=3, contextual=2, with_cls=False)
    assert sel.dominant.tolist() == [[1, 4, 5]]  # 3 patches by received attention, no [CLS] slot
    # remaining [0, 2, 3, 6, 7]: step 2 -> targets patches 0 and 3
    assert sel.targets.tolist() == [[0, 3]]
    assert sum(len(s) for s in sel.sources[0]) == 5
