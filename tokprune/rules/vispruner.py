"""VisPruner's selection rule: important tokens by visual attention, then diverse tokens left after duplicates of
the rest are removed round by round.

Rule of the reference code (Theia-4869/VisPruner, ``llava/model/llava_arch.py`` ``encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select``), re-derived here:

* **counts**: ``important = int(T * r)`` (floor of the product), ``diverse = T - important``; ``r``, the
  *important ratio*, is 0.5 by default (``--important_ratio``);
* **important**: the patches sorted by the [CLS] query's attention at the feature layer (``attentions[-2]``, row 0,
  patch columns, mean over heads), descending; the first ``important`` of them;
* **diverse**: the rest, *in that descending order*, with their feature-layer hidden states (before the
  projector) L2-normalised. While more than ``diverse`` remain: ``r = min(8, R - diverse)``; split the R remaining
  tokens by position parity into ``a`` (even) and ``b`` (odd); score every ``a`` token by its largest cosine with
  any ``b`` token; drop the ``r`` best-scoring ``a`` tokens (the most duplicated); the new order is the surviving
  ``a`` tokens by descending score, then every ``b`` token in its order. The survivors are the diverse tokens;
* kept = important + diverse, in their original (raster) order.

Choices where the reference is silent or would fail, written here:

* ties in the two descending sorts (``argsort(descending=True)``, whose tie order is unspecified) go to the lower
  index (stable sorts);
* an odd R (which the reference's indexing cannot handle: its gather of the surviving ``a`` tokens is sized
  ``R // 2``) splits into ``ceil(R/2)`` even and ``floor(R/2)`` odd positions; with a reference-sized count of 8
  per round R is even until the last round, so this only arises for unusual budgets;
* cosines come from one (B, N, N) matrix of the normalised features computed up front and indexed per round (the
  reference multiplies the round's ``a`` and ``b`` blocks), equal up to float rounding; float32 throughout.

Vectorised: the loop runs over rounds of (at most) 8 removals with tensor work inside, never over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PER_ROUND", "VisPrunerSelection", "remove_duplicates", "vispruner_counts", "vispruner_select"]

#: tokens the reference removes per round of its duplicate-removal loop (``min(8, R - diverse)``)
PER_ROUND = 8


def vispruner_counts(keep: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) for a budget of ``keep`` tokens: ``int(keep * important_ratio)`` and the rest."""
    important = int(keep * important_ratio)
    return important, keep - important


@dataclass
class VisPrunerSelection:
    """Result of :func:`vispruner_select`: ``kept`` (B, k) ascending indices; ``important`` (B, n_imp) and
    ``diverse`` (B, n_div) ascending indices of the two groups (disjoint, their union is ``kept``)."""

    kept: torch.Tensor
    important: torch.Tensor
    diverse: torch.Tensor


def remove_duplicates(similarity: torch.Tensor, residual: torch.Tensor, diverse: int,
                      per_round: int = PER_ROUND) -> torch.Tensor:
    """The reference's iterative matching and pruning: from ``residual`` (B, R) token indices (in the order the
    rule gives them), drop up to ``per_round`` tokens per round until ``diverse`` remain (see the module doc).

    ``similarity`` (B, N, N): cosine of the normalised features of all N tokens. Returns (B, diverse) indices in
    the loop's final order (not sorted)."""
    b = residual.shape[0]
    rows = torch.arange(b, device=residual.device)[:, None, None]
    while diverse > 0:
        n_res = residual.shape[1]
        r = min(per_round, n_res - diverse)
        if r <= 0:
            break
        a, bb = residual[:, ::2], residual[:, 1::2]
        scores = _block(similarity, rows, a, bb).amax(dim=-1)  # (B, |a|): each a token's best match among b
        survivors = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        residual = torch.cat([a.gather(1, survivors), bb], dim=1)
    return residual


def _block(similarity: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``similarity[r, a[r]][:, b[r]]`` for every row r: (B, |a|, |b|). One row (the common case: one image, or
    images of different sizes) takes two ``index_select`` copies, several times faster than advanced indexing."""
    if similarity.shape[0] == 1:
        return similarity[0].index_select(0, a[0]).index_select(1, b[0])[None]
    return similarity[rows, a[:, :, None], b[:, None, :]]


def vispruner_select(importance: torch.Tensor, features: torch.Tensor, keep: int,
                     important_ratio: float = 0.5, per_round: int = PER_ROUND,
                     dtype: torch.dtype = torch.float32) -> VisPrunerSelection:
    """VisPruner on each row: ``importance`` (B, N) (head-mean [CLS] attention; received attention on CLS-free
    encoders), ``features`` (B, N, D) the tokens compared for duplicates (feature-layer hidden states), ``keep``
    tokens, ``int(keep * important_ratio)`` of them important. ``dtype``: the precision of the cosines (float32;
    the model's dtype reproduces the reference's half-precision products). 2-D / 1-D inputs are one row."""
    single = importance.dim() == 1
    imp = importance[None] if single else importance
    feats = features[None] if single else features
    b, n = imp.shape
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= n:
        raise ValueError(f"vispruner: keep must be an int in [0, {n}] (the tokens to keep of {n}), got {keep!r}")
    n_imp, n_div = vispruner_counts(keep, important_ratio)
    ranked = imp.float().argsort(dim=-1, descending=True, stable=True)
    important, residual = ranked[:, :n_imp], ranked[:, n_imp:]
    if n_div > 0:
        # cosines among the residual tokens only (the loop never compares an important token): R x R, not N x N
        u = torch.gather(feats, 1, residual[..., None].expand(-1, -1, feats.shape[-1])).to(dtype)
        u = u.div_(u.norm(dim=-1, keepdim=True))  # in place: u is a fresh gather (the same quotients)
        local = torch.arange(residual.shape[1], device=residual.device).expand_as(residual)
        diverse = torch.gather(residual, 1, remove_duplicates((u @ u.transpose(-1, -2)).float(), local, n_div,
                                                              per_round))
    else:
        diverse = residual[:, :0]
    important, diverse = important.sort(dim=-1).values, diverse.sort(dim=-1).values
    kept = torch.cat([important, diverse], dim=1).sort(dim=-1).values
    if single:
        return VisPrunerSelection(kept[0], important[0], diverse[0])
    return VisPrunerSelection(kept, important, diverse)
