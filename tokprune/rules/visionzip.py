"""VisionZip selection and merge rules (methods.md §10): dominant tokens plus contextual (merged) tokens.

Reference code (dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``,
``visionzip/utils.py`` ``CLIPAttention_forward``, ``visionzip/main.py``), reproduced here:

* dominant: the [CLS] query's attention at the feature layer (``attentions[-2]``) **summed over heads**, over the
  patch keys; the top ``dominant - 1`` patches plus the [CLS] token itself (``visionzip(model, dominant=54)``
  stores ``dominant_num = 53``). Output order: [CLS], dominant patches in raster order, contextual tokens;
* contextual: the metric is the feature layer's keys (``k_proj`` output, before any scaling) averaged over
  heads, of the M patches left after the dominant ones (kept in raster order), L2-normalised. Targets are
  uniform over those M tokens: ``step = max(1, M // C)``, positions ``0, step, 2 step, ...`` (the first C).
  Every non-target token goes to its most similar target (dot product of the normalised keys = cosine;
  ``argmax``, ties to the lower target). Contextual token = **target hidden state + mean of the hidden
  states assigned to it** (the target itself is not part of that mean; a target nobody joins stays as it is,
  since the count is clamped to 1 over a zero sum). So the target weighs 1 and each of its n members 1/n.

CLS-free encoders (Qwen-VL): other papers (VFlowOpt, HiPrune) rank dominant tokens by received attention
instead; pass those scores and ``with_cls=False`` to :func:`visionzip_split` (every dominant slot is a patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.kernels import select_topk

__all__ = [
    "VisionZipSelection",
    "contextual_merge",
    "dominant_patches",
    "visionzip_select",
    "visionzip_split",
]

PAPER_SPLIT = (54, 10)  # README / paper default at 64 tokens: 54 dominant ([CLS] included) + 10 contextual


def visionzip_split(keep: int, dominant: int | None = None, contextual: int | None = None) -> tuple[int, int]:
    """(dominant, contextual) with ``dominant + contextual == keep``; ``dominant`` counts the [CLS] token.

    Default: the paper's 54:10 split scaled to ``keep`` (``dominant = round(keep * 54 / 64)``), which gives
    the commonly used 108+20 at 128 and 162+30 at 192. Give one of the two to fix it, or both (must sum to keep).
    """
    if dominant is None and contextual is None:
        dominant = round(keep * PAPER_SPLIT[0] / sum(PAPER_SPLIT))
    if dominant is None:
        dominant = keep - contextual
    if contextual is None:
        contextual = keep - dominant
    if dominant + contextual != keep or dominant < 0 or contextual < 0:
        raise ValueError(f"dominant={dominant} + contextual={contextual} must be non-negative and sum to keep={keep}")
    return dominant, contextual


def dominant_patches(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The top ``n`` patches by ``scores`` (B, N) (head-summed [CLS] row, or received attention), ascending."""
    return select_topk(scores, n)


def contextual_merge(
    metric: torch.Tensor, hidden: torch.Tensor | None, dominant: torch.Tensor, contextual: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Merge the non-dominant patches into ``contextual`` tokens by the reference's rule (see module docstring).

    metric (B, N, d): head-mean keys of the patches; hidden (B, N, D): their hidden states; dominant (B, n):
    dominant patch indices. Returns ``(tokens (B, C, D), targets (B, C) patch indices, assignment (B, N))``
    where ``assignment[b, j]`` is the contextual slot patch j went into (its own slot for a target, -1 for a
    dominant patch). ``hidden=None``: only targets and assignment, ``tokens`` is None (a caller that merges the
    tokens elsewhere, as the pruner does, skips the gather and the merge product).
    """
    b, n, _ = metric.shape
    dev = metric.device
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=dev)
    is_dom.scatter_(1, dominant, True)
    m = n - dominant.shape[1]
    if contextual == 0:
        assign = torch.full((b, n), -1, dtype=torch.long, device=dev)
        tokens = None if hidden is None else hidden.new_zeros(b, 0, hidden.shape[-1])
        return tokens, dominant.new_zeros(b, 0), assign
    if m < contextual:
        raise ValueError(f"{m} remaining patches cannot form {contextual} contextual tokens")
    rest = torch.argsort(is_dom.to(torch.int8), dim=1, stable=True)[:, :m]  # remaining patches, raster order
    step = max(1, m // contextual)
    tpos = torch.arange(0, m, step, device=dev)[:contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=dev)
    is_target[tpos] = True
    # sync: once per image, the non-target tokens (variable-size)
    mpos = torch.nonzero(~is_target).flatten()
    key = torch.gather(metric.float(), 1, rest[..., None].expand(-1, -1, metric.shape[-1]))
    key = key / key.norm(dim=-1, keepdim=True)
    sim = key[:, mpos] @ key[:, tpos].transpose(1, 2)  # (B, M - C, C)
    slot = sim.argmax(dim=2)
    tokens = None
    if hidden is not None:
        onehot = torch.zeros(b, mpos.numel(), contextual, dtype=hidden.dtype, device=dev)
        onehot.scatter_(2, slot[..., None], 1)
        counts = onehot.sum(dim=1).clamp(min=1)[..., None]
        h_rest = torch.gather(hidden, 1, rest[..., None].expand(-1, -1, hidden.shape[-1]))
        tokens = h_rest[:, tpos] + onehot.transpose(1, 2) @ h_rest[:, mpos] / counts
    assign = torch.full((b, n), -1, dtype=torch.long, device=dev)
    slot_of_rest = torch.empty(b, m, dtype=torch.long, device=dev)
    slot_of_rest[:, tpos] = torch.arange(contextual, device=dev)
    slot_of_rest[:, mpos] = slot
    assign.scatter_(1, rest, slot_of_rest)
    return tokens, rest[:, tpos], assign


@dataclass
class VisionZipSelection:
    """Result of :func:`visionzip_select`.

    dominant (B, n) patch indices ascending (without the [CLS] token); contextual (B, C, D) merged features;
    targets (B, C) their target patches; assignment (B, N) as :func:`contextual_merge`; sources[b][c] the
    patch indices contextual token c absorbed (target first, then its members ascending).
    """

    dominant: torch.Tensor
    contextual: torch.Tensor | None
    targets: torch.Tensor
    assignment: torch.Tensor
    sources: list[list[list[int]]] | None


def visionzip_select(
    scores: torch.Tensor,
    metric: torch.Tensor,
    hidden: torch.Tensor | None,
    dominant: int,
    contextual: int,
    with_cls: bool = True,
    sources: bool = True,
) -> VisionZipSelection:
    """The full VisionZip rule over the N patches of one encoder output (CLS excluded from all inputs).

    scores (B, N): head-summed [CLS] attention over patches (or received attention when CLS-free);
    metric (B, N, d): head-mean keys; hidden (B, N, D): feature-layer hidden states of the patches.
    ``dominant`` counts the [CLS] token when ``with_cls`` (then ``dominant - 1`` patches are picked and the
    caller emits the [CLS] hidden state first); output tokens = [CLS]?, hidden[dominant], contextual.
    ``hidden=None`` / ``sources=False``: the merged features / the per-token source lists are not built (the
    pruner merges from ``assignment`` and the record lists sources itself; the lists cost a host sync per
    contextual token).
    """
    n_patch = dominant - 1 if with_cls else dominant
    if n_patch < 0:
        raise ValueError("dominant must be >= 1 when it counts the [CLS] token")
    dom = dominant_patches(scores, n_patch)
    tokens, targets, assign = contextual_merge(metric, hidden, dom, contextual)
    if not sources:
        return VisionZipSelection(dom, tokens, targets, assign, None)
    sources = []
    for b in range(assign.shape[0]):  # record bookkeeping: one pass per contextual slot, not per token
        per = []
        for c in range(targets.shape[1]):
            # sync: once per contextual token, its sources for the record (variable-size)
            t = int(targets[b, c])
            # sync: once per contextual token, its sources for the record (variable-size)
            members = torch.nonzero(assign[b] == c).flatten().tolist()
            per.append([t] + [j for j in members if j != t])
        sources.append(per)
    return VisionZipSelection(dom, tokens, targets, assign, sources)
