"""CATP rules (methods.md §7): facility-location selection with text alignment, and the stage-2 scores.

CATP has no public code; the paper (arXiv 2508.07871, AAAI'26) is the spec. Its budget is a *pruned* fraction R
of all image tokens of an interleaved few-shot prompt, half removed in each stage. :func:`prune_ratio` accepts
either ``prune_ratio=R`` or ``keep_ratio=1-R`` and never confuses them.

Stage 1 (after the projector, per image i with S_i tokens X): keep ``floor(S_i (1 - R/2))`` tokens Y maximising
``F(Y) = sum_{x in X} max_{y in Y} sim(y, x) + lambda1 * sum_{y in Y} sim(y, v_i)`` (facility location plus
alignment with v_i, the mean LLM input embedding of the image's paired text; lambda1 = 0.7), by the standard
greedy: each step adds the token of largest marginal gain ``sum_x max(0, sim(t, x) - cover(x)) +
lambda1 sim(t, v_i)`` and updates ``cover(x) = max(cover(x), sim(t, x))``. ``sim`` is the cosine rescaled to
[0, 1] as ``(cos + 1) / 2`` (the paper says "rescaled"; the exact map is our choice, ``similarity="cosine"``
uses the raw cosine). Batched over images (padded with ``valid``), one vectorised step per pick.

Stage 2 (in the LLM): after layer K the context (demonstration) image tokens are ranked together by
``max(0, A_K - A_{K-1}) + lambda2 cos(h_c, v_q)`` (A = the query's last token's head-mean attention in layers K
and K-1, h layer K's output, v_q its mean over the query sample; lambda2 = 0.6), so per-demonstration counts
adapt; after layer K+1 the query image's tokens are ranked by ``cos(h_q, v_c)`` with v_c the mean of layer K+1's
output over the retained context.
Choices where the paper is silent (options, documented in docs/rules.md): each pool (all context image tokens;
the query image) ends at ``floor(N0 (1 - R))`` of its original count N0; the stage-2 similarity is the plain
cosine; which tokens form v_q and v_c is the caller's mask (default in the pruner: all tokens of the query
sample; all retained context tokens, image and text).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokprune.kernels import facility_location, select_topk

__all__ = [
    "attention_increase",
    "context_scores",
    "facility_location_greedy",
    "masked_mean",
    "per_image_counts",
    "pool_keep",
    "prune_ratio",
    "query_scores",
    "select_pool",
    "similarity_matrix",
    "stage1_counts",
    "stage1_select",
]


def prune_ratio(keep_ratio: float | None = None, prune_ratio: float | None = None) -> float:
    """The paper's R (fraction of image tokens *removed*) from exactly one of ``keep_ratio`` / ``prune_ratio``."""
    if (keep_ratio is None) == (prune_ratio is None):
        raise ValueError("give exactly one of keep_ratio (kept fraction) or prune_ratio (the paper's R, removed)")
    r = 1 - keep_ratio if prune_ratio is None else prune_ratio
    if not 0 <= r < 1:
        raise ValueError(f"the pruned fraction must be in [0, 1), got {r}")
    return float(r)


def stage1_counts(n_tokens: torch.Tensor | list[int] | int, r: float) -> torch.Tensor:
    """Tokens kept per image by stage 1: ``floor(S_i (1 - R/2))``."""
    s = torch.as_tensor(n_tokens)
    return torch.floor(s.double() * (1 - r / 2) + 1e-9).long()


def pool_keep(n_original: int, r: float) -> int:
    """Tokens a stage-2 pool keeps (all context image tokens at K; the query image at K+1): ``floor(N0 (1 - R))``."""
    return math.floor(n_original * (1 - r) + 1e-9)


def _rescale(cos: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "rescaled":
        return (cos + 1) / 2
    if similarity == "cosine":
        return cos
    raise ValueError(f"similarity must be 'rescaled' or 'cosine', got {similarity!r}")


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, similarity: str = "rescaled") -> torch.Tensor:
    """Pairwise similarity (B, Na, Nb) of a (B, Na, D) and b (B, Nb, D): ``(cos + 1)/2`` or ``cos``."""
    cos = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)
    return _rescale(cos, similarity)


def facility_location_greedy(
    tokens: torch.Tensor,
    text: torch.Tensor,
    k: int | torch.Tensor,
    lambda1: float = 0.7,
    valid: torch.Tensor | None = None,
    similarity: str = "rescaled",
    coverage: str = "sum",
) -> torch.Tensor:
    """Greedy maximisation of facility location + lambda1 * alignment, batched.

    tokens (B, S, D) projected image tokens; text (B, D) paired-text mean embedding; k an int or (B,) per-image
    counts; valid (B, S) marks real tokens (padding neither covers nor is picked). ``coverage="sum"``: the
    facility-location term as written, ``sum_x max_y sim``; ``"mean"``: divided by the image's token count (the
    same picks as multiplying lambda1 by it). Returns (B, max k) token indices **in pick order**, right-padded
    with -1. Ties go to the lower index.
    """
    b, s, _ = tokens.shape
    dev = tokens.device
    valid = torch.ones(b, s, dtype=torch.bool, device=dev) if valid is None else valid
    ks = torch.full((b,), int(k), device=dev) if not isinstance(k, torch.Tensor) else k.to(dev).long()
    if bool((ks > valid.sum(1)).any()):
        raise ValueError("k exceeds the number of valid tokens of an image")
    sim = similarity_matrix(tokens, tokens, similarity)  # (B, candidate, covered)
    align = lambda1 * similarity_matrix(tokens, text[:, None], similarity)[..., 0]  # (B, S)
    if coverage == "mean":  # argmax of gain / S + align == argmax of gain + S * align
        align = align * valid.sum(dim=1, keepdim=True).to(align.dtype)
    elif coverage != "sum":
        raise ValueError(f"coverage must be 'sum' or 'mean', got {coverage!r}")
    floor = 0.0 if similarity == "rescaled" else -1.0  # the value of an empty cover
    return facility_location(sim, align, ks, valid, floor)


def stage1_select(
    tokens: torch.Tensor,
    text: torch.Tensor,
    r: float,
    lambda1: float = 0.7,
    valid: torch.Tensor | None = None,
    similarity: str = "rescaled",
) -> torch.Tensor:
    """Stage 1 for a batch of images: the ``floor(S_i (1 - R/2))`` greedy picks of each, ascending, -1 padded."""
    b, s, _ = tokens.shape
    n = torch.full((b,), s) if valid is None else valid.sum(1).cpu()
    picks = facility_location_greedy(tokens, text, stage1_counts(n, r), lambda1, valid, similarity)
    key = torch.where(picks < 0, torch.full_like(picks, s), picks)
    srt = key.sort(dim=1).values
    return torch.where(srt == s, torch.full_like(srt, -1), srt)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, D) over the tokens where mask (B, T) is True -> (B, D) (the summary vectors)."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def attention_increase(attn_k: torch.Tensor, attn_k_minus_1: torch.Tensor) -> torch.Tensor:
    """``max(0, A_K - A_{K-1})`` of the query's last token's head-mean attention rows (B, N)."""
    return (attn_k.float() - attn_k_minus_1.float()).clamp(min=0)


def context_scores(
    attn_k: torch.Tensor,
    attn_k_minus_1: torch.Tensor,
    hidden_ctx: torch.Tensor,
    query_summary: torch.Tensor,
    lambda2: float = 0.6,
    similarity: str = "cosine",
) -> torch.Tensor:
    """Stage-2 score of the context image tokens (B, N): attention increase + lambda2 * sim(h_c, v_q), ``sim`` the
    cosine (``similarity="rescaled"``: ``(cos + 1)/2``)."""
    sim = _rescale(F.cosine_similarity(hidden_ctx.float(), query_summary.float()[:, None], dim=-1), similarity)
    return attention_increase(attn_k, attn_k_minus_1) + lambda2 * sim


def query_scores(hidden_query: torch.Tensor, context_vector: torch.Tensor, similarity: str = "cosine"
                 ) -> torch.Tensor:
    """Stage-2 (K+1) score of the query image tokens (B, N): ``sim(h_q, v_c)`` (the ranking is the same either way)."""
    return _rescale(F.cosine_similarity(hidden_query.float(), context_vector.float()[:, None], dim=-1), similarity)


def select_pool(scores: torch.Tensor, keep: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ``keep`` best tokens of a pool (B, N) (all context image tokens ranked together), ascending."""
    return select_topk(scores, keep, valid)


def per_image_counts(kept: torch.Tensor, image_of_token: torch.Tensor, n_images: int) -> torch.Tensor:
    """How many kept pool tokens (kept (K,) pool positions) belong to each image (image_of_token (N,))."""
    return torch.bincount(image_of_token[kept], minlength=n_images)

