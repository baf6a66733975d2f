"""VFlowOpt rules (methods.md §4): hub-token importance map, patch entropy, grid-cell recycling, LLM stages.

Reference code (sihany077/VFlowOpt: ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``
(entropy, hub attention), ``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
(prune + recycle), ``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py`` (LLM stages), the lmms-eval wrapper
``llava_onevision_training_free.py`` (released configs)), reproduced here:

* importance map at one encoder layer: head-mean attention A (N x N); received ``r_j = mean_i A_ij``; hubs
  ``r_j > t * mean(r)``; ``c_j = mean_{k in hubs} A_kj`` (attention *from* the hubs); ``I = c + alpha *
  softmax(H)`` with H the per-patch grey-level entropy in bits (256 bins, ``log2(p + 1e-10)``, grey = 0.3333 per
  channel, rounded to an integer level);
* stage 1: drop ``reduce = round(N (1 - R1))`` plus ``int(N / a^2)`` extra lowest-importance tokens; group the
  dropped ones by grid cell ``(floor(row / a), floor(col / a))`` (base image and high-res part on their own
  grids: ``group``); in each non-empty cell the dropped token of highest importance comes back, carrying the
  importance-weighted mean ``sum I_i t_i / sum I_i`` of the cell's dropped tokens, at its own position and with
  its own importance; order preserved;
* LLM stages: drop the ``round(n (1 - R))`` current image tokens of lowest (vision) importance.

Deviations (documented in docs/rules.md): an empty hub set falls back to the received attention (the reference
divides by zero -> NaN); entropy is computed from the raw 0-255 pixels (the reference scales the *normalised*
tensor by 255 and wraps negatives through uint8; harmless there only because the released alpha is 0); ties in
the importance ordering and in a cell's representative go to the lower token index (the reference's unstable
sort leaves them unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.kernels import select_topk

__all__ = [
    "RELEASED",
    "RELEASED_25",
    "RecycleResult",
    "hub_attention",
    "importance_map",
    "layer_averaged_ratio",
    "llm_stage_keep",
    "patch_entropy",
    "recycle",
    "solve_last_ratio",
]

# The released 25% configuration for LLaVA-OneVision-7B (28 LLM layers, cuts before layers 9 and 18).
RELEASED = {
    0.50: {"t": 28.68, "alpha": 0.0, "cell": 11.76, "ratios": (0.7233, 0.7487, 0.487), "layers": (9, 18)},
    0.25: {"t": 34.76, "alpha": 0.0, "cell": 15.58, "ratios": (0.2651, 0.9833, 0.8773), "layers": (9, 18)},
    0.10: {"t": 39.26, "alpha": 0.0, "cell": 17.39, "ratios": (0.1166, 1.0, 0.6011), "layers": (9, 18)},
}
RELEASED_25 = RELEASED[0.25]  # the default configuration


def hub_attention(attn: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Context relevance from hub tokens. attn (B, H, N, N) softmax of one encoder layer.

    Returns ``(c (B, N), hubs (B, N) bool)``: ``c_j`` = mean over hub rows of the head-mean attention to j,
    with hubs = tokens whose received attention exceeds ``t`` times its mean. A row without hubs gets its
    received attention instead (never NaN).
    """
    a = attn.float().mean(dim=1)
    received = a.mean(dim=1)
    hubs = received > t * received.mean(dim=-1, keepdim=True)
    cnt = hubs.sum(dim=-1, keepdim=True)
    c = (hubs.float()[:, :, None] * a).sum(dim=1) / cnt.clamp(min=1)
    return torch.where(cnt > 0, c, received), hubs


def patch_entropy(
    pixels: torch.Tensor, patch: int = 14, weights: tuple[float, float, float] = (0.3333, 0.3333, 0.3333)
) -> torch.Tensor:
    """Shannon entropy (bits) of each patch's grey levels. pixels (B, 3, H, W) raw RGB in [0, 255]; returns
    (B, H // patch * W // patch) in raster order. grey = the weighted channel sum rounded to 0..255."""
    b, ch, h, w = pixels.shape
    p = pixels.float().unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, nh, nw, patch, patch)
    wt = torch.tensor(weights, dtype=torch.float32, device=pixels.device).view(1, ch, 1, 1, 1, 1)
    grey = (p * wt).sum(dim=1).flatten(3).round().clamp(0, 255).long()  # (B, nh, nw, patch*patch)
    grey = grey.flatten(1, 2)
    hist = torch.zeros(*grey.shape[:2], 256, device=pixels.device).scatter_add_(2, grey, torch.ones_like(grey).float())
    prob = hist / hist.sum(dim=-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(dim=-1)


def importance_map(context: torch.Tensor, entropy: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """``I = c + alpha * softmax_j(H_j)`` per row (B, N); ``alpha = 0`` (all released configs) ignores entropy."""
    if entropy is None or alpha == 0:
        return context.float()
    return context.float() + alpha * entropy.float().softmax(dim=-1)


@dataclass
class RecycleResult:
    """Output of :func:`recycle`: ``kept`` (K,) ascending token indices, ``features`` (K, D) (recycled tokens
    replaced by their cell's weighted mean), ``importance`` (K,), ``sources`` {kept index: absorbed indices}
    for the recycled tokens (their own index included, ascending)."""

    kept: torch.Tensor
    features: torch.Tensor
    importance: torch.Tensor
    sources: dict[int, list[int]]


def recycle(
    importance: torch.Tensor,
    features: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    keep_ratio: float,
    cell: float,
    group: torch.Tensor | None = None,
) -> RecycleResult:
    """Stage-1 prune + grid-cell recycling of one image's N tokens (importance (N,), features (N, D)).

    rows/cols (N,) grid coordinates of each token on its own grid; ``group`` (N,) separates grids (base image
    0, stitched high-res part 1); ``cell`` is the grid side a (a float). See the module docstring.
    """
    n = importance.shape[0]
    dev = importance.device
    imp = importance.float()
    reduce = round(n * (1 - keep_ratio))
    n_low = min(n, reduce + int(n / (cell * cell)))
    order = torch.sort(imp, stable=True).indices  # ascending, ties -> lower index first
    low = order[:n_low]
    keep_mask = torch.ones(n, dtype=torch.bool, device=dev)
    keep_mask[low] = False
    out = features.clone()
    sources: dict[int, list[int]] = {}
    if n_low:
        g = torch.zeros(n, dtype=torch.long, device=dev) if group is None else group.long()
        key = torch.stack([g, (rows.float() / cell).floor().long(), (cols.float() / cell).floor().long()], dim=1)
        _, cid = torch.unique(key[low], dim=0, return_inverse=True)
        n_cells = int(cid.max()) + 1
        w = imp[low]
        num = torch.zeros(n_cells, features.shape[-1], device=dev)
        num.index_add_(0, cid, w[:, None] * features[low].float())
        den = torch.zeros(n_cells, device=dev).index_add_(0, cid, w)
        cmax = torch.full((n_cells,), float("-inf"), device=dev).scatter_reduce(0, cid, w, "amax")
        cand = torch.where(w == cmax[cid], low, torch.full_like(low, n))
        rep = torch.full((n_cells,), n, dtype=torch.long, device=dev).scatter_reduce(0, cid, cand, "amin")
        out[rep] = (num / den[:, None]).to(features.dtype)
        keep_mask[rep] = True
        by_cell = torch.argsort(cid * n + low)  # cell-major, index ascending within a cell
        sizes = torch.bincount(cid, minlength=n_cells).tolist()
        for r, members in zip(rep.tolist(), torch.split(low[by_cell], sizes)):
            sources[r] = members.tolist()
    kept = torch.nonzero(keep_mask).flatten()
    return RecycleResult(kept, out[kept], imp[kept], dict(sorted(sources.items())))


def llm_stage_keep(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """An LLM stage: keep ``n - round(n (1 - ratio))`` of the current n image tokens by vision importance
    ((B, n) or (n,)), ascending."""
    n = importance.shape[-1]
    return select_topk(importance.float(), n - round(n * (1 - ratio)))


def layer_averaged_ratio(ratios: tuple[float, float, float], spans: tuple[int, int, int]) -> float:
    """The paper's budget: ``(R1 L1 + R1 R2 L2 + R1 R2 R3 L3) / L`` (spans = layers run at each stage)."""
    r1, r2, r3 = ratios
    l1, l2, l3 = spans
    return (r1 * l1 + r1 * r2 * l2 + r1 * r2 * r3 * l3) / (l1 + l2 + l3)


def solve_last_ratio(target: float, r1: float, r2: float, spans: tuple[int, int, int]) -> float:
    """R3 meeting a layer-averaged ``target`` given R1, R2 (the tuner's constraint), clipped to [0, 1]."""
    l1, l2, l3 = spans
    r3 = (target * (l1 + l2 + l3) - r1 * l1 - r1 * r2 * l2) / (r1 * r2 * l3)
    return min(max(r3, 0.0), 1.0)
