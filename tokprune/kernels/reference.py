"""PyTorch reference implementations of the pruning tail (top-k, gather, merge).

These run on any device, are used on CPU and when Triton is unavailable, and are the oracle the Triton kernels
are tested against. Semantics (ties, -1 padding, NaN handling) are defined here and documented in docs/kernels.md.
"""

from __future__ import annotations

import heapq

import torch

__all__ = [
    "canonical_scores",
    "facility_location",
    "facility_location_lazy",
    "gather_tokens",
    "merge_tokens",
    "nearest_assign",
    "normalize_k",
    "select_topk",
    "slots_from_indices",
]

_INT32_SIGN_FLIP = 0x7FFFFFFF


def canonical_scores(scores: torch.Tensor) -> torch.Tensor:
    """Return scores as float32 with NaN -> -inf and -0.0 -> +0.0, the values both backends compare."""
    s = scores.to(torch.float32)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    return torch.where(s == 0, torch.zeros_like(s), s)


def _order_key(s: torch.Tensor) -> torch.Tensor:
    """Map canonical float32 scores to int64 keys in [0, 2**32) with the same order (the float-bits trick)."""
    bits = s.contiguous().view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ _INT32_SIGN_FLIP)
    return key.to(torch.int64) + 2**31


def normalize_k(
    k: int | torch.Tensor, batch: int, n: int, device: torch.device, max_k: int | None = None
) -> tuple[torch.Tensor | None, int]:
    """Validate ``k`` and return ``(k_per_row or None, width)`` where width is the output's last dimension.

    An int ``k`` gives ``(None, k)`` (or ``max_k`` as the width when given). A tensor gives the per-row counts on
    ``device`` and ``max_k``, or else their maximum (reading it from a CUDA tensor is a host sync).
    """
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool:
            raise TypeError(f"per-row k must be an integer tensor, got {k.dtype}")
        if k.dim() != 1 or k.shape[0] != batch:
            raise ValueError(f"per-row k must have shape ({batch},), got {tuple(k.shape)}")
        if max_k is not None:
            width = int(max_k)
        else:
            width = int(k.max()) if batch > 0 else 0
        return k.to(device=device, dtype=torch.int64), width
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of tokens N={n}")
    if max_k is not None and int(max_k) < k:
        raise ValueError(f"max_k={max_k} is smaller than k={k}")
    return None, (k if max_k is None else int(max_k))


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_k: int | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, in ascending (original) order; see ``tokprune.kernels``.

    Implementation: each score becomes a unique int64 key ``(order_key << 31) | (N - 1 - n)`` so that one
    ``topk`` gives the exact deterministic ranking (ties to the lower index); masked entries get key -1.
    """
    squeeze = scores.dim() == 1
    s2 = scores.unsqueeze(0) if squeeze else scores
    if s2.dim() != 2:
        raise ValueError(f"scores must be (B, N) or (N,), got {tuple(scores.shape)}")
    if not s2.dtype.is_floating_point:
        raise TypeError(f"scores must be a float tensor, got {s2.dtype}")
    b, n = s2.shape
    if squeeze and isinstance(k, torch.Tensor):
        k = k.reshape(1)
    if max_k is not None and int(max_k) < 0:
        raise ValueError(f"max_k must be >= 0, got {max_k}")
    k_rows, width = normalize_k(k, b, n, s2.device, max_k)
    m2 = None
    if mask is not None:
        m2 = mask.unsqueeze(0) if (squeeze and mask.dim() == 1) else mask
        if m2.shape != s2.shape or m2.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(s2.shape)}")
        m2 = m2.to(s2.device)
    if check is None:
        check = s2.device.type == "cpu"
    need = k_rows if k_rows is not None else torch.full((b,), int(k), dtype=torch.int64, device=s2.device)
    if check:
        avail = m2.sum(dim=1) if m2 is not None else torch.full_like(need, n)
        short = need > avail
        if bool(short.any()):  # sync: only when checking (default: on CPU only, see docs/kernels.md)
            row = int(short.nonzero()[0, 0])
            raise ValueError(f"row {row} has {int(avail[row])} selectable tokens but k={int(need[row])}")
        # sync: only when checking (default: on CPU only)
        if k_rows is not None and max_k is not None and bool((k_rows > width).any()):
            raise ValueError(f"per-row k exceeds max_k={width}")
    if width == 0:
        out = torch.empty((b, 0), dtype=torch.int64, device=s2.device)
        return out.squeeze(0) if squeeze else out

    arange = torch.arange(n, device=s2.device, dtype=torch.int64)
    comp = (_order_key(canonical_scores(s2)) << 31) | (n - 1 - arange)
    if m2 is not None:
        comp = comp.masked_fill(~m2, -1)
    take = min(width, n)
    vals, pos = comp.topk(take, dim=1, largest=True, sorted=True)
    rank = torch.arange(take, device=s2.device, dtype=torch.int64)
    valid = (vals >= 0) & (rank.unsqueeze(0) < need.unsqueeze(1))
    pos = torch.where(valid, pos, torch.full_like(pos, n)).sort(dim=1).values
    pos = torch.where(pos == n, torch.full_like(pos, -1), pos)
    if take < width:
        pos = torch.cat([pos, pos.new_full((b, width - take), -1)], dim=1)
    return pos.squeeze(0) if squeeze else pos


def slots_from_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse map of sorted kept indices: ``slot[b, idx[b, j]] = j``; tokens not kept (and -1 pads) give -1."""
    b, width = idx.shape
    slot = torch.full((b, n + 1), -1, dtype=torch.int64, device=idx.device)
    target = torch.where(idx >= 0, idx, torch.full_like(idx, n))
    src = torch.arange(width, device=idx.device, dtype=torch.int64).expand(b, width)
    slot.scatter_(1, target, torch.where(idx >= 0, src, torch.full_like(src, -1)))
    return slot[:, :n]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]]`` with zeros where ``idx`` is -1; returns a contiguous tensor of x's dtype."""
    squeeze = x.dim() == 2 and idx.dim() == 1
    x3 = x.unsqueeze(0) if squeeze else x
    i2 = idx.unsqueeze(0) if squeeze else idx
    if x3.dim() != 3 or i2.dim() != 2 or i2.shape[0] != x3.shape[0]:
        raise ValueError(f"expected x (B, N, D) and idx (B, K), got {tuple(x.shape)} and {tuple(idx.shape)}")
    b, n, _ = x3.shape
    i2 = i2.to(device=x3.device, dtype=torch.int64)
    # sync: on CPU only (a CPU "sync" costs nothing); CUDA gives zero rows for bad indices instead
    cpu = x3.device.type == "cpu"
    if cpu and i2.numel() and (bool((i2 < -1).any()) or bool((i2 >= n).any())):
        raise IndexError(f"gather index out of range for N={n} (allowed -1..{n - 1})")
    rows = torch.arange(b, device=x3.device).unsqueeze(1)
    # on CPU, where reading a flag costs nothing, an index without -1 (an LLM stage's slots) skips the zero-fill
    # pass: advanced indexing already returns a fresh contiguous tensor, so no second copy of the hidden states
    if cpu and not bool((i2 == -1).any()):
        out = x3[rows, i2]
        return out.squeeze(0) if squeeze else out
    valid = i2 >= 0
    out = x3[rows, i2.clamp(min=0)]
    out = out.masked_fill(~valid.unsqueeze(-1), 0).contiguous()
    return out.squeeze(0) if squeeze else out


def merge_tokens(
    x: torch.Tensor,
    assign: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_targets: int | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Weighted average of source tokens into targets, accumulated in float32 (formula in ``tokprune.kernels``)."""
    x3, a2, w2, m, base3, bw = _merge_args(x, assign, weights, num_targets, base, base_weight)
    b, n, d = x3.shape
    valid = a2 >= 0
    w = w2 if w2 is not None else torch.ones((b, n), dtype=torch.float32, device=x3.device)
    w = torch.where(valid, w, torch.zeros_like(w))
    flat = torch.where(valid, a2, torch.zeros_like(a2)) + m * torch.arange(b, device=x3.device).unsqueeze(1)
    acc = torch.zeros((b * m, d), dtype=torch.float32, device=x3.device)
    acc.index_add_(0, flat.reshape(-1), (x3.to(torch.float32) * w.unsqueeze(-1)).reshape(b * n, d))
    den = torch.zeros(b * m, dtype=torch.float32, device=x3.device)
    den.index_add_(0, flat.reshape(-1), w.reshape(-1))
    acc, den = acc.view(b, m, d), den.view(b, m)
    if base3 is not None:
        base32 = base3.to(torch.float32)
        acc = acc + bw.unsqueeze(-1) * base32
        den = den + bw
        fallback = base32
    else:
        fallback = torch.zeros_like(acc)
    safe = torch.where(den != 0, den, torch.ones_like(den))
    out = torch.where((den != 0).unsqueeze(-1), acc / safe.unsqueeze(-1), fallback)
    out = out.to(x3.dtype)
    return out.squeeze(0) if x.dim() == 2 else out


def _merge_args(x, assign, weights, num_targets, base, base_weight):
    """Shared validation of merge arguments; returns 3-D/2-D views and base_weight as a float32 (B, M) tensor."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    a2 = assign.unsqueeze(0) if (squeeze and assign.dim() == 1) else assign
    if x3.dim() != 3 or a2.shape != x3.shape[:2]:
        raise ValueError(f"expected x (B, N, D) and assign (B, N), got {tuple(x.shape)} and {tuple(assign.shape)}")
    if a2.dtype.is_floating_point or a2.dtype == torch.bool:
        raise TypeError(f"assign must be an integer tensor, got {a2.dtype}")
    a2 = a2.to(device=x3.device, dtype=torch.int64)
    b = x3.shape[0]
    w2 = None
    if weights is not None:
        w2 = weights.unsqueeze(0) if (squeeze and weights.dim() == 1) else weights
        if w2.shape != a2.shape:
            raise ValueError(f"weights must have shape {tuple(a2.shape)}, got {tuple(weights.shape)}")
        w2 = w2.to(device=x3.device, dtype=torch.float32)
    base3 = None
    if base is not None:
        base3 = base.unsqueeze(0) if (squeeze and base.dim() == 2) else base
        if base3.dim() != 3 or base3.shape[0] != b or base3.shape[2] != x3.shape[2]:
            raise ValueError(f"base must be (B, M, D) matching x, got {tuple(base.shape)}")
        if num_targets is not None and int(num_targets) != base3.shape[1]:
            raise ValueError(f"num_targets={num_targets} does not match base.shape[1]={base3.shape[1]}")
        num_targets = base3.shape[1]
    if num_targets is None:
        num_targets = int(a2.max()) + 1 if a2.numel() else 0
    m = int(num_targets)
    # sync: on CPU only (a CPU "sync" costs nothing)
    if x3.device.type == "cpu" and a2.numel() and (bool((a2 < -1).any()) or bool((a2 >= m).any())):
        raise IndexError(f"assign out of range for num_targets={m} (allowed -1..{m - 1})")
    bw = None
    if base3 is not None:
        if base_weight is None:
            base_weight = 1.0
        if isinstance(base_weight, torch.Tensor):
            bw = base_weight.unsqueeze(0) if (squeeze and base_weight.dim() == 1) else base_weight
            bw = bw.to(device=x3.device, dtype=torch.float32).expand(b, m)
        else:
            bw = torch.full((b, m), float(base_weight), dtype=torch.float32, device=x3.device)
    elif base_weight is not None:
        raise ValueError("base_weight given without base")
    return x3, a2, w2, m, base3, bw


def nearest_assign(keys: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Map every token to the slot of its most cosine-similar kept token (kept tokens map to their own slot).

    ``keys`` (B, N, C), ``idx`` (B, K) sorted kept indices with -1 pads. Masked-out tokens (mask False) get -1.
    Similarities are computed in float32; ties go to the lower slot; a zero key is similar to nothing (all 0).
    """
    b, n, _ = keys.shape
    kn = torch.nn.functional.normalize(keys.to(torch.float32), dim=-1)
    kept = gather_tokens(kn, idx)
    sim = torch.bmm(kn, kept.transpose(1, 2))
    sim = sim.masked_fill((idx < 0).unsqueeze(1), float("-inf"))
    if idx.shape[1]:
        nearest = sim.argmax(dim=2)
        nearest = torch.where((idx >= 0).any(dim=1, keepdim=True), nearest, torch.full_like(nearest, -1))
    else:
        nearest = torch.full((b, n), -1, dtype=torch.int64, device=keys.device)
    slot = slots_from_indices(idx, n)
    assign = torch.where(slot >= 0, slot, nearest)
    if mask is not None:
        assign = torch.where(mask, assign, torch.full_like(assign, -1))
    return assign


def facility_location(
    sim: torch.Tensor,
    align: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    floor: float = 0.0,
) -> torch.Tensor:
    """Greedy maximisation of ``F(Y) = sum_x max_{y in Y} sim[y, x] + sum_{y in Y} align[y]`` per batch row.

    sim (B, S, S) candidate x covered similarity, align (B, S), k (B,) picks per row, valid (B, S) real tokens;
    ``floor``: the cover value of an empty selection (the similarity's minimum). Each step is one batched
    operation over rows and candidates: the marginal gain of every candidate ``sum_x max(0, sim[t, x] - cover[x])
    + align[t]`` against the running cover, the pick, then the incremental max-coverage update ``cover =
    max(cover, sim[best])``; padding neither covers (its cover starts at +inf) nor is picked. Returns (B, max k)
    indices in pick order, -1 padded; ties go to the lower index. This is the path for CUDA (no per-step host
    sync); on CPU :func:`facility_location_lazy` gives the same picks with a fraction of the work.
    """
    b, s, _ = sim.shape
    dev = sim.device
    width = int(k.max()) if b else 0  # sync: once per call, the number of greedy steps (a loop bound)
    cover = torch.where(valid, torch.full((b, s), floor, device=dev), torch.full((b, s), float("inf"), device=dev))
    picked = ~valid
    out = torch.full((b, width), -1, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    neg = torch.tensor(float("-inf"), device=dev)
    for step in range(width):
        gain = (sim - cover[:, None, :]).clamp_(min=0).sum(dim=-1).add_(align)
        best = torch.where(picked, neg, gain).argmax(dim=1)
        active = k > step
        out[:, step] = torch.where(active, best, torch.full_like(best, -1))
        cover = torch.where(active[:, None], torch.maximum(cover, sim[rows, best]), cover)
        picked = picked | ((torch.arange(s, device=dev)[None] == best[:, None]) & active[:, None])
    return out


def _gains(sim: torch.Tensor, cover: torch.Tensor, align: torch.Tensor) -> torch.Tensor:
    """Marginal gains of candidate rows ``sim`` (R, S) against ``cover`` (S,): the same float32 operations, in the
    same order, as one row of :func:`facility_location`'s batched step (each row reduced on its own)."""
    return (sim - cover).clamp_(min=0).sum(dim=-1).add_(align)


def facility_location_lazy(
    sim: torch.Tensor,
    align: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor,
    floor: float = 0.0,
    batch: int = 16,
) -> torch.Tensor:
    """The same picks as :func:`facility_location` (same arguments, same output), by lazy evaluation: one image at a
    time, a max-heap of each candidate's last computed gain keyed ``(-gain, index)``; a step re-evaluates the
    stale entries at the top, up to ``batch`` at once, until the top entry is fresh, and picks it.

    Exact, not approximate: the gain of a candidate is computed with the batched step's float32 operations
    (:func:`_gains`: each row's sum is reduced on its own, so its bits do not depend on which other rows are
    evaluated with it), and it cannot grow from step to step in float arithmetic either, since ``cover`` only
    grows, ``max(0, s - c)`` is monotone under rounding and so is a sum of non-negative terms in a fixed order. A
    stale gain is therefore an upper bound of the current one, and the fresh top of the heap is the exact argmax
    (ties: the lower index sorts first, as in the batched step). Most candidates are never re-evaluated (on a
    Qwen2.5-VL 1024x1024 image, 1369 tokens and 1026 picks, about 20 rows per pick instead of 1369), at the price
    of host work per step, so :func:`tokprune.kernels.facility_location` uses it on CPU only.
    """
    b, s, _ = sim.shape
    counts = [int(n) for n in k.tolist()]  # sync: CPU path; per-image loop bounds
    if any(n > int(v) for n, v in zip(counts, valid.sum(1).tolist())):  # sync: CPU path, as above
        raise ValueError("k exceeds the number of valid tokens of an image")
    out = torch.full((b, max(counts, default=0)), -1, dtype=torch.long, device=sim.device)
    for j, n in enumerate(counts):
        if n == 0:
            continue
        rows, bonus = sim[j], align[j]
        cover = torch.where(valid[j], torch.full((s,), floor, device=sim.device),
                            torch.full((s,), float("inf"), device=sim.device))
        ok = valid[j].tolist()  # sync: CPU path
        gains = _gains(rows, cover, bonus).tolist()  # sync: CPU path; step 0 evaluates every candidate
        heap = [(-g, t, 0) for t, (g, real) in enumerate(zip(gains, ok)) if real]
        heapq.heapify(heap)
        picks = []
        for step in range(n):
            while heap[0][2] != step:  # the top is stale: re-evaluate the stale entries above the first fresh one
                stale: list[int] = []
                fresh = None
                while heap and len(stale) < batch:
                    entry = heapq.heappop(heap)
                    if entry[2] == step:
                        fresh = entry  # it bounds every entry below it
                        break
                    stale.append(entry[1])
                idx = torch.tensor(stale, device=sim.device)
                new = _gains(rows.index_select(0, idx), cover, bonus.index_select(0, idx)).tolist()  # sync: CPU path
                for t, g in zip(stale, new):
                    heapq.heappush(heap, (-g, t, step))
                if fresh is not None:
                    heapq.heappush(heap, fresh)
            best = heapq.heappop(heap)[1]
            picks.append(best)
            cover = torch.maximum(cover, rows[best])
        out[j, :n] = torch.tensor(picks, device=sim.device)
    return out
