"""CDPruner: the greedy DPP MAP against an independent re-implementation of the authors' code
(Theia-4869/CDPruner ``llava_arch.py: encode_images``, written here in its own shape: one loop per pick, batch
first), against exhaustive search where the greedy is exact, on kernels with a known MAP, and on the tiny models
(the kept set equals the reference rule run on the unpatched model's features and instruction embeddings, and the
logits equal the unpatched model fed those tokens). The family x method matrix (tests/test_families.py,
tests/test_llava.py) covers keep-all, batching, multi-image, generate, static cache and sdpa == eager."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_families import ZOO, encode, inputs, kept_tokens_reference

import tokprune
from tokprune.pruners.base import VisionSignals
from tokprune.pruners.cdpruner import CDPruner
from tokprune.rules import cdpruner as rules


# ---------------------------------------------------------------------------------------------- the reference
def authors_rule(image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, t: int,
                 theta: float | None = None) -> torch.Tensor:
    """The authors' ``encode_images`` selection, re-written from their code: (B, N, D) projected features, (B, N, C)
    relevance embeddings, (M, C) text embeddings -> (B, t) sorted kept indices. Min-max over the whole call."""
    b, n, _ = image_features.shape
    xn = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    sim = torch.bmm(xn, xn.transpose(1, 2))
    e = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    tx = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = (-(e @ tx.t())).mean(-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    kernel = rel[:, :, None] * sim * rel[:, None, :]
    cis = torch.zeros(t, b, n)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    sel = torch.empty(t, b, dtype=torch.long)
    ar = torch.arange(b)
    for i in range(t):
        j = torch.argmax(di2s, dim=-1)
        sel[i] = j
        eis = (kernel[ar, j] - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])) / torch.sqrt(di2s[ar, j])[:, None]
        cis[i] = eis
        di2s -= eis ** 2
        di2s[ar, j] = -float("inf")
    return torch.sort(sel.t()).values


def logdet(kernel: torch.Tensor, subset) -> float:
    idx = torch.tensor(list(subset))
    return float(torch.linalg.slogdet(kernel[idx][:, idx].double()).logabsdet)


def exhaustive_map(kernel: torch.Tensor, k: int) -> tuple[float, list[tuple[int, ...]]]:
    """Largest det over all k-subsets, and every subset reaching it (within 1e-9 relative)."""
    dets = {s: float(torch.det(kernel[list(s)][:, list(s)].double()))
            for s in itertools.combinations(range(len(kernel)), k)}
    best = max(dets.values())
    return best, [s for s, d in dets.items() if d >= best - 1e-9 * max(1.0, abs(best))]


# ---------------------------------------------------------------------------------------------- hand-made
@pytest.mark.parametrize("theta", [None, 0.5])
def test_rule_equals_the_authors_code_on_random_inputs(theta):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 40, 24, generator=g)
    text = torch.randn(5, 24, generator=g)
    for t in (1, 7, 20):
        for j in range(3):  # ours: per image (the authors' min-max is over the call: one image per call here)
            r = rules.theta_transform(rules.relevance(feats[j], text), theta)
            kernel = rules.conditional_kernel(rules.similarity(feats[j][None]), r[None])
            ours = rules.dpp_greedy(kernel, t)[0].sort().values
            alone = authors_rule(feats[j:j + 1], feats[j:j + 1], text, t, theta)[0]
            assert torch.equal(ours, alone)


def test_pruner_equals_the_authors_code_batched_over_images():
    """select_vision on three images (two sizes) == the authors' rule image by image, conditioned on the row's
    instruction (the paired text of the row's last image)."""
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(n, 16, generator=g) for n in (30, 30, 22)]
    texts = [torch.randn(m, 16, generator=g) for m in (3, 4, 6)]
    sig = VisionSignals(features=feats, owners=[(0, 0), (0, 1), (1, 0)], paired_text=texts)
    ks = [5, 9, 4]
    got = CDPruner().select_vision(sig, ks)
    want = [authors_rule(feats[0][None], feats[0][None], texts[1], 5)[0],
            authors_rule(feats[1][None], feats[1][None], texts[1], 9)[0],
            authors_rule(feats[2][None], feats[2][None], texts[2], 4)[0]]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    paired = CDPruner(text="paired").select_vision(sig, ks)
    assert torch.equal(paired[0], authors_rule(feats[0][None], feats[0][None], texts[0], 5)[0])


def test_diagonal_kernel_map_is_the_top_relevance_and_greedy_is_exact():
    """Orthogonal tokens: det L_Y = prod r_i^2, so the MAP is the k most relevant; exhaustive search agrees."""
    r = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5, 0.8])
    kernel = rules.conditional_kernel(torch.eye(6)[None], r[None])
    for k in (1, 2, 3, 4):
        picks = set(rules.dpp_greedy(kernel, k)[0].tolist())
        assert picks == set(r.topk(k).indices.tolist())
        _, best = exhaustive_map(kernel[0], k)
        assert tuple(sorted(picks)) in best


def test_duplicates_are_never_kept_together():
    """Tokens 0 and 1 are identical (det of any set holding both is 0); the MAP of size 3 takes one of them plus
    the two orthogonal tokens, whatever the relevance; the greedy reaches the exhaustive optimum."""
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    sim = rules.similarity(x[None])
    r = torch.tensor([1.0, 0.95, 0.5, 0.4, 0.9])
    kernel = rules.conditional_kernel(sim, r[None])
    picks = rules.dpp_greedy(kernel, 3)[0].tolist()
    assert picks[0] == 0 and 1 not in picks
    best, sets = exhaustive_map(kernel[0], 3)
    assert abs(logdet(kernel[0], picks) - torch.tensor(best).log().item()) < 1e-5
    assert tuple(sorted(picks)) in sets


def test_greedy_past_the_kernel_rank_picks_distinct_tokens():
    """A rank-2 kernel (6 tokens on 2 directions) asked for 5 picks: past the rank the gains are 0 / NaN, and the
    authors' loop re-picks an already chosen token there (a duplicate); tokprune takes the lowest-index token not
    yet picked, so the kept set is 5 distinct tokens that agree with the reference up to the rank."""
    x = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0], [1.0, 0]])
    kernel = rules.conditional_kernel(rules.similarity(x[None]), torch.ones(1, 6))
    picks = rules.dpp_greedy(kernel, 5)[0].tolist()
    assert len(set(picks)) == 5 and picks[:2] == [0, 2]
    ref = authors_rule(x[None], x[None], torch.tensor([[1.0, 1.0]]), 5)[0].tolist()
    assert len(set(ref)) < 5  # the reference's duplicate: why the mask exists


def test_greedy_matches_exhaustive_search_where_it_is_exact():
    """k = 1 (the largest diagonal) and block-orthogonal kernels (the MAP factorises over blocks of one token
    each ... and of the greedy's own first picks) on many random tiny sets: the greedy's determinant equals the
    exhaustive maximum for k = 1 always, and for any k on kernels whose tokens are pairwise orthogonal."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randn(7, 5, generator=g)
        r = torch.rand(7, generator=g) + 0.1
        kernel = rules.conditional_kernel(rules.similarity(x[None]), r[None])
        pick = rules.dpp_greedy(kernel, 1)[0].tolist()
        best, sets = exhaustive_map(kernel[0], 1)
        assert tuple(pick) in sets
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
        kern = rules.conditional_kernel(rules.similarity(q.T[None]), r[None, :6])
        for k in (2, 3, 5):
            picks = rules.dpp_greedy(kern, k)[0].tolist()
            best, sets = exhaustive_map(kern[0], k)
            assert tuple(sorted(picks)) in sets


def test_greedy_is_within_the_exhaustive_optimum_and_its_gains_are_the_determinant():
    """Generic tiny kernels: the greedy's gains multiply to the determinant of its set (the incremental Cholesky
    is right) and never beat the exhaustive maximum."""
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        x = torch.randn(8, 6, generator=g)
        r = torch.rand(8, generator=g) + 0.1
        kernel = rules.conditional_kernel(rules.similarity(x[None]), r[None])
        picks = rules.dpp_greedy(kernel, 4)[0].tolist()
        best, _ = exhaustive_map(kernel[0], 4)
        d = float(torch.det(kernel[0][picks][:, picks].double()))
        assert 0 < d <= best * (1 + 1e-6)


def test_cpu_one_kernel_greedy_picks_what_the_batched_loop_picks():
    """The one-kernel CPU loop (views by int, ``e`` written into its basis row in place, the picked tokens masked
    only when ``argmax`` lands on one) picks exactly what the general batched loop (a mask every pick) picks:
    random kernels, kernels with duplicate tokens, and kernels of low rank run past their rank (NaN gains)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(30):
        n = int(torch.randint(2, 120, (1,), generator=g))
        d = int(torch.randint(1, 40, (1,), generator=g)) if trial % 3 else 2  # every third: rank 2, exhausted
        x = torch.randn(n, d, generator=g)
        if trial % 4 == 1:
            x[n // 2:] = x[: n - n // 2].clone()  # duplicates
        kernel = rules.conditional_kernel(rules.similarity(x), torch.rand(n, generator=g))
        for k in {1, max(1, n // 3), n}:
            one = rules._dpp_greedy_one(kernel, k)
            batched = rules.dpp_greedy(torch.stack([kernel, kernel]), k)
            assert torch.equal(one, batched[0]) and torch.equal(one, batched[1])
            assert len(set(one.tolist())) == k


def test_options_are_validated():
    with pytest.raises(ValueError, match="theta must be in"):
        CDPruner(theta=1.0)
    with pytest.raises(ValueError, match="text must be one of"):
        CDPruner(text="question")
    with pytest.raises(TypeError, match="negate"):
        CDPruner(negate=1)


# ---------------------------------------------------------------------------------------------- tiny models
def instruction_embeddings(fam, x) -> torch.Tensor:
    """LLM input embeddings of the real tokens after the last image token, special ids removed (from ids alone)."""
    ids = x["input_ids"][0]
    cfg = fam.model.config
    special = {v for name, v in cfg.to_dict().items() if name.endswith("_token_id") and isinstance(v, int)}
    special |= {v for name, v in cfg.get_text_config().to_dict().items()
                if name.endswith("_token_id") and isinstance(v, int)}
    last = int((ids == fam.image_id).nonzero()[-1, 0])
    tail = ids[last + 1:]
    tail = tail[~torch.isin(tail, torch.tensor(sorted(special)))]
    return fam.model.get_input_embeddings()(tail)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_tiny_model_kept_set_and_logits_equal_the_authors_rule(family):
    fam = ZOO[family]
    x = inputs(fam, sizes=[(112, 84)])
    k = 5
    tokprune.apply(fam.model, "cdpruner", keep=k)
    try:
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
    finally:
        tokprune.remove(fam.model)
    feats = encode(fam, x).pooler_output[0]
    text = instruction_embeddings(fam, x)
    want = authors_rule(feats[None], feats[None], text, k)[0]
    assert torch.equal(rec.kept[0][0].cpu(), want)
    ref = kept_tokens_reference(fam, x, [want])
    assert (out - ref).abs().max() <= 1e-5


def test_parts_of_one_image_share_the_relevance_normalisation():
    """LLaVA-NeXT tiles reach select_vision as parts of one image (``source``): the authors' call holds every crop
    of the image (min-max over all of them, the DPP per crop), which is what the pruner reproduces."""
    g = torch.Generator().manual_seed(4)
    crops = torch.randn(2, 25, 12, generator=g)
    text = torch.randn(4, 12, generator=g)
    whole = (0, 0)
    sig = VisionSignals(features=[crops[0], crops[1]], owners=[(0, 0), (0, 1)], paired_text=[text, text],
                        source=[(whole, torch.arange(25)), (whole, torch.arange(25, 50))])
    got = CDPruner().select_vision(sig, [6, 6])
    want = authors_rule(crops, crops, text, 6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@torch.no_grad()
def test_llava_next_runs_per_tile_with_newlines_on_top():
    fam = ZOO["llava_next"]
    x = inputs(fam, sizes=[(112, 84)])
    tokprune.apply(fam.model, "cdpruner", keep=3)
    try:
        fam.model(**x)
        rec = tokprune.last_record(fam.model)
    finally:
        tokprune.remove(fam.model)
    assert [s.kind for s in rec.stages] == ["vision"]
    assert rec.n_kept[0][0] == 3 + int(rec.special[0][0].sum())


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_static_cache_and_sdpa_eager(family):
    from test_families import GEN, assert_same_generation

    from tokprune.testing import tiny_model
    x = inputs(ZOO[family])
    kept = []
    for attn in ("sdpa", "eager"):
        model, _ = tiny_model(family, attn=attn)
        with tokprune.pruned(model, "cdpruner", keep=5):
            dyn = model.generate(**x, **GEN)
            kept.append(tokprune.last_record(model).kept)
            if attn == "sdpa":
                assert_same_generation(dyn, model.generate(**x, cache_implementation="static", **GEN))
    assert all(torch.equal(a, b) for ra, rb in zip(*kept) for a, b in zip(ra, rb))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
@torch.no_grad()
def test_generate_equals_the_unpatched_model_fed_the_kept_tokens(family):
    fam = ZOO[family]
    x = inputs(fam, sizes=[(112, 84)])
    from test_families import GEN, assert_same_generation
    with tokprune.pruned(fam.model, "cdpruner", keep=4):
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
    assert_same_generation(gen, kept_tokens_reference(fam, x, rec.kept[0], generate=True))
