"""FlowCut rules (methods.md §3): per-layer scores, EMA, entropy-adaptive prune counts and the layer schedule.

FlowCut drops patch tokens between vision-encoder layers. Reference code (TungChintao/FlowCut,
``flowcut/modeling_clip_flowcut.py`` ``CLIPAttention_forward`` / ``CLIPEncoderLayer_forward`` /
``CLIPEncoder_forward``, ``flowcut/utils_flowcut.py`` ``compute_score`` / ``adaptive_prune_ratio``,
``flowcut/main.py``), reproduced here, in *patch* counts (the [CLS] token is kept throughout and not counted):

* after encoder layer i has run, while more than ``keep`` patches remain: layer score
  ``S = (a / Σa + s / Σs) * ||v̄||_1`` with ``a`` the head-mean [CLS] attention row over the patches (this
  layer's attention), ``s`` the head-mean of ``softmax_j(v_CLS · v_j)`` per head over *all* tokens with the
  [CLS] entry dropped (unscaled value dot products; the paper says cosine similarity: ``semantic="cosine"``),
  ``v̄`` the head-mean value vector (head_dim wide);
* cumulative score: the first such layer's S, then ``0.5 * S_cum + 0.5 * S``;
* remaining prune layers ``rpl = select_layer - i - 1`` (select_layer = num_layers - 2, the feature layer);
  layers with even ``rpl`` prune: ``P = round((N - keep) / sqrt(rpl) * (1 - r_H^2))`` with
  ``r_H = H(a / Σa) / log N`` (nats, N = current patches), the maximum over the batch before rounding, torch's
  round (half to even); at ``rpl = 0`` everything above ``keep`` goes, so layer ``select_layer - 1`` outputs
  exactly ``keep`` patches. New count ``max(N - P, keep)``; the survivors are the top by ``S_cum``, in
  ascending original order, and ``S_cum`` follows them.

Budgets (``flowcut_vit_target``): LLaVA-1.5 ``keep`` patches; LLaVA-NeXT ``int(keep / 2)`` per tile (§3.2,
2.5x the budget over 5 tiles while the paper says 2x), then an LLM cut at layer 1 to ``keep``
(:func:`flowcut_llm_scores`); Qwen2-VL ``8 * keep`` patches (``2 * keep`` merged tokens, §3.3) with the
global-query form (:func:`global_query_attention`, no semantic term), ``rpl = num_blocks - 1 - i`` and
``log(a + 1e-7)`` in the entropy (``FlowCut_Qwen/modeling_qwen2_vl_flowcut.py``, ``utils_flowcut.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.kernels import select_topk

__all__ = [
    "FlowCutState",
    "entropy_ratio",
    "flowcut_layer_score",
    "flowcut_llm_scores",
    "flowcut_plan",
    "flowcut_prune_count",
    "flowcut_schedule",
    "flowcut_step",
    "flowcut_vit_target",
    "global_query_attention",
    "remaining_prune_layers",
    "semantic_attention",
]


def semantic_attention(values: torch.Tensor, semantic: str = "dot") -> torch.Tensor:
    """Head-mean "semantic" attention of the [CLS] value to every patch value (B, N), from values (B, H, 1+N, d).

    ``"dot"`` (reference): per head ``softmax_j(v_0 · v_j)`` over all 1+N tokens, unscaled; head mean; CLS entry
    dropped. ``"cosine"`` (paper wording): the same with cosine similarity in place of the dot product.
    """
    v = values.float()
    if semantic == "cosine":
        v = v / v.norm(dim=-1, keepdim=True)
    elif semantic != "dot":
        raise ValueError(f"semantic must be 'dot' (reference) or 'cosine' (paper), got {semantic!r}")
    w = (v[:, :, :1] @ v.transpose(-1, -2)).squeeze(2).softmax(-1)  # (B, H, 1+N)
    return w.mean(dim=1)[:, 1:]


def global_query_attention(query: torch.Tensor, key: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """Qwen2-VL's CLS-free relevance (§3.3): ``mean_h softmax_j(q̄ · k_j * scaling)`` with ``q̄`` the token-mean
    query per head. query, key: (B, H, N, d); scaling defaults to ``d ** -0.5``. Returns (B, N)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    qbar = query.float().mean(dim=2, keepdim=True)
    return ((qbar @ key.float().transpose(-1, -2)).squeeze(2) * scaling).softmax(-1).mean(dim=1)


def flowcut_layer_score(
    cls_attention: torch.Tensor, value_mean: torch.Tensor, semantic: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's score ``(a/Σa + s/Σs) * ||v̄||_1`` (B, N); without ``semantic`` (Qwen) ``(a/Σa) * ||v̄||_1``.

    cls_attention (B, N): head-mean [CLS] (or global-query) row over the current patches; value_mean
    (B, N, d): head-mean value vectors of the patches; semantic (B, N) from :func:`semantic_attention`.
    """
    a = cls_attention.float()
    rel = a / a.sum(dim=-1, keepdim=True)
    if semantic is not None:
        s = semantic.float()
        rel = rel + s / s.sum(dim=-1, keepdim=True)
    return rel * value_mean.float().abs().sum(dim=-1)


def entropy_ratio(cls_attention: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``H(a / Σa) / log N`` per row (B,), natural logs. ``eps`` inside the log: 0 on CLIP as the reference (a
    zero entry gives NaN there too), ``1e-7`` in the reference's Qwen2-VL path (``FlowCut_Qwen/utils_flowcut.py``)."""
    p = cls_attention.float() / cls_attention.float().sum(dim=-1, keepdim=True)
    return -(p * (p + eps).log()).sum(dim=-1) / math.log(p.shape[-1])


def remaining_prune_layers(layer: int, select_layer: int) -> int:
    """``rpl = select_layer - layer - 1`` (0-based encoder layer; select_layer = the feature layer index)."""
    return select_layer - layer - 1


def flowcut_prune_count(cls_attention: torch.Tensor, rpl: int, keep: int, eps: float = 0.0) -> int:
    """Patches to drop at a pruning layer (even ``rpl``): ``round((N - keep)/sqrt(rpl) * (1 - r_H^2))``, the
    batch maximum before rounding (torch's half-to-even round); at ``rpl == 0`` all ``N - keep`` above keep.
    ``eps``: see :func:`entropy_ratio` (1e-7 for the Qwen2-VL form)."""
    n = cls_attention.shape[-1]
    if rpl == 0:
        return n - keep
    r = (n - keep) / rpl**0.5 * (1 - entropy_ratio(cls_attention, eps) ** 2)
    r = r.max()
    if not bool(torch.isfinite(r)):  # sync: once per pruning layer, the count is a host int anyway
        raise ValueError("flowcut: the vision encoder's attention is NaN / inf, so no token count can be derived; "
                         "check pixel_values for NaN or inf (e.g. torch.isfinite(pixel_values).all())")
    return int(r.round())


def flowcut_plan(num_layers: int, select_layer: int | None = None) -> list[tuple[int, int, bool]]:
    """(layer, rpl, prunes) for each encoder layer; ``prunes`` when ``rpl >= 0`` is even. Default select_layer =
    num_layers - 2 (CLIP: layers 1, 3, ..., 21 prune, 21 to exactly keep; 22 and 23 run on keep patches)."""
    sl = num_layers - 2 if select_layer is None else select_layer
    out = []
    for i in range(num_layers):
        rpl = remaining_prune_layers(i, sl)
        out.append((i, rpl, rpl >= 0 and rpl % 2 == 0))
    return out


def flowcut_schedule(
    n_patches: int,
    keep: int,
    prune_counts: dict[int, int] | None = None,
    entropy_ratios: dict[int, float] | None = None,
    num_layers: int = 24,
    select_layer: int | None = None,
) -> list[int]:
    """Patch count *output* by each encoder layer (what layer i+1 sees), given the data-dependent part.

    Give either ``prune_counts`` {layer: P} or ``entropy_ratios`` {layer: r_H} for the pruning layers (from
    which ``P = round((N - keep)/sqrt(rpl) * (1 - r_H^2))``, Python's half-to-even round). Layers that do not
    prune keep the count; the forced ``rpl = 0`` layer cuts to ``keep``; no layer goes below ``keep``.
    """
    n = n_patches
    out = []
    for i, rpl, prunes in flowcut_plan(num_layers, select_layer):
        if prunes and n > keep:
            if rpl == 0:
                p = n - keep
            elif prune_counts is not None:
                p = prune_counts[i]
            else:
                p = round((n - keep) / rpl**0.5 * (1 - entropy_ratios[i] ** 2))
            n = max(n - p, keep)
        out.append(n)
    return out


def flowcut_vit_target(keep: int, layout: str = "single") -> int:
    """Patches the vision encoder keeps: ``keep`` (LLaVA-1.5), ``int(keep / 2)`` per tile (LLaVA-NeXT anyres),
    ``8 * keep`` (Qwen2-VL: 2 keep merged tokens of 4 patches, then the LLM layer-1 cut to keep)."""
    if layout == "single":
        return keep
    if layout == "anyres":
        return int(keep / 2)
    if layout == "qwen2":
        return 4 * 2 * keep
    raise ValueError(f"layout must be 'single', 'anyres' or 'qwen2', got {layout!r}")


@dataclass
class FlowCutState:
    """Carried between encoder layers: ``cumulative`` (B, N) scores of the current patches (None before the
    first scored layer) and ``index`` (B, N) their original patch indices."""

    cumulative: torch.Tensor | None
    index: torch.Tensor


def flowcut_step(
    state: FlowCutState,
    layer: int,
    select_layer: int,
    keep: int,
    cls_attention: torch.Tensor,
    value_mean: torch.Tensor,
    semantic: torch.Tensor | None = None,
    history: float = 0.5,
    eps: float = 0.0,
) -> tuple[FlowCutState, torch.Tensor | None]:
    """One encoder layer of FlowCut after it has run: update the EMA and, on a pruning layer, select.

    Returns ``(new_state, keep_idx)`` with ``keep_idx`` (B, N') ascending positions *into the current patches*
    to keep (None when nothing is dropped at this layer). ``history`` is the EMA weight of the past (0.5);
    ``eps`` the entropy's log epsilon (CLIP 0, Qwen2-VL 1e-7). Qwen2-VL: ``semantic=None`` and
    ``select_layer = num_blocks``.
    """
    n = cls_attention.shape[-1]
    if n <= keep:
        return state, None
    cur = flowcut_layer_score(cls_attention, value_mean, semantic)
    cum = cur if state.cumulative is None else history * state.cumulative + (1 - history) * cur
    rpl = remaining_prune_layers(layer, select_layer)
    if rpl < 0 or rpl % 2:
        return FlowCutState(cum, state.index), None
    new_n = max(n - flowcut_prune_count(cls_attention, rpl, keep, eps), keep)
    idx = select_topk(cum, new_n)
    return FlowCutState(torch.gather(cum, 1, idx), torch.gather(state.index, 1, idx)), idx


def flowcut_llm_scores(
    q_last: torch.Tensor, k_vis: torch.Tensor, v_last: torch.Tensor, v_vis: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """LLM layer-1 score of the visual tokens (§3.2/3.3): ``(rel/Σrel + sem/Σsem) * ||mean_h v_j||_1`` with
    ``rel = mean_h softmax_{j in vis}(q_last·k_j * scaling)`` and ``sem`` the same with ``v_last·v_j``; both
    softmaxes run over the visual keys only. q_last, v_last (B, H, d); k_vis, v_vis (B, H, N, d) post-RoPE,
    KV heads already repeated. (Qwen's un-normalised ``rel + sem`` is the same: each already sums to 1.)"""
    scaling = q_last.shape[-1] ** -0.5 if scaling is None else scaling
    rel = ((k_vis.float() @ q_last.float()[..., None]).squeeze(-1) * scaling).softmax(-1).mean(dim=1)
    sem = ((v_vis.float() @ v_last.float()[..., None]).squeeze(-1) * scaling).softmax(-1).mean(dim=1)
    return flowcut_layer_score(rel, v_vis.float().mean(dim=1), sem)
