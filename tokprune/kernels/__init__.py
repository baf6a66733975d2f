"""The shared tail of every pruning method: score -> top-k -> keep original order -> gather (-> merge).

Public API (stable): :func:`select_topk`, :func:`gather_tokens`, :func:`merge_tokens`, :func:`prune` and
:class:`PruneResult`. Each call picks a backend by device: Triton kernels for CUDA tensors when triton is
importable, the PyTorch reference (``tokprune.kernels.reference``) otherwise. ``TOKPRUNE_KERNELS=torch|triton``
forces one (read at call time). Semantics are identical on both backends; see docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .dispatch import resolve_backend, triton_available

__all__ = [
    "PruneResult",
    "facility_location",
    "gather_tokens",
    "merge_tokens",
    "prune",
    "resolve_backend",
    "select_topk",
    "triton_available",
]

MERGE_MODES = (None, "nearest")


def _triton():
    """Import the Triton implementations only when that backend was chosen (triton is an optional extra)."""
    from . import triton_kernels

    return triton_kernels


@dataclass
class PruneResult:
    """Output of :func:`prune`.

    indices: (B, K) long, kept token indices in ascending order, -1 pads for per-row k.
    tokens: (B, K, D) the kept tokens ``x[b, indices[b]]`` (zeros at pads).
    merged: (B, K, D) or None; with ``merge="nearest"`` the mean of each kept token and the pruned tokens
        assigned to it (zeros at pads).
    assign: (B, N) long or None; with a merge, the slot in ``[0, K)`` each token was merged into (kept tokens map to
        their own slot, masked-out tokens to -1).
    """

    indices: torch.Tensor
    tokens: torch.Tensor
    merged: torch.Tensor | None = None
    assign: torch.Tensor | None = None


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_k: int | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` largest scores of each row, sorted ascending (original token order).

    scores: (B, N) or (N,), any float dtype; compared as float32, NaN counts as -inf, -0.0 equals +0.0.
    k: an int (output (B, k), or (k,) for 1-D scores), or a (B,) integer tensor of per-row counts (output
        (B, max k) right-padded with -1). Reading max k of a CUDA tensor syncs; pass ``max_k`` to avoid that.
    max_k: optional output width (>= every k); rows are right-padded with -1 up to it.
    mask: optional (B, N) bool; False entries are never selected.
    Ties go to the lower index, so the result is deterministic and identical on both backends.
    A row with fewer selectable entries than its k raises ValueError when ``check`` is True (default: on CPU
    only, since on CUDA the check needs a host sync); unchecked, such a row is filled up with -1.
    """
    if resolve_backend(scores.device) == "triton":
        return _triton().select_topk(scores, k, mask, max_k=max_k, check=check)
    return reference.select_topk(scores, k, mask, max_k=max_k, check=check)


def facility_location(
    sim: torch.Tensor,
    align: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    floor: float = 0.0,
) -> torch.Tensor:
    """Greedy facility location + per-token bonus (CATP's stage 1): (B, max k) picks in pick order, -1 padded.
    sim (B, S, S), align (B, S), k (B,), valid (B, S); see :func:`tokprune.kernels.reference.facility_location`.
    Two exact implementations with the same picks (tests/test_catp.py checks it): on CPU the lazy greedy
    (:func:`tokprune.kernels.reference.facility_location_lazy`, re-evaluates only the candidates whose stale gain
    could still win, about 1/50 of the work on a 1369-token image, with host work per step); elsewhere the batched
    step per pick (every candidate's gain in one kernel, no per-step host sync)."""
    if sim.device.type == "cpu":
        return reference.facility_location_lazy(sim, align, k, valid, floor)
    return reference.facility_location(sim, align, k, valid, floor)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]]``; -1 in ``idx`` gives a zero row.

    x: (B, N, D) (any strides) or (N, D) with idx (K,); idx: (B, K) integer. Returns a contiguous (B, K, D) tensor of
    x's dtype. Indices outside [-1, N) raise IndexError on CPU; on CUDA (no host sync) they give zero rows.
    """
    if resolve_backend(x.device) == "triton":
        return _triton().gather_tokens(x, idx)
    return reference.gather_tokens(x, idx)


def merge_tokens(
    x: torch.Tensor,
    assign: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_targets: int | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Weighted average of source tokens into ``M`` targets, accumulated in float32, returned in x's dtype.

    out[b, m] = (bw[b, m] * base[b, m] + sum_{n: assign[b, n] == m} w[b, n] * x[b, n]) / (bw[b, m] + sum w[b, n])

    x: (B, N, D) sources; assign: (B, N) integer target per source, -1 skips the source; weights: (B, N) or None
    (all 1); num_targets: M (default base.shape[1], else assign.max() + 1, which syncs on CUDA); base: (B, M, D)
    or None; base_weight: (B, M) tensor or scalar, default 1 when base is given. A target whose denominator is 0
    (received nothing and bw = 0, or no base) returns base, or zeros without base. Weights should be >= 0.
    Examples: VisionZip contextual token = target + ``merge_tokens(x, assign, num_targets=C)`` (mean of the
    assigned); a ToMe-style size-weighted average =
    ``merge_tokens(x, assign, weights=size, base=kept, base_weight=kept_size)``.
    """
    if resolve_backend(x.device) == "triton":
        return _triton().merge_tokens(x, assign, weights, num_targets, base, base_weight)
    return reference.merge_tokens(x, assign, weights, num_targets, base, base_weight)


def prune(
    x: torch.Tensor,
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    merge: str | None = None,
    *,
    keys: torch.Tensor | None = None,
    max_k: int | None = None,
    check: bool | None = None,
) -> PruneResult:
    """Select the top-``k`` tokens of ``x`` by ``scores``, gather them in original order, optionally merge the rest.

    x: (B, N, D); scores, k, mask, max_k, check: as in :func:`select_topk`.
    merge: None, or ``"nearest"``: every selectable token that was not kept is averaged (weight 1) into the kept
        token whose key is most cosine-similar (ties to the lower slot); ``merged[b, j]`` is the mean of kept token j
        and the tokens assigned to it. Masked-out tokens are neither kept nor merged.
    keys: (B, N, C) similarity features for ``"nearest"`` (default: x itself).
    On CUDA this is two Triton launches (top-k, gather) without a merge; ``"nearest"`` adds a cuBLAS bmm + argmax
    for the assignment and a sort + one Triton launch for the merge.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    if x.dim() != 3 or scores.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, N, D) and scores (B, N), got {tuple(x.shape)} and {tuple(scores.shape)}")
    if keys is not None and (keys.dim() != 3 or keys.shape[:2] != x.shape[:2]):
        raise ValueError(f"keys must be (B, N, C) matching x, got {tuple(keys.shape)}")
    if resolve_backend(x.device) == "triton":
        return _triton().prune(x, scores, k, mask, merge, keys=keys, max_k=max_k, check=check, result_type=PruneResult)
    idx = reference.select_topk(scores, k, mask, max_k=max_k, check=check)
    tokens = reference.gather_tokens(x, idx)
    if merge is None:
        return PruneResult(idx, tokens)
    assign = reference.nearest_assign(x if keys is None else keys, idx, mask)
    merged = reference.merge_tokens(x, assign, num_targets=idx.shape[1])
    return PruneResult(idx, tokens, merged, assign)
