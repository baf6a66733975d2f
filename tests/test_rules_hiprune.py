"""HiPrune rules: hand-made grids with known anchors/buffers/registers, and the reference code's loop."""

from __future__ import annotations

import pytest
import torch

from tokprune.rules.hiprune import (
    anchor_count,
    buffer_indices,
    hiprune_select,
    merge_unit_scores,
    received_attention,
    tile_budget,
)


def _idx(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def _grid_scores():
    # 4x4 grid, width 4. Anchors (object layer) = 3 (row 0, right edge) and 9 (row 2, col 1).
    obj = torch.zeros(16)
    obj[3], obj[9] = 0.9, 0.8
    obj[6] = 0.1  # third best: not an anchor with 2 anchors
    # deep layer: chosen tokens score highest (must still not be picked twice), then 15 > 1 > 6 > 11 > 0 > 4
    deep = torch.full((16,), 0.001)
    deep[9], deep[3], deep[13] = 0.5, 0.4, 0.3
    for rank, t in enumerate([15, 1, 6, 11, 0, 4]):
        deep[t] = 0.2 - 0.01 * rank
    return obj, deep


def test_anchor_count_rounding():
    assert anchor_count(192, 0.1) == 4  # 3.84
    assert anchor_count(128, 0.1) == 3  # 2.56
    assert anchor_count(64, 0.1) == 1  # 1.28
    assert anchor_count(125, 0.1) == 2  # 2.5 -> 2: Python's round is half to even, as the reference's
    assert anchor_count(12, 1.0) == 2
    assert tile_budget(640, 5) == 128 and tile_budget(160, 3) == 53


def test_row_edge_anchor_wrap_rows_true_reference():
    obj, deep = _grid_scores()
    sel = hiprune_select(obj, deep, width=4, keep=12, alpha=1.0, wrap_rows=True)
    assert sorted(sel.anchors.tolist()) == [3, 9]
    # anchor 3: 2, 4 (wraps to row 1), -1 -> clamped to 0; 7.  anchor 9: 8, 10, 5, 13
    assert _idx(sel.buffer_mask) == [0, 2, 4, 5, 7, 8, 10, 13]
    assert _idx(sel.register_mask) == [1, 15]
    assert sel.kept.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 13, 15]


def test_row_edge_anchor_true_2d_neighbours():
    obj, deep = _grid_scores()
    sel = hiprune_select(obj, deep, width=4, keep=12, alpha=1.0, wrap_rows=False)
    # anchor 3 has only its left (2) and lower (7) neighbours
    assert _idx(sel.buffer_mask) == [2, 5, 7, 8, 10, 13]
    assert _idx(sel.register_mask) == [1, 6, 11, 15]
    assert sel.kept.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 13, 15]


def test_bottom_row_clamp_and_overlapping_buffers_give_more_registers():
    obj = torch.zeros(16)
    obj[14], obj[13] = 0.9, 0.8  # adjacent anchors on the last row: buffers overlap
    deep = torch.arange(16, dtype=torch.float32) / 100
    sel = hiprune_select(obj, deep, width=4, keep=9, alpha=1.0)  # round(1.8) = 2 anchors
    # 14: 13, 15, 10, 18 -> 15 ; 13: 12, 14, 9, 17 -> 15   => {9, 10, 12, 13, 14, 15}
    assert _idx(sel.anchor_mask | sel.buffer_mask) == [9, 10, 12, 13, 14, 15]
    assert _idx(sel.register_mask) == [7, 8, 11]  # 9 - 6 = 3 registers, best remaining deep scores
    assert sel.kept.numel() == 9
    sel2 = hiprune_select(obj, deep, width=4, keep=9, alpha=1.0, wrap_rows=False)
    assert _idx(sel2.anchor_mask | sel2.buffer_mask) == [9, 10, 12, 13, 14, 15]


def test_zero_anchors_gives_registers_only():
    deep = torch.arange(16, dtype=torch.float32)
    sel = hiprune_select(torch.linspace(0, 1, 16), deep, width=4, keep=10, alpha=0.1)  # round(0.2) = 0 anchors
    assert sel.anchors.numel() == 0 and not sel.buffer_mask.any()
    assert sel.kept.tolist() == list(range(6, 16))


def test_buffer_indices_missing_neighbours():
    a = torch.tensor([[0, 5, 15]])
    assert buffer_indices(a, 4, 16, wrap_rows=True).tolist() == [[0, 4, 14, 1, 6, 15, 0, 1, 11, 4, 9, 15]]
    assert buffer_indices(a, 4, 16, wrap_rows=False).tolist() == [[-1, 4, 14, 1, 6, -1, -1, 1, 11, 4, 9, -1]]


def test_too_many_anchors_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="lower alpha"):
        hiprune_select(torch.eye(16)[5], torch.zeros(16), width=4, keep=3, alpha=2.0)  # 1 interior anchor: 5 tokens
    # the same anchor in a corner has only 3 distinct tokens (0, 1, 4 after clamping): fits keep=3 exactly
    assert hiprune_select(torch.eye(16)[0], torch.zeros(16), width=4, keep=3, alpha=2.0).kept.tolist() == [0, 1, 4]


def _reference_loop(obj, deep, width, keep, alpha):
    """The reference's encode_images rule, one image at a time (CLIP: mean statistic, -1 exclusion)."""
    out = []
    n = obj.shape[1]
    for i in range(obj.shape[0]):
        na = round(keep * alpha / 5)
        a = torch.topk(obj[i], na).indices
        s = torch.cat([a, a - 1, a + 1, a - width, a + width]).clamp(0, n - 1).unique()
        d = deep[i].clone()
        m = torch.zeros(n, dtype=torch.bool)
        m[s] = True
        d -= m.int()
        r = torch.topk(d, keep - s.numel()).indices
        out.append(torch.cat([s, r]).sort().values)
    return torch.stack(out)


def _true_neighbour_loop(obj, deep, width, keep, alpha):
    out = []
    n = obj.shape[1]
    rows = n // width
    for i in range(obj.shape[0]):
        na = round(keep * alpha / 5)
        chosen = set()
        for a in torch.topk(obj[i], na).indices.tolist():
            r, c = divmod(a, width)
            chosen.add(a)
            for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                if 0 <= r + dr < rows and 0 <= c + dc < width:
                    chosen.add((r + dr) * width + c + dc)
        rest = sorted(set(range(n)) - chosen, key=lambda t: -float(deep[i, t]))
        out.append(sorted(chosen | set(rest[: keep - len(chosen)])))
    return torch.tensor(out)


@pytest.mark.parametrize("keep,alpha", [(40, 0.1), (64, 0.5), (30, 1.0)])
def test_random_equals_reference_code(keep, alpha):
    g = torch.Generator().manual_seed(keep)
    attn = torch.rand(3, 2, 145, 145, generator=g).softmax(-1)  # 1 CLS + 12x12 patches
    obj = received_attention(attn, drop_cls=True)
    deep = received_attention(torch.rand(3, 2, 145, 145, generator=g).softmax(-1), drop_cls=True)
    sel = hiprune_select(obj, deep, width=12, keep=keep, alpha=alpha)
    assert torch.equal(sel.kept, _reference_loop(obj, deep, 12, keep, alpha))
    sel2 = hiprune_select(obj, deep, width=12, keep=keep, alpha=alpha, wrap_rows=False)
    assert torch.equal(sel2.kept, _true_neighbour_loop(obj, deep, 12, keep, alpha))
    assert (sel2.anchor_mask.sum(1) + sel2.buffer_mask.sum(1) + sel2.register_mask.sum(1) == keep).all()


def test_received_attention_and_merge_units():
    attn = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]]])  # (1, 2 heads, 2, 2)
    assert received_attention(attn).tolist() == [[0.5, 0.5]]
    assert received_attention(attn, drop_cls=True).tolist() == [[0.5]]
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 6.0, 8.0]])
    assert merge_unit_scores(s).tolist() == [[1.0, 5.0]]
    assert merge_unit_scores(s, reverse_indices=torch.tensor([1, 0])).tolist() == [[5.0, 1.0]]
