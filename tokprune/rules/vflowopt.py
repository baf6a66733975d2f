"""VFlowOpt rules (methods.md §4): hub-token importance map, patch entropy, grid-cell recycling, LLM stages.

Reference code (sihany077/VFlowOpt: ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``
(entropy, hub attention), ``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
(prune + recycle), ``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py`` (LLM stages), the lmms-eval wrapper
``llava_onevision_training_free.py`` (released configs)), reproduced here:

* importance map at one encoder layer: head-mean attention A (N x N); received ``r_j = mean_i A_ij``; hubs
  ``r_j > t * mean(r)``; ``c_j = mean_{k in hubs} A_kj`` (attention *from* the hubs); ``I = c + alpha *
  softmax(H)`` with H the per-patch grey-level entropy in bits (256 bins, ``log2(p + 1e-10)``, each channel at its
  integer level, grey = 0.3333 per channel, rounded to an integer level), the softmax over each encoder crop's
  patches;
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
    "pixel_levels",
    "recycle",
    "solve_last_ratio",
    "solve_stages",
    "stage_counts",
    "token_entropy",
    "Recycling",
    "recycle_to",
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


def pixel_levels(pixels: torch.Tensor) -> torch.Tensor:
    """Integer 0..255 levels of raw pixels un-normalised in floating point: rounded and clamped, per channel, as
    the reference's uint8 cast of each channel before the grey sum (it truncates; on integer-valued input the
    same). With CLIP's mean / std, 255 * (x * std + mean) is within 3e-5 of the image's integers from float32
    ``pixel_values``, 0.06 from float16, 0.53 from bfloat16 (rounding recovers all but 1 of the 768 channel
    levels there; summing unrounded channels shifts many grey levels)."""
    return pixels.float().round().clamp(0, 255)


def patch_entropy(
    pixels: torch.Tensor, patch: int = 14, weights: tuple[float, float, float] = (0.3333, 0.3333, 0.3333)
) -> torch.Tensor:
    """Shannon entropy (bits) of each patch's grey levels. pixels (B, 3, H, W) raw RGB in [0, 255]; returns
    (B, H // patch * W // patch) in raster order. Each channel is first taken to its integer level (rounded,
    clamped to 0..255: the reference's uint8 cast), grey = the weighted channel sum rounded."""
    b, ch, h, w = pixels.shape
    p = pixel_levels(pixels).unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, nh, nw, patch, patch)
    wt = torch.tensor(weights, dtype=torch.float32, device=pixels.device).view(1, ch, 1, 1, 1, 1)
    grey = (p * wt).sum(dim=1).flatten(3).round().clamp(0, 255).long()  # (B, nh, nw, patch*patch)
    grey = grey.flatten(1, 2)
    hist = torch.zeros(*grey.shape[:2], 256, device=pixels.device).scatter_add_(2, grey, torch.ones_like(grey).float())
    prob = hist / hist.sum(dim=-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(dim=-1)


def token_entropy(pixels: torch.Tensor, weights: tuple[float, float, float] = (0.3333, 0.3333, 0.3333)
                  ) -> torch.Tensor:
    """Shannon entropy (bits) of each token's grey levels. pixels (n, 3, V) raw RGB in [0, 255], the V pixel values
    of each token's patch (a Qwen merge unit: its 4 patches x 2 frames); each channel taken to its integer level
    first (:func:`pixel_levels`), grey = the weighted channel sum rounded, 256 bins, ``log2(p + 1e-10)`` as
    :func:`patch_entropy`. Returns (n,)."""
    wt = torch.tensor(weights, dtype=torch.float32, device=pixels.device).view(1, -1, 1)
    grey = (pixel_levels(pixels) * wt).sum(dim=1).round().clamp(0, 255).long()  # (n, V)
    hist = torch.zeros(grey.shape[0], 256, device=pixels.device).scatter_add_(1, grey, torch.ones_like(grey).float())
    prob = hist / hist.sum(dim=-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(dim=-1)


def importance_map(context: torch.Tensor, entropy: torch.Tensor | None = None, alpha: float = 0.0,
                   groups: torch.Tensor | None = None) -> torch.Tensor:
    """``I = c + alpha * softmax_j(H_j)`` per row (B, N); ``alpha = 0`` (all released configs) ignores entropy.

    ``groups`` (N,): the softmax runs separately over the tokens of each group id, as the reference's runs over
    each encoder crop's patches (LLaVA-NeXT: the base tile and every high-res tile on its own); None: one group."""
    if entropy is None or alpha == 0:
        return context.float()
    h = entropy.float()
    if groups is None:
        return context.float() + alpha * h.softmax(dim=-1)
    soft = torch.empty_like(h)
    for gid in torch.unique(groups).tolist():  # sync: once per image part, its tile ids (a handful)
        sel = groups == gid
        soft[..., sel] = h[..., sel].softmax(dim=-1)
    return context.float() + alpha * soft


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


@dataclass
class Recycling:
    """Output of :func:`recycle_to` for one image of n tokens, in the form of a vision decision: ``kept`` (ascending
    indices kept as they are), ``reps`` (m,) the representative of each recycled cell (where its new token sits),
    ``assign`` (n,) the recycled token each dropped token is merged into (-1: kept, or dropped for good),
    ``weights`` (n,) the merge weights (the importance, see :func:`recycle_to`)."""

    kept: torch.Tensor
    reps: torch.Tensor
    assign: torch.Tensor
    weights: torch.Tensor


def recycle_to(
    importance: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    keep: int,
    cell: float,
    group: torch.Tensor | None = None,
    weights: str = "clamped",
) -> Recycling:
    """Stage-1 prune + grid-cell recycling with an exact budget: ``keep`` = kept + recycled tokens.

    As :func:`recycle`, except for the number of dropped tokens: the reference drops ``round(N (1 - R1)) +
    int(N / a^2)`` (the extra ones approximately pay for the recycled tokens, so the count varies with the image);
    here the n_low lowest-importance tokens are dropped with n_low the smallest count such that ``N - n_low +
    cells(n_low) == keep`` (cells: the non-empty grid cells among the dropped). That count exists whenever
    ``keep >= cells(N)`` (each added drop lowers the total by 0 or 1); below that every token is dropped and only
    the ``keep`` cells whose representatives have the highest importance are recycled (the others' tokens are
    dropped for good). Merge weights (``weights``): ``"clamped"`` the importance (the reference's ``sum I_i t_i /
    sum I_i``) clamped at 0, a cell whose weights sum to 0 merging with equal weights; ``"signed"`` the
    reference's own, the signed importance (a negative importance, possible when ``alpha < 0``, extrapolates; a
    cell summing to exactly 0, where the reference divides by zero, merges with equal weights). Both are identical
    whenever importance is positive.
    """
    if weights not in ("clamped", "signed"):
        raise ValueError(f"vflowopt: merge weights must be 'clamped' or 'signed' (the reference's), got {weights!r}")
    n = importance.shape[0]
    dev = importance.device
    imp = importance.float()
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    if keep >= n:
        return Recycling(torch.arange(n, device=dev), assign[:0], assign, torch.ones(n, device=dev))
    g = torch.zeros(n, dtype=torch.long, device=dev) if group is None else group.long()
    rc, cc = (rows.float() / cell).floor().long(), (cols.float() / cell).floor().long()
    lo = torch.stack([rc.min(), cc.min()])
    rc, cc = rc - lo[0], cc - lo[1]  # >= 0 (LLaVA "full": the [CLS] token sits at row -1)
    # sync: once per image, the extent of its cell grid (the size of the per-cell tables)
    n_g, n_r, n_c = (torch.stack([g.max(), rc.max(), cc.max()]) + 1).tolist()
    cell_of = (g * n_r + rc) * n_c + cc  # dense cell id, < n_cells
    n_cells = n_g * n_r * n_c
    order = torch.sort(imp, stable=True).indices  # ascending, ties -> lower index first
    ranks = torch.arange(n, device=dev)
    first = torch.full((n_cells,), n, dtype=torch.long, device=dev).scatter_reduce(0, cell_of[order], ranks, "amin")
    opened = torch.zeros(n + 1, dtype=torch.long, device=dev).scatter_(0, first, 1)[:n]  # (slot n: empty cells)
    cells_at = torch.cat([opened.new_zeros(1), opened.cumsum(0)])  # cells among the n_low lowest, n_low = 0..n
    total = n - torch.arange(n + 1, device=dev) + cells_at  # tokens left after dropping n_low (non-increasing)
    hit = total == keep
    n_low_t = torch.where(hit.any(), hit.long().argmax(), torch.tensor(n, device=dev))
    # sync: once per image, how many tokens are dropped and how many cells they cover (output shapes)
    n_low, m = torch.stack([n_low_t, cells_at[n_low_t]]).tolist()
    low = order[:n_low]
    w = imp[low]
    cid = cell_of[low]
    cmax = torch.full((n_cells,), float("-inf"), device=dev).scatter_reduce(0, cid, w, "amax")
    cand = torch.where(w == cmax[cid], low, torch.full_like(low, n))
    rep_of = torch.full((n_cells,), n, dtype=torch.long, device=dev).scatter_reduce(0, cid, cand, "amin")
    if m > keep:  # fewer slots than cells: recycle the cells of the best representatives
        score = torch.where(rep_of < n, imp[rep_of.clamp(max=n - 1)], float("-inf"))
        best = torch.sort(-score, stable=True).indices[:keep]
        drop = torch.ones(n_cells, dtype=torch.bool, device=dev)
        drop[best] = False
        rep_of = rep_of.masked_fill(drop, n)
        m = keep
    reps, by_slot = torch.sort(rep_of)  # present cells first, by ascending slot
    reps = reps[:m]
    rank = torch.empty(n_cells, dtype=torch.long, device=dev)
    rank[by_slot] = torch.arange(n_cells, device=dev)
    rank = torch.where(rep_of < n, rank, -1)  # new-token index of each recycled cell, -1 for none
    assign[low] = rank[cid]
    w_all = imp.clamp(min=0) if weights == "clamped" else imp
    if m:
        src = assign >= 0
        at = assign.clamp(min=0)
        sums = torch.zeros(m, device=dev).index_add_(0, at, torch.where(src, w_all, 0.0))
        dead = sums[at] <= 0 if weights == "clamped" else sums[at] == 0
        w_all = torch.where(src & dead, torch.ones_like(w_all), w_all)
    return Recycling(order[n_low:].sort().values, reps, assign, w_all)


def stage_counts(k1: int, r2: float, r3: float) -> tuple[int, int, int]:
    """Counts after the three stages from the pre-LLM count ``k1``: each LLM stage drops ``round(n (1 - R))`` of
    its current n (the reference's rule), never below 1 token."""
    k2 = max(1, k1 - round(k1 * (1 - r2)))
    k3 = max(1, k2 - round(k2 * (1 - r3)))
    return k1, k2, k3


def solve_stages(n: int, keep: int, r2: float, r3: float, spans: tuple[int, int, int]) -> tuple[int, int, int]:
    """Stage counts whose layer average ``(k1 L1 + k2 L2 + k3 L3) / L`` is the closest to ``keep`` (within half a
    token: one more pre-LLM token moves the average by at most one), the LLM stages keeping ``r2`` / ``r3`` of
    their current tokens. When even ``k1 = n`` falls short, the earlier stages saturate (k1 = n, then k2 = n)."""
    l1, l2, l3 = spans
    total = l1 + l2 + l3

    def avg(c: tuple[int, int, int]) -> float:
        return (c[0] * l1 + c[1] * l2 + c[2] * l3) / total

    if keep >= n:
        return n, n, n

    def closest(make, lo: int, hi: int) -> tuple[int, int, int]:
        a, b = lo, hi  # smallest x in [lo, hi] with avg >= keep (avg grows with x)
        while a < b:
            mid = (a + b) // 2
            if avg(make(mid)) >= keep:
                b = mid
            else:
                a = mid + 1
        cands = [make(x) for x in {max(lo, a - 1), a}]
        return min(cands, key=lambda c: (abs(avg(c) - keep), c))

    if avg(stage_counts(n, r2, r3)) >= keep:
        return closest(lambda x: stage_counts(x, r2, r3), 1, n)
    if avg((n, n, stage_counts(n, 1.0, r3)[2])) >= keep:
        return closest(lambda x: (n, x, max(1, x - round(x * (1 - r3)))), 1, n)
    return closest(lambda x: (n, n, x), 1, n)
