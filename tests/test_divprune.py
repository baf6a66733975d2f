"""DivPrune: the greedy max-min rule on hand-made inputs with known answers and against exhaustive search, an
independent re-implementation of the authors' code (vbdi/divprune ``llava_arch.py``: ``DivPrune`` and
``pairwise_cosine_similarity``) on the same inputs, and end to end on every family (kept sets and logits)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_families import (
    GEN,
    TOL,
    ZOO,
    assert_same_generation,
    inputs,
    kept_tokens_reference,
    next_tile_scores,
)

import oracles
import tokprune
from tokprune.pruners.divprune import DivPrune
from tokprune.rules.divprune import cosine_distance, divprune_select, min_pairwise_distance
from tokprune.testing import families, tiny_model


# ---------------------------------------------------------------------------------------------- the authors' rule
def authors_divprune(tokens: torch.Tensor, n_keep: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's selection as its code writes it (one image, (N, D) tokens after the projector): a full
    ``1 - cos`` matrix; pick 0 is the argmax over columns of the second-smallest value of each column; pick i the
    argmax over columns of the minimum over the rows already picked (re-sliced from the matrix at every step).
    Returns the picks in order (not sorted, not de-duplicated). ``dtype``: the arithmetic (the reference runs in
    the model's, fp16)."""
    x = tokens.to(dtype)
    normed = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(normed, normed.t())
    picks = torch.empty(n_keep, dtype=torch.long)
    for i in range(n_keep):
        if i == 0:
            col_scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            col_scores = torch.min(torch.index_select(dist, 0, picks[:i]), dim=0).values
        picks[i] = torch.argmax(col_scores)
    return picks


def angle(features: torch.Tensor, subset) -> float:
    """Smallest pairwise angle (radians) of a subset: the metric whose order 1 - cos follows."""
    d = float(min_pairwise_distance(features, torch.as_tensor(subset)))
    return math.acos(max(-1.0, min(1.0, 1.0 - d)))


def exhaustive(features: torch.Tensor, k: int) -> float:
    """The best min pairwise 1 - cos over every k-subset (tiny sets only)."""
    return max(float(min_pairwise_distance(features, torch.tensor(s))) for s in
               itertools.combinations(range(features.shape[0]), k))


# ---------------------------------------------------------------------------------------------- hand-made
def test_axes_known_max_min_subsets():
    """The six axis directions +-e1..e3 and four mixtures near +e1 / +e2: the most isolated token is -e1 (the first
    of the axes with no mixture near), its farthest is +e1 (distance 2); with six picks, the six axes (min
    distance 1, the optimum: no 7 directions in R^3 are pairwise >= 90 degrees apart)."""
    e = torch.eye(3)
    axes = torch.cat([-e, e])  # -e1, -e2, -e3, +e1, +e2, +e3 at 0..5
    mixtures = torch.stack([e[0] + 0.3 * e[1], e[0] + 0.2 * e[2], e[1] + 0.3 * e[0], e[1] + 0.25 * e[2]])
    x = torch.cat([axes, mixtures])
    sel2 = divprune_select(x, 2)
    assert sel2.order.tolist() == [0, 3]
    assert float(min_pairwise_distance(x, sel2.kept)) == pytest.approx(2.0)
    sel6 = divprune_select(x, 6)
    assert sel6.kept.tolist() == [0, 1, 2, 3, 4, 5]
    assert float(min_pairwise_distance(x, sel6.kept)) == pytest.approx(exhaustive(x, 6)) == pytest.approx(1.0)


def test_duplicates_keep_one_token_per_direction_and_reach_the_optimum():
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(5, 8, generator=g)
    copies = directions.repeat(3, 1) * torch.rand(15, 1, generator=g).add(0.5)  # scaled copies: cosine 1
    perm = torch.randperm(15, generator=g)
    x = copies[perm]
    sel = divprune_select(x, 5)
    assert sorted((perm[sel.kept] % 5).tolist()) == [0, 1, 2, 3, 4]
    assert float(min_pairwise_distance(x, sel.kept)) == pytest.approx(exhaustive(x, 5), abs=1e-6)


def test_three_points_two_picks_is_the_diameter():
    """With three tokens the greedy is exact: the most isolated token is an end of the longest pair, the second
    pick the other end."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(3, 4, generator=g)
        sel = divprune_select(x, 2)
        assert float(min_pairwise_distance(x, sel.kept)) == pytest.approx(exhaustive(x, 2), abs=1e-6)


def test_greedy_is_within_half_the_optimal_angle_on_tiny_sets():
    """Max-min greedy (Gonzalez) is a 2-approximation in a metric; 1 - cos orders pairs as the angle does, so the
    greedy's smallest angle is at least half the exhaustive optimum's; k = n is exact."""
    g = torch.Generator().manual_seed(1)
    for n, k in [(6, 3), (7, 4), (8, 3), (6, 6)]:
        for _ in range(20):
            x = torch.randn(n, 3, generator=g)
            sel = divprune_select(x, k)
            best = max(angle(x, s) for s in itertools.combinations(range(n), k))
            assert angle(x, sel.kept) >= best / 2 - 1e-6
            if k == n:
                assert sel.kept.tolist() == list(range(n))


def test_exact_duplicates_distinct_versus_the_references_bare_argmax():
    """[e1, e1, e1, e2], 3 picks: e2 (the only token with a far neighbour), then e1 (index 0); then every score is 0
    and the reference's argmax re-picks index 0, keeping two distinct tokens; ``distinct`` picks index 1."""
    e = torch.eye(4)
    x = torch.stack([e[0], e[0], e[0], e[1]])
    assert authors_divprune(x, 3).tolist() == [3, 0, 0]
    assert divprune_select(x, 3, distinct=False).order.tolist() == [3, 0, 0]
    assert divprune_select(x, 3).order.tolist() == [3, 0, 1]


@pytest.mark.parametrize("n, d, k", [(16, 8, 5), (64, 32, 20), (576, 64, 64), (577, 48, 1)])
def test_equals_the_authors_rule_on_random_tokens(n, d, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, d, generator=g)
    ref = authors_divprune(x, k)
    sel = divprune_select(x, k)
    assert sel.order.tolist() == ref.tolist()
    assert sel.kept.tolist() == sorted(ref.tolist())


def test_model_dtype_distances_follow_the_authors_half_precision_run():
    """``score_dtype="model"``: the distances in the model's dtype (bf16 here), as the reference's fp16 run; the
    greedy on them picks what the authors' code picks in that dtype (and float32 what it picks in float32)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 64, generator=g).bfloat16()
    ref = authors_divprune(x, 40, dtype=torch.bfloat16)
    assert divprune_select(x, 40, distance=cosine_distance(x, torch.bfloat16)).order.tolist() == ref.tolist()
    assert divprune_select(x, 40).order.tolist() == authors_divprune(x, 40).tolist()


def test_batched_rows_equal_single_rows_and_bad_k_raises():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 30, 6, generator=g)
    sel = divprune_select(x, 7)
    for b in range(3):
        assert torch.equal(sel.kept[b], divprune_select(x[b], 7).kept)
    assert divprune_select(x, 0).kept.shape == (3, 0)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 30\]"):
        divprune_select(x, 31)
    with pytest.raises(TypeError, match="distinct must be True"):
        DivPrune(distinct="yes")


# ---------------------------------------------------------------------------------------------- end to end
def content_tokens(fam, x, j: int, feats: torch.Tensor) -> torch.Tensor:
    """Indices of image ``j``'s content tokens (LLaVA-NeXT: not a newline)."""
    if fam.name not in ("llava_next", "llava_onevision"):
        return torch.arange(feats.shape[0])
    nl = fam.model.model.image_newline.to(feats.dtype)
    return (~(feats == nl).all(-1)).nonzero()[:, 0]


@pytest.mark.parametrize("family", families())
def test_kept_sets_and_logits_equal_the_authors_rule_on_every_family(family):
    """Two images per prompt; the reference runs on the unpatched model's projected tokens of each image (all of
    its content tokens at once on LLaVA-NeXT: ``tile_budget="global"``, the reference's layout)."""
    fam = ZOO[family]
    x = inputs(fam) if family != "llava" else inputs(fam, sizes=[(64, 48), (56, 56)])
    k = 5
    opts = {"tile_budget": "global"} if family in ("llava_next", "llava_onevision") else {}
    with torch.no_grad():
        tokprune.apply(fam.model, "divprune", keep=k, **opts)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        feats = oracles.features_of(fam.model, x)
        ref = kept_tokens_reference(fam, x, rec.kept[0])
        ref_gen = kept_tokens_reference(fam, x, rec.kept[0], generate=True)
    for j, f in enumerate(feats):
        content = content_tokens(fam, x, j, f)
        expected = content[authors_divprune(f[content], k)].sort().values
        kept = rec.kept[0][j].cpu()
        assert torch.equal(kept[torch.isin(kept, content)], expected)
    newlines = [int((~torch.isin(torch.arange(f.shape[0]), content_tokens(fam, x, j, f))).sum())
                for j, f in enumerate(feats)]
    assert rec.n_kept == [[k + nl for nl in newlines]]  # LLaVA-NeXT: newlines kept on top
    assert (out - ref).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


def test_next_per_tile_splits_the_budget_over_the_tiles_without_newlines():
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84)])  # 5 tiles
    with torch.no_grad(), tokprune.pruned(fam.model, "divprune", keep=10, newlines=False):
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    tiles, _ = next_tile_scores(fam, x, [0])[0]
    kept = rec.kept[0][0].cpu()
    assert rec.n_kept == [[10]]
    assert (tiles[kept] >= 0).all()  # no newline survives
    assert torch.bincount(tiles[kept], minlength=5).tolist() == [2, 2, 2, 2, 2]
    feats = oracles.features_of(fam.model, x)[0]
    for t in range(5):  # within each tile: the greedy over that tile's tokens
        idx = (tiles == t).nonzero()[:, 0]
        assert torch.equal(kept[tiles[kept] == t], idx[authors_divprune(feats[idx], 2)].sort().values)


@pytest.mark.parametrize("family", families())
def test_static_cache_and_sdpa_eager(family):
    """Static cache equals dynamic; SDPA and eager attention keep the same tokens (divprune reads no attention,
    but the projected tokens it compares come out of an encoder run with either backend)."""
    fam = ZOO[family]
    x = inputs(fam) if family != "llava" else inputs(fam, sizes=[(64, 48), (56, 56)])
    with torch.no_grad(), tokprune.pruned(fam.model, "divprune", keep=4):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)
    kept = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny_model(family, attn=attn)
        with torch.no_grad(), tokprune.pruned(model, "divprune", keep=4):
            model(**x)
            kept.append(tokprune.last_record(model).kept[0])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


@pytest.mark.parametrize("method", ["divprune", "vispruner"])
def test_flops_come_from_the_schedule_on_llava_and_qwen(method):
    """One pre-LLM stage: 576 -> 64 before the LLM on LLaVA-1.5-7B, counted as any pre-LLM keep-64 method (the
    papers' 3ndm convention: 0.42 T); on Qwen2-VL-7B (no [CLS]) the schedule exists too (vispruner's received
    attention variant), 64 of the image's tokens before the LLM."""
    from tokprune import configs, flops

    llava = configs.build_model(configs.load("llava-1.5-7b"), device="meta")
    sched = tokprune.api.schedule(llava, method, keep=64)
    assert sched.plan() == [(0, 64)] == tokprune.api.schedule(llava, "cls", keep=64).plan()
    est = flops.for_budget(llava.config, sched, convention="3ndm")
    assert est.total / 1e12 == pytest.approx(0.416, abs=1e-3)
    qwen = configs.build_model(configs.load("qwen2-vl-7b"), device="meta")
    assert tokprune.api.schedule(qwen, method, keep=64).plan() == [(0, 64)]
