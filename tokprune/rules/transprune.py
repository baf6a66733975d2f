"""TransPrune rules (methods.md §5): token transition variation (TTV), instruction-guided attention (IGA).

Reference code (liaolea/TransPrune, ``llava/model/modeling_llama_transprune.py``: ``LlamaDecoderLayer.forward``
+ ``compute_transf_weight``, ``transprune_forward``, ``transprune_rank_drop``; the eval scripts'
``--accmulating_layer_list '[7,...,12]' --pruning_layer_list '[7,9,12]' --image_token_ratio_list
"[0.875,0.625,0.125]"``), reproduced here:

* per sub-module (attention, FFN) of an accumulation layer, x = the module input after its norm and y = its
  output before the residual: ``TTV = (||y|| / ||x||) * softmax_tokens(1 - cos(x, y))`` with the softmax over
  *all* tokens of the sequence (the paper writes ``1 - |cos|``: ``direction="paper"``); layer TTV = attention +
  FFN;
* accumulation layers 1-based 7..12 = 0-based 6..11; a cut "after layer p" (1-based) happens before 0-based
  layer p and sums the TTV of the accumulation layers that already ran (0-based < p); after each cut the stored
  per-layer TTV vectors follow the survivors;
* IGA at a cut: attention rows of every instruction token (all text after the image up to the end of the
  prompt) with the next layer's norm, q/k and RoPE, softmax over the causal row, head mean, image columns,
  mean over the instruction rows;
* both vectors normalised ``v / (v.sum() + 1e-8)`` over the current image tokens and summed (the paper's
  ``alpha * TTV + (1 - alpha) * IGA`` with alpha = 0.5 ranks identically; ``alpha=`` applies the paper's form);
  top ``int(N * ratio)`` of the original N, ascending.

Deviation: the reference's softmax divides by the sum over the whole batch tensor (it assumes batch 1); here
the softmax runs per sample over its valid tokens (identical at batch 1 without padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokprune.kernels import select_topk

__all__ = [
    "DEFAULT_ACCUMULATE_LAYERS",
    "DEFAULT_LAYERS",
    "DEFAULT_RATIOS",
    "accumulate_ttv",
    "iga_scores",
    "layers_accumulated_before",
    "normalise",
    "transition_weight",
    "transition_weight_of",
    "transprune_counts",
    "transprune_scores",
    "transprune_select",
]

DEFAULT_ACCUMULATE_LAYERS = tuple(range(6, 12))  # 0-based (reference 1-based 7..12)
DEFAULT_LAYERS = (7, 9, 12)  # 0-based layers before which tokens are dropped (reference: after 1-based 7, 9, 12)
DEFAULT_RATIOS = (0.875, 0.625, 0.125)  # TransPrune-High, fractions of the original image tokens


def transition_weight(
    x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None, direction: str = "code"
) -> torch.Tensor:
    """TTV of one sub-module per token (B, T): ``||y||/||x|| * softmax_T(delta)``, x/y (B, T, D).

    ``direction="code"``: ``delta = 1 - cos(x, y)``; ``"paper"``: ``1 - |cos(x, y)|``. ``valid`` (B, T) bool
    excludes padding from the softmax (their TTV is 0).
    """
    x, y = x.float(), y.float()
    return transition_weight_of(x.norm(dim=-1), y.norm(dim=-1), F.cosine_similarity(x, y, dim=-1), valid, direction)


def transition_weight_of(
    x_norm: torch.Tensor, y_norm: torch.Tensor, cos: torch.Tensor, valid: torch.Tensor | None = None,
    direction: str = "code"
) -> torch.Tensor:
    """:func:`transition_weight` from the per-token statistics ``||x||``, ``||y||``, ``cos(x, y)`` (B, T): what
    the decoder's observe hooks keep instead of the (B, T, D) states."""
    ratio = y_norm / x_norm
    if direction == "code":
        delta = 1 - cos
    elif direction == "paper":
        delta = 1 - cos.abs()
    else:
        raise ValueError(f"direction must be 'code' (1 - cos) or 'paper' (1 - |cos|), got {direction!r}")
    if valid is not None:
        delta = delta.masked_fill(~valid, float("-inf"))
    return ratio * delta.softmax(dim=-1)


def layers_accumulated_before(cut: int, accumulate_layers: tuple[int, ...] = DEFAULT_ACCUMULATE_LAYERS):
    """The accumulation layers whose TTV a cut before 0-based layer ``cut`` sums (those that already ran)."""
    return tuple(layer for layer in accumulate_layers if layer < cut)


def accumulate_ttv(per_layer: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Sum of per-layer TTV vectors (each (B, N) over the current image tokens) -> (B, N)."""
    stack = torch.stack(list(per_layer)) if isinstance(per_layer, list) else per_layer
    return stack.float().sum(dim=0)


def normalise(v: torch.Tensor) -> torch.Tensor:
    """``v / (v.sum() + 1e-8)`` per row, as the reference normalises both TTV and IGA."""
    v = v.float()
    return v / (v.sum(dim=-1, keepdim=True) + 1e-8)


def iga_scores(attn_image: torch.Tensor) -> torch.Tensor:
    """IGA (B, N) from instruction rows over the image columns (B, H, Q, N) (softmaxed over the causal row):
    head mean, then the mean over the Q instruction tokens."""
    return attn_image.float().mean(dim=1).mean(dim=1)


def transprune_scores(ttv: torch.Tensor, iga: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """``norm(TTV) + norm(IGA)`` (reference); with ``alpha``: ``alpha norm(TTV) + (1 - alpha) norm(IGA)``."""
    t, a = normalise(ttv), normalise(iga)
    return t + a if alpha is None else alpha * t + (1 - alpha) * a


def transprune_counts(n_image: int, ratios: tuple[float, ...] = DEFAULT_RATIOS) -> list[int]:
    """Image tokens kept after each cut: ``int(n_image * ratio)`` of the original count (576 -> 504, 360, 72)."""
    return [int(n_image * r) for r in ratios]


def transprune_select(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` best current image tokens by ``scores`` (B, N), ascending."""
    return select_topk(scores, keep)
