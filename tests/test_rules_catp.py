"""CATP rules: facility-location greedy (known optimum, marginal gains, equal to a slow loop), budgets, stage 2."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokprune.rules.catp import (
    attention_increase,
    context_scores,
    facility_location_greedy,
    masked_mean,
    per_image_counts,
    pool_keep,
    prune_ratio,
    query_scores,
    select_pool,
    stage1_counts,
    stage1_select,
)


def _basis():
    e = torch.eye(3)
    return torch.stack([e[0], e[0], e[1], e[2]])[None]  # two copies of e1, then e2, e3


def _objective(x, y_idx, text, lambda1):
    sim = (torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1) + 1) / 2
    al = (torch.nn.functional.cosine_similarity(x, text[None], dim=-1) + 1) / 2
    if not y_idx:
        return 0.0
    y = list(y_idx)
    return float(sim[y].max(dim=0).values.sum() + lambda1 * al[y].sum())


def test_greedy_picks_the_known_optimum():
    x = _basis()
    text = torch.tensor([[0.0, 0.0, 1.0]])
    # lambda1 = 0: F({e1}) = 1 + 1 + .5 + .5 = 3 is the best first pick; then e2 and e3 both gain .5 (lower index)
    assert facility_location_greedy(x, text, 2, lambda1=0.0).tolist() == [[0, 2]]
    # with alignment to e3 the second pick is e3 (gain .5 + .7) not e2 (.5 + .35); the duplicate e1 gains 0
    assert facility_location_greedy(x, text, 2, lambda1=0.7).tolist() == [[0, 3]]
    best = max(itertools.combinations(range(4), 2), key=lambda c: _objective(x[0], c, text[0], 0.7))
    assert sorted(best) == [0, 3]
    assert facility_location_greedy(x, text, 4, lambda1=0.7)[0, -1].item() == 1  # the duplicate comes last


def _slow_greedy(x, text, k, lambda1):
    """Plain greedy: recompute F(Y + t) - F(Y) from scratch for every candidate."""
    chosen = []
    for _ in range(k):
        base = _objective(x, chosen, text, lambda1)
        gains = [
            (_objective(x, chosen + [t], text, lambda1) - base, -t) for t in range(x.shape[0]) if t not in chosen
        ]
        chosen.append(-max(gains)[1])
    return chosen


def test_vectorised_equals_slow_loop_batched_with_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 5, generator=g)
    text = torch.randn(3, 5, generator=g)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 9:] = False  # image 1 has 9 tokens, image 2 has 6
    valid[2, 6:] = False
    k = torch.tensor([7, 5, 3])
    got = facility_location_greedy(x, text, k, lambda1=0.7, valid=valid)
    for i in range(3):
        n = int(valid[i].sum())
        want = _slow_greedy(x[i, :n], text[i], int(k[i]), 0.7)
        assert got[i, : int(k[i])].tolist() == want
        assert (got[i, int(k[i]) :] == -1).all()


def test_marginal_gains_are_non_increasing():
    # submodularity: the objective's increments along the greedy path never grow
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 10, 4, generator=g), torch.randn(1, 4, generator=g)
    path = facility_location_greedy(x, text, 10, lambda1=0.0)[0].tolist()
    vals = [_objective(x[0], path[:i], text[0], 0.0) for i in range(11)]
    inc = [b - a for a, b in zip(vals, vals[1:])]
    assert all(b <= a + 1e-5 for a, b in zip(inc, inc[1:]))


def test_ratios_and_counts():
    assert prune_ratio(prune_ratio=0.778) == pytest.approx(0.778)
    assert prune_ratio(keep_ratio=0.222) == pytest.approx(0.778)
    with pytest.raises(ValueError, match="exactly one"):
        prune_ratio(keep_ratio=0.2, prune_ratio=0.8)
    with pytest.raises(ValueError, match="exactly one"):
        prune_ratio()
    assert stage1_counts([576, 1280], 0.778).tolist() == [351, 782]  # floor(576 * .611), floor(1280 * .611)
    assert pool_keep(4 * 576, 0.778) == 511  # floor(2304 * .222)
    # total removed is the requested fraction within one token per image (5 images of 576)
    kept = pool_keep(4 * 576, 0.778) + pool_keep(576, 0.778)
    assert abs((5 * 576 - kept) - 0.778 * 5 * 576) <= 5


def test_stage1_select_sorted_and_padded():
    x = _basis()
    sel = stage1_select(x, torch.tensor([[0.0, 0.0, 1.0]]), r=1.0)  # keep floor(4 * .5) = 2
    assert sel.tolist() == [[0, 3]]
    x2 = torch.cat([x, x])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    sel2 = stage1_select(x2, torch.tensor([[0.0, 0.0, 1.0]] * 2), r=0.5, valid=valid)  # 3 and floor(2.25) = 2
    assert sel2.tolist() == [[0, 2, 3], [0, 2, -1]]


def test_stage2_scores_known_and_counts_adapt():
    a_k = torch.tensor([[0.30, 0.10, 0.20, 0.05, 0.25, 0.10]])
    a_km1 = torch.tensor([[0.10, 0.20, 0.20, 0.00, 0.05, 0.10]])
    torch.testing.assert_close(attention_increase(a_k, a_km1), torch.tensor([[0.2, 0.0, 0.0, 0.05, 0.2, 0.0]]))
    hid = torch.tensor([[[1.0, 0], [0, 1], [1, 1], [1, 0], [-1, 0], [0, -1]]])
    vq = torch.tensor([[1.0, 0.0]])
    s = context_scores(a_k, a_km1, hid, vq, lambda2=0.6)
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.0, 0.6 * 2**-0.5, 0.65, -0.4, 0.0]]))
    kept = select_pool(s, 3)[0]
    assert kept.tolist() == [0, 2, 3]
    image_of = torch.tensor([0, 0, 0, 1, 1, 1])  # two demonstrations of 3 tokens
    assert per_image_counts(kept, image_of, 2).tolist() == [2, 1]  # adapted, not 50:50
    vc = masked_mean(hid, torch.tensor([[True, False, True, True, False, False]]))
    torch.testing.assert_close(vc, torch.tensor([[1.0, 1 / 3]]))
    q = query_scores(torch.tensor([[[3.0, 1.0], [0.0, 1.0]]]), vc)
    assert q[0, 0] > 0.99 and q[0, 1] == pytest.approx(0.316, abs=1e-3)


def test_random_stage2_equals_loop():
    g = torch.Generator().manual_seed(2)
    a_k, a_km1 = torch.rand(2, 20, generator=g), torch.rand(2, 20, generator=g)
    hid, vq = torch.randn(2, 20, 8, generator=g), torch.randn(2, 8, generator=g)
    s = context_scores(a_k, a_km1, hid, vq)
    for b in range(2):
        for j in range(20):
            cos = float(hid[b, j] @ vq[b] / (hid[b, j].norm() * vq[b].norm()))
            assert s[b, j].item() == pytest.approx(max(0.0, float(a_k[b, j] - a_km1[b, j])) + 0.6 * cos, abs=1e-5)
    kept = select_pool(s, 7)
    for b in range(2):
        assert kept[b].tolist() == sorted(sorted(range(20), key=lambda j: -float(s[b, j]))[:7])


def test_coverage_mean_weighs_the_alignment_by_the_token_count():
    # e1 twice, e2, e3; text along e3. First pick, sum (the paper's F_div): e1 gains 3 + .7 * .5 = 3.35, e3
    # gains 2.5 + .7 = 3.2 -> e1; mean: 3/4 + .35 = 1.1 vs 2.5/4 + .7 = 1.325 -> e3
    x = _basis()
    text = torch.tensor([[0.0, 0.0, 1.0]])
    assert facility_location_greedy(x, text, 1, lambda1=0.7).tolist() == [[0]]
    assert facility_location_greedy(x, text, 1, lambda1=0.7, coverage="mean").tolist() == [[3]]
    with pytest.raises(ValueError, match="coverage"):
        facility_location_greedy(x, text, 1, coverage="max")


def test_stage2_similarity_rescaled_halves_its_weight_against_the_attention_increase():
    # token 0: increase .5, cos -1; token 1: increase 0, cos 1. cosine: .5 - .6 < .6 -> token 1;
    # rescaled: .5 + 0 < 0 + .6 -> token 1 too; with lambda2 = .4: cosine .1 < .4 (1), rescaled .5 > .4 (0)
    v = torch.tensor([[1.0, 0.0]])
    h = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])
    a_k, a_prev = torch.tensor([[0.6, 0.2]]), torch.tensor([[0.1, 0.3]])
    cos = context_scores(a_k, a_prev, h, v, lambda2=0.4)
    res = context_scores(a_k, a_prev, h, v, lambda2=0.4, similarity="rescaled")
    assert torch.allclose(cos, torch.tensor([[0.1, 0.4]])) and torch.allclose(res, torch.tensor([[0.5, 0.4]]))
    assert select_pool(cos, 1).tolist() == [[1]] and select_pool(res, 1).tolist() == [[0]]
