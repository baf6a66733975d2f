"""HiPrune selection rules (methods.md §6): anchors, their spatial buffers and registers.

HiPrune keeps, out of a grid of visual tokens, (1) *anchors*: the tokens receiving the most attention at a
middle ("object") encoder layer, (2) their 4-neighbour *buffers*, and (3) *registers*: the best remaining
tokens by the attention they receive at a deep layer. The statistic at both layers is the received attention
``mean over heads and over all query rows`` of the softmax attention (the CLS column dropped on CLIP); the
paper sums over queries, which ranks identically.

Reference code (Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py`` ``encode_images`` and
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``), reproduced here:

* anchor count ``round(alpha * keep / 5)`` (Python's round, half to even), anchors = top by the object layer;
* buffers = anchor ``-1, +1, -W, +W`` in the flattened grid, clamped to ``[0, N-1]`` and de-duplicated with the
  anchors. A ``±1`` at a row edge therefore lands on the neighbouring row, and a ``±W`` beyond the first or
  last row is clamped onto token 0 or N-1 (``wrap_rows=True``, the default). ``wrap_rows=False`` keeps only
  true 2-D neighbours inside the grid (nothing is added for a missing neighbour);
* registers = top ``keep - |anchors ∪ buffers|`` by the deep layer among the tokens not yet chosen, so
  overlapping buffers leave room for more registers and exactly ``keep`` tokens come out, sorted ascending.

Deviation kept on purpose: the reference excludes already-chosen tokens by subtracting 1 from their deep score.
With CLIP's *mean* statistic (<= 1) that always excludes them; on Qwen2.5-VL the reference sums over queries,
so a chosen token can be picked again and fewer than ``keep`` distinct tokens survive. Here chosen tokens are
always excluded, so the count is exact on every family (identical to the reference whenever it is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.kernels import select_topk

__all__ = [
    "HiPruneSelection",
    "anchor_count",
    "buffer_indices",
    "hiprune_select",
    "merge_unit_scores",
    "received_attention",
    "tile_budget",
]


def received_attention(attn: torch.Tensor, drop_cls: bool = False) -> torch.Tensor:
    """Attention received per key token: mean over heads and all query rows of ``attn`` (B, H, Nq, Nk).

    ``drop_cls`` removes the key column 0 afterwards (CLIP: the statistic of the patches only, CLS queries still
    averaged in, as the reference does). Returns (B, Nk) or (B, Nk - 1). This eager form is the oracle the
    seam's block-wise (O(N) memory) computation must equal.
    """
    r = attn.float().mean(dim=1).mean(dim=1)
    return r[:, 1:] if drop_cls else r


def merge_unit_scores(
    patch_scores: torch.Tensor, unit: int = 4, reverse_indices: torch.Tensor | None = None
) -> torch.Tensor:
    """Qwen-VL: one score per merged LLM token = the mean of its ``unit`` consecutive patch scores (§6 Qwen).

    ``patch_scores`` (B, P) in the vision tower's sequence order (window order on Qwen2.5-VL, where each merge
    unit is contiguous); ``reverse_indices`` (P // unit,) re-orders the merged scores to raster order (the
    tower's ``reverse_indices``; None on Qwen2-VL/Qwen3-VL where the order is already raster).
    """
    b, p = patch_scores.shape
    if p % unit:
        raise ValueError(f"{p} patch scores are not a multiple of the merge unit {unit}")
    merged = patch_scores.float().view(b, p // unit, unit).mean(dim=-1)
    return merged if reverse_indices is None else merged[:, reverse_indices]


def tile_budget(keep: int, n_tiles: int) -> int:
    """LLaVA-NeXT: the reference's per-tile budget ``int(keep / n_tiles)`` (640 over 5 tiles -> 128 each); each
    tile then runs :func:`hiprune_select` on its own 24-wide grid and newline tokens are kept on top."""
    return int(keep / n_tiles)


def anchor_count(keep: int, alpha: float) -> int:
    """``round(alpha * keep / 5)``: the reference's number of anchors (5 = an anchor plus its 4 buffers)."""
    return round(keep * alpha / 5)


def buffer_indices(anchors: torch.Tensor, width: int, n_tokens: int, wrap_rows: bool = True) -> torch.Tensor:
    """The 4-neighbour buffers of ``anchors`` (B, A) in a row-major grid of ``n_tokens`` tokens, ``width`` wide.

    Returns (B, 4A) long in the order [-1, +1, -W, +W] per anchor block. ``wrap_rows=True`` (reference): plain
    offsets clamped to ``[0, n_tokens - 1]``. ``wrap_rows=False``: true grid neighbours; a neighbour outside the
    grid (left of column 0, right of the last column, above row 0, below the last token) is -1.
    """
    offsets = (-1, 1, -width, width)
    cand = torch.cat([anchors + o for o in offsets], dim=1)
    if wrap_rows:
        return cand.clamp(0, n_tokens - 1)
    col = anchors % width
    ok = torch.cat(
        [col > 0, (col < width - 1) & (anchors + 1 < n_tokens), anchors - width >= 0, anchors + width < n_tokens],
        dim=1,
    )
    return torch.where(ok, cand, torch.full_like(cand, -1))


@dataclass
class HiPruneSelection:
    """Result of :func:`hiprune_select`. ``kept`` (B, keep) ascending; the masks are (B, N) and partition it."""

    kept: torch.Tensor
    anchors: torch.Tensor
    anchor_mask: torch.Tensor
    buffer_mask: torch.Tensor
    register_mask: torch.Tensor


def hiprune_select(
    object_scores: torch.Tensor,
    deep_scores: torch.Tensor,
    width: int,
    keep: int,
    alpha: float = 0.1,
    wrap_rows: bool = True,
) -> HiPruneSelection:
    """Select exactly ``keep`` tokens: anchors, their buffers, then registers (§6 "Selection for budget N'").

    object_scores, deep_scores: (B, N) or (N,) received attention at the object and deep layers (per merged
    token on Qwen, see :func:`merge_unit_scores`); width: grid width in the same units. Raises ValueError when
    anchors and buffers alone exceed ``keep`` (lower ``alpha``).
    """
    squeeze = object_scores.dim() == 1
    if squeeze:
        object_scores, deep_scores = object_scores[None], deep_scores[None]
    b, n = object_scores.shape
    if deep_scores.shape != (b, n):
        raise ValueError(f"deep_scores {tuple(deep_scores.shape)} must match object_scores {(b, n)}")
    if not 0 < keep <= n:
        raise ValueError(f"keep={keep} must be in [1, {n}]")
    if n % width:
        raise ValueError(f"{n} tokens do not form rows of width {width}")
    n_anchor = anchor_count(keep, alpha)
    anchors = select_topk(object_scores, n_anchor)
    buffers = buffer_indices(anchors, width, n, wrap_rows)
    anchor_mask = torch.zeros(b, n, dtype=torch.bool, device=object_scores.device)
    anchor_mask.scatter_(1, anchors, True)
    # a missing neighbour (-1, wrap_rows=False) is redirected to the block's own anchor, already chosen
    own = anchors.repeat(1, 4)
    buf_mask = torch.zeros_like(anchor_mask)
    buf_mask.scatter_(1, torch.where(buffers >= 0, buffers, own), True)
    chosen = buf_mask | anchor_mask
    n_chosen = chosen.sum(dim=1)
    # sync: once per call: anchors + buffers exceeding keep is a different branch
    if int(n_chosen.max()) > keep:
        raise ValueError(
            f"{int(n_chosen.max())} anchors+buffers exceed keep={keep}; lower alpha (now {alpha}) or raise keep"
        )
    ranked = torch.where(chosen, torch.full_like(deep_scores.float(), float("inf")), deep_scores.float())
    kept = select_topk(ranked, keep)
    kept_mask = torch.zeros_like(anchor_mask)
    kept_mask.scatter_(1, kept, True)
    res = HiPruneSelection(
        kept=kept,
        anchors=anchors,
        anchor_mask=anchor_mask,
        buffer_mask=chosen & ~anchor_mask,
        register_mask=kept_mask & ~chosen,
    )
    if squeeze:
        res = HiPruneSelection(*(t[0] for t in vars(res).values()))
    return res
