"""PyramidDrop rules (methods.md §11): per-stage keep counts, layer scaling and the attention ranking.

Reference code (Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py`` ``pdrop_forward`` /
``pdrop_rank_drop``, ``llava/eval/model_vqa_loader.py``), reproduced here:

* ``layer_list=[8, 16, 24]`` is checked as ``layer_idx + 1``: tokens are dropped after 0-based layer 7, 15, 23,
  i.e. *before* 0-based layers 8, 16, 24, and the ranking uses that next layer's input norm, q/k projections
  and RoPE on the current hidden states (the seam computes those rows);
* ``image_token_ratio_list=[0.5, 0.25, 0.125]`` gets a leading 1.0; stage s keeps
  ``int(N * ratio[s + 1])`` of the *original* N image tokens (floor);
* ranking: the softmax over the whole causal row of the query (inference: the last instruction token; training:
  each token before an answer), head mean, image columns, mean over queries; top-k, ascending.

Choices made here: with ``keep_ratio=r`` and no ratios the stages are ``r^(1/3), r^(2/3), r`` (the paper's
geometric lambda schedule; lambda = 0.5 gives the defaults). Counts floor ``N * ratio`` as the reference's
``int()`` (an optional tolerance keeps float noise such as ``90 * 0.7 = 62.99...`` from losing a token).
Other depths: the layers are scaled by ``round(layer * depth / 32)`` (the same relative depths as on the
32-layer Vicuna-7B).
"""

from __future__ import annotations

import math

import torch

from tokprune.kernels import select_topk

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_RATIOS",
    "pdrop_ratios",
    "pdrop_scores",
    "pdrop_select",
    "scale_layers",
    "stage_counts",
]

DEFAULT_LAYERS = (8, 16, 24)  # 0-based layers *before* which tokens are dropped (reference 1-based "after")
DEFAULT_RATIOS = (0.5, 0.25, 0.125)
REFERENCE_DEPTH = 32


def pdrop_ratios(keep_ratio: float | None = None, ratios: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """Per-stage kept fractions of the original image tokens: explicit ``ratios``, or ``r^(i/n)`` for
    ``keep_ratio = r`` over n = 3 stages, or the defaults. Must be non-increasing in (0, 1]."""
    if ratios is not None and keep_ratio is not None:
        raise ValueError("give keep_ratio or ratios, not both")
    if ratios is None:
        ratios = DEFAULT_RATIOS if keep_ratio is None else tuple(keep_ratio ** (i / 3) for i in (1, 2, 3))
    ratios = tuple(float(r) for r in ratios)
    if any(not 0 < r <= 1 for r in ratios) or any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios must be non-increasing fractions in (0, 1], got {ratios}")
    return ratios


def scale_layers(depth: int, layers: tuple[int, ...] = DEFAULT_LAYERS, reference_depth: int = REFERENCE_DEPTH):
    """The cut layers at the same relative depth on a ``depth``-layer LLM: ``round(l * depth / reference_depth)``
    (28 layers: 7, 14, 21; 36: 9, 18, 27). Raises when two cuts collide or fall outside 1..depth-1."""
    out = tuple(round(x * depth / reference_depth) for x in layers)
    if any(not 1 <= x < depth for x in out) or len(set(out)) != len(out):
        raise ValueError(f"layers {layers} do not scale to {depth} layers distinctly: {out}; give layers explicitly")
    return out


def stage_counts(n_image: int, ratios: tuple[float, ...], tolerance: float = 0.0) -> list[int]:
    """Image tokens kept at each stage: ``floor(n_image * ratio + tolerance)``; the default 0 is the reference's
    ``int()``, which loses a token to float noise (``int(90 * 0.7) == 62``); ``tolerance=1e-9`` avoids that."""
    return [math.floor(n_image * r + tolerance) for r in ratios]


def pdrop_scores(attn_image: torch.Tensor) -> torch.Tensor:
    """Ranking score (B, N) from attention rows over the image columns (B, H, Q, N), already softmaxed over the
    whole causal row: mean over heads, then over the Q query rows."""
    return attn_image.float().mean(dim=1).mean(dim=1)


def pdrop_select(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` best image tokens by ``scores`` (B, N), ascending (positions within the current image span)."""
    return select_topk(scores, keep)
