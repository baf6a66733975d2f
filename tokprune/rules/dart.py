"""DART rules: pivots by key norm, then each pivot takes the image tokens least similar to it (ZichenWen1/DART).

The reference (``get_retained_image_token`` in its LLaMA and vendored Qwen2-VL / Qwen2.5-VL decoders; read in the
fork xqy1111111/DART d6a5af6, the official repository's layout) acts at the entry of decoder layer K (default 2)
of a batch-1 prompt:

* ``h``: the output of layer K-1 through the decoder's *final* norm; ``keys``: layer K-1's post-RoPE key states,
  heads concatenated per token;
* pivots: the ``pivot_image`` (4) image tokens and the ``pivot_text`` (4) tokens after the image with the largest
  **L1 norm** of their keys (``torch.topk``);
* the pivots' absolute sequence indices go into a Python ``set``; for each pivot *in the set's iteration order*
  (CPython: ints by hash slot, i.e. mostly ascending index modulo the table size, not score order), the
  ``TOKEN_TOPK`` image tokens of the pool (image tokens that are not image pivots and not yet taken) with the
  **lowest cosine similarity** to the pivot's ``h`` are taken and leave the pool;
* kept = image pivots + every token taken (text pivots are not image tokens), sorted; survivors keep their
  original positions.

Because the pool shrinks, the order of the pivots changes the kept set. :func:`pivot_order` reproduces the
set's order (``"reference"``) or gives the list the code builds before the set (``"score"``: image pivots, then
text pivots, each by descending key norm: the evident intent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["key_norms", "pivot_order", "pivots", "share_counts", "take_least_similar"]

ORDERS = ("reference", "score")


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """(n,) L1 norm of each token's keys (n, ...) over every other axis (heads concatenated)."""
    return keys.reshape(keys.shape[0], -1).norm(p=1, dim=-1)


def pivots(norms: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``norms``, in ``torch.topk`` order (descending), as the reference."""
    return norms.topk(min(count, int(norms.numel()))).indices


def pivot_order(image_abs: list[int], text_abs: list[int], order: str = "reference") -> list[int]:
    """The order in which the pivots (absolute sequence indices, each list in score order) take their share:
    the reference iterates ``set(image + text)`` (an accident of CPython's set layout); ``"score"`` keeps the list
    order ``image + text``."""
    if order not in ORDERS:
        raise ValueError(f"dart: pivot_order must be one of {ORDERS}, got {order!r}")
    joined = [int(x) for x in image_abs] + [int(x) for x in text_abs]
    return list(set(joined)) if order == "reference" else joined


def share_counts(total: int, n_pivots: int) -> list[int]:
    """Split ``total`` taken tokens over ``n_pivots`` pivots in their order: ``total // n_pivots`` each, one more
    for the first ``total % n_pivots`` (the reference's budgets are multiples, so every pivot takes the same)."""
    if n_pivots == 0:
        return []
    base, extra = divmod(max(total, 0), n_pivots)
    return [base + (1 if i < extra else 0) for i in range(n_pivots)]


def take_least_similar(hidden: torch.Tensor, pool: torch.Tensor, anchors: torch.Tensor,
                       counts: list[int]) -> torch.Tensor:
    """For each anchor vector (rows of ``anchors`` (P, D), in order) take ``counts[p]`` rows of ``hidden``
    (n, D) still in ``pool`` ((n,) bool, consumed) with the lowest cosine similarity to it. Returns the taken
    indices (ascending). The similarities of all anchors are computed at once; the loop runs over the pivots."""
    sims = F.cosine_similarity(anchors[:, None, :], hidden[None, :, :], dim=-1)  # (P, n)
    free = pool.clone()
    taken = []
    for p, c in enumerate(counts):
        c = min(c, int(free.sum()))
        if c <= 0:
            continue
        score = torch.where(free, -sims[p], torch.full_like(sims[p], -float("inf")))
        idx = score.topk(c).indices
        free[idx] = False
        taken.append(idx)
    return torch.cat(taken).sort().values if taken else torch.empty(0, dtype=torch.long, device=hidden.device)
