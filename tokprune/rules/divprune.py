"""DivPrune's selection rule: the greedy max-min (most diverse) subset of an image's visual tokens.

Rule of the reference code (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``
and ``DivPrune``, called from ``prepare_inputs_labels_for_multimodal``), re-derived here:

* **embeddings**: the visual tokens *after* the projector, i.e. the LLM input embeddings of the image's run;
* **distance**: ``1 - cos`` over the rows L2-normalised (``x / ||x||``, no epsilon), an (N, N) matrix;
* **first pick**: the column of that matrix with the largest *second-smallest* entry (``topk(2, largest=False)``
  over dim 0, value 1): the smallest is the token's own distance (~0), so this is the token whose nearest other
  token is farthest, the most isolated one;
* **next picks**: for every column, the minimum over the rows of the tokens picked so far (its distance to the
  chosen set), ``argmax`` (the first maximal index on ties);
* ``round(ratio * N)`` picks (Python rounding), kept in their original order.

One deviation, on purpose: the reference does not exclude chosen tokens from later ``argmax`` calls; a chosen
token scores its own distance (~0, rounding may make it slightly positive), so when every remaining token is an
exact duplicate of a chosen one (distance 0) it can pick the same token twice and keep fewer distinct tokens than
asked. :func:`divprune_select` masks chosen tokens (``distinct=True``, the default), so exactly ``k`` distinct
tokens survive; ``distinct=False`` is the reference's bare ``argmax``. Both agree whenever the reference picks
``k`` distinct tokens.

Precision: distances are computed in float32 whatever the input dtype by default (the reference runs in the
model's dtype, fp16 in its evaluation, so near-ties may resolve differently); ``cosine_distance(x, dtype)`` computes
them in another dtype (the pruner's ``score_dtype="model"``), and the greedy then compares those rounded values.

Vectorised: one (B, N, N) matrix, then one loop over the ``k`` picks with a (B, N) ``minimum`` / ``argmax`` per
pick; no Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DivPruneSelection", "cosine_distance", "divprune_select", "min_pairwise_distance"]


def cosine_distance(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, N, D) or (N, D) tokens -> (B, N, N) / (N, N) matrix of ``1 - cos``, computed in ``dtype`` (float32 by
    default; the model's dtype reproduces the reference's half-precision arithmetic), rows normalised as the
    reference does, ``x / ||x||`` (a zero token gives NaN distances)."""
    u = x.to(dtype)
    u = u / u.norm(dim=-1, keepdim=True)
    return 1.0 - u @ u.transpose(-1, -2)


@dataclass
class DivPruneSelection:
    """Result of :func:`divprune_select`: ``kept`` (B, k) ascending token indices and ``order`` (B, k) the same
    tokens in the order the greedy picked them (``order[:, 0]`` is the most isolated token)."""

    kept: torch.Tensor
    order: torch.Tensor


def divprune_select(features: torch.Tensor, k: int, distinct: bool = True,
                    distance: torch.Tensor | None = None) -> DivPruneSelection:
    """Greedy max-min subset of ``k`` of the N tokens of each row of ``features`` (B, N, D) (or (N, D)).

    ``distance``: a precomputed (B, N, N) ``1 - cos`` matrix (default: :func:`cosine_distance` of ``features``).
    ``distinct``: mask tokens already chosen (default; see the module doc); False is the reference's bare argmax,
    which may repeat a token when only exact duplicates remain. Raises when ``k`` is not in [0, N].
    """
    single = features.dim() == 2
    feats = features[None] if single else features
    b, n = feats.shape[:2]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"divprune: k must be an int in [0, {n}] (the tokens to keep of {n}), got {k!r}")
    dev = feats.device
    dist = (cosine_distance(feats) if distance is None else distance).float()
    if dist.dim() == 2:
        dist = dist[None]
    order = torch.empty(b, k, dtype=torch.long, device=dev)
    if k:
        rows = torch.arange(b, device=dev)
        # first pick: largest second-smallest entry of each column (the distance to the nearest other token)
        score = dist.topk(2, dim=1, largest=False).values[:, 1] if n > 1 else dist[:, 0]
        taken = torch.zeros(b, n, dtype=torch.bool, device=dev)
        nearest_chosen = None
        for i in range(k):
            if i:
                row = dist[rows, order[:, i - 1]]  # (B, N): distances from the token picked last
                nearest_chosen = row if nearest_chosen is None else torch.minimum(nearest_chosen, row)
                score = nearest_chosen
            pick = (score.masked_fill(taken, float("-inf")) if distinct else score).argmax(dim=-1)
            order[:, i] = pick
            taken[rows, pick] = True
    kept = order.sort(dim=-1).values
    return DivPruneSelection(kept[0] if single else kept, order[0] if single else order)


def min_pairwise_distance(features: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """The objective DivPrune maximises: the smallest ``1 - cos`` between two distinct tokens of ``subset`` (indices
    into the rows of ``features`` (N, D)); +inf for fewer than two tokens."""
    if subset.numel() < 2:
        return torch.tensor(float("inf"))
    d = cosine_distance(features[subset])
    return d.masked_fill(torch.eye(len(subset), dtype=torch.bool, device=d.device), float("inf")).min()
