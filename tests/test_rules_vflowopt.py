"""VFlowOpt rules: hubs (incl. an empty hub set), patch entropy, recycling weights, LLM stages, budgets."""

from __future__ import annotations

import pytest
import torch

from tokprune.rules.vflowopt import (
    RELEASED,
    RELEASED_25,
    hub_attention,
    importance_map,
    layer_averaged_ratio,
    llm_stage_keep,
    patch_entropy,
    recycle,
    solve_last_ratio,
)


def _attn():
    # 4 tokens, 1 head. Token 2 receives most attention (the hub); its own row decides the importance.
    a = torch.tensor(
        [
            [0.1, 0.1, 0.7, 0.1],
            [0.1, 0.1, 0.7, 0.1],
            [0.5, 0.1, 0.1, 0.3],
            [0.1, 0.1, 0.7, 0.1],
        ]
    )
    return a[None, None]


def test_hub_detection_and_attention_from_hubs():
    c, hubs = hub_attention(_attn(), t=1.5)  # received = (.2, .1, .55, .15), mean .25 -> hub: token 2
    assert hubs.tolist() == [[False, False, True, False]]
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.1, 0.1, 0.3]]))
    c2, hubs2 = hub_attention(_attn(), t=0.7)  # threshold .175: tokens 0 and 2 -> mean of rows 0 and 2
    assert hubs2.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(c2, torch.tensor([[0.3, 0.1, 0.4, 0.2]]))


def test_empty_hub_set_falls_back_to_received_attention():
    c, hubs = hub_attention(_attn(), t=50.0)
    assert not hubs.any()
    assert not torch.isnan(c).any()
    torch.testing.assert_close(c, torch.tensor([[0.2, 0.1, 0.55, 0.15]]))
    # batch: one row with hubs, one without
    both, _ = hub_attention(torch.cat([_attn(), torch.full((1, 1, 4, 4), 0.25)]), t=1.5)
    torch.testing.assert_close(both, torch.tensor([[0.5, 0.1, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]]))


def test_patch_entropy_on_raw_grey_patches():
    img = torch.zeros(1, 3, 14, 42)
    img[..., 0:7, 14:28] = 255.0  # patch 1: half 0, half 255 -> 1 bit
    levels = torch.tensor([0.0, 80.0, 160.0, 255.0]).repeat_interleave(49)  # patch 2: 4 levels x 49 -> 2 bits
    img[0, :, :, 28:42] = levels.view(14, 14)
    ent = patch_entropy(img)
    torch.testing.assert_close(ent, torch.tensor([[0.0, 1.0, 2.0]]), atol=1e-6, rtol=0)
    imp = importance_map(torch.zeros(1, 3), ent, alpha=1.0)
    torch.testing.assert_close(imp, ent.softmax(-1))
    assert torch.equal(importance_map(torch.ones(1, 3), ent, alpha=0.0), torch.ones(1, 3))


def test_recycling_known_cells_and_weights():
    # 4x4 grid, cell a = 2, R1 = .5: drop round(8) + int(16 / 4) = 12 lowest, recycle one per non-empty cell
    imp = torch.tensor([(j + 1) / 2 for j in range(16)])
    imp[[0, 1, 4, 5]] = torch.tensor([16.0, 15, 14, 13])  # the 4 survivors all sit in cell (0, 0)
    feats = torch.arange(16, dtype=torch.float32)[:, None]
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    res = recycle(imp, feats, rows, cols, keep_ratio=0.5, cell=2.0)
    assert res.kept.tolist() == [0, 1, 4, 5, 7, 13, 15]  # cell (0, 0) had nothing dropped: 7 kept, not 8
    assert res.sources == {7: [2, 3, 6, 7], 13: [8, 9, 12, 13], 15: [10, 11, 14, 15]}
    # cell (0, 1): weights (1.5, 2, 3.5, 4) on features (2, 3, 6, 7) -> 58 / 11
    assert res.features[4].item() == pytest.approx(58 / 11)
    assert res.features[:4].flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    assert res.importance.tolist() == [16.0, 15.0, 14.0, 13.0, 4.0, 7.0, 8.0]  # a recycled token keeps its own


def _reference_recycle(imp, feats, width_base, n_base, local_w, a, r1):
    """The reference's stage-1 prune/merge loop (base grid first, then the high-res grid)."""
    feats = feats.clone()
    n = imp.shape[0]
    reduce = round(n * (1 - r1))
    low = torch.sort(imp).indices[: reduce + int(n / (a * a))]
    keep = torch.ones(n, dtype=torch.bool)
    keep[low] = False
    base = low[low < n_base]
    hi = low[low >= n_base] - n_base
    groups = []
    for idx, w in ((base, width_base), (hi, local_w)):
        pts = torch.stack([idx // w, idx % w], dim=1)
        coords = (pts.float() / a).floor().long()
        if idx.numel():
            _, inv = torch.unique(coords, dim=0, return_inverse=True)
            for i in range(int(inv.max()) + 1):
                groups.append(idx[inv == i] + (0 if w == width_base else n_base))
    for gi in groups:
        wts = imp[gi].float()
        wts = wts / wts.sum()
        m = (wts[:, None] * feats[gi]).sum(0)
        r = gi[imp[gi].argmax()]
        feats[r] = m
        keep[r] = True
    return torch.nonzero(keep).flatten(), feats[keep]


@pytest.mark.parametrize("r1,a", [(0.25, 3.0), (0.5, 2.5), (0.1, 5.0)])
def test_random_recycling_equals_reference_code(r1, a):
    g = torch.Generator().manual_seed(int(a * 10))
    nb, wb, lw, lh = 36, 6, 8, 5  # base 6x6, high-res 5 rows x 8
    n = nb + lw * lh
    imp = torch.rand(n, generator=g)
    feats = torch.randn(n, 3, generator=g)
    idx = torch.arange(n)
    rows = torch.where(idx < nb, idx // wb, (idx - nb) // lw)
    cols = torch.where(idx < nb, idx % wb, (idx - nb) % lw)
    group = (idx >= nb).long()
    res = recycle(imp, feats, rows, cols, r1, a, group)
    want_kept, want_feats = _reference_recycle(imp, feats, wb, nb, lw, a, r1)
    assert torch.equal(res.kept, want_kept)
    torch.testing.assert_close(res.features, want_feats)
    assert sorted(j for s in res.sources.values() for j in s) == sorted(
        set(range(n)) - set(res.kept.tolist()) | set(res.sources)
    )


def test_llm_stage_and_budgets():
    assert llm_stage_keep(torch.tensor([0.5, 0.1, 0.9, 0.3]), 0.5).tolist() == [0, 2]
    assert llm_stage_keep(torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2]), 0.5).tolist() == [0, 2, 3]  # round(2.5) = 2
    assert layer_averaged_ratio((0.1166, 1.0, 0.6011), (9, 9, 10)) == pytest.approx(0.100, abs=5e-4)
    assert layer_averaged_ratio(RELEASED_25["ratios"], (9, 9, 10)) == pytest.approx(0.25, abs=2e-3)
    for target, cfg in RELEASED.items():  # every released configuration meets its layer-averaged target
        assert layer_averaged_ratio(cfg["ratios"], (9, 9, 10)) == pytest.approx(target, abs=2e-3)
    r3 = solve_last_ratio(0.1, 0.1166, 1.0, (9, 9, 10))
    assert r3 == pytest.approx(0.6011, abs=2e-3)
    assert solve_last_ratio(0.9, 0.5, 0.5, (9, 9, 10)) == 1.0  # clipped


def test_random_importance_map_equals_reference_code():
    g = torch.Generator().manual_seed(3)
    attn = (4 * torch.randn(2, 3, 16, 16, generator=g)).softmax(-1)
    pixels = torch.randint(0, 256, (2, 3, 56, 56), generator=g).float()
    for t in (0.5, 1.5, 3.0):
        c, _ = hub_attention(attn, t)
        ent = patch_entropy(pixels)
        imp = importance_map(c, ent, alpha=0.3)
        for b in range(2):
            # the reference's per-image loop (siglip_encoder): hubs from received attention, mean of hub rows
            am = attn[b].mean(0)
            rec = am.mean(0)
            hub = torch.nonzero(rec > t * rec.mean(), as_tuple=True)[0]
            want_c = am[hub].mean(0) if hub.numel() else rec  # (+ our empty-hub fallback)
            patches = pixels[b : b + 1].unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5)
            patches = patches.reshape(-1, 3, 14, 14)
            grey = (patches * torch.tensor([0.3333] * 3).view(1, 3, 1, 1)).sum(1).view(16, -1)
            hist = torch.zeros(16, 256).scatter_add_(1, torch.round(grey).long(), torch.ones(16, 196))
            prob = hist / hist.sum(1, keepdim=True)
            want_h = -(prob * torch.log2(prob + 1e-10)).sum(1)
            torch.testing.assert_close(ent[b], want_h)
            torch.testing.assert_close(imp[b], want_c + 0.3 * torch.softmax(want_h, 0))
