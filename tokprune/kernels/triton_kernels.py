"""Triton implementations of top-k selection, gather and merge (CUDA, or CPU under ``TRITON_INTERPRET=1``).

The kernel bodies below are plain functions that are wrapped with ``triton.jit`` lazily, once per interpreter mode:
``triton.jit`` decides between the compiled and the interpreted kernel when it wraps, so wrapping at first use (and
again if ``TRITON_INTERPRET`` changes) makes the mode depend on the environment at call time, not import time.
As a consequence the kernels must not call triton.language's own jitted helpers (see ``_SUM``). Nothing here syncs
with the host on CUDA unless the caller asks for a check.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

import tokprune.kernels.reference as reference

from .dispatch import interpreter_enabled

ENV_GUARD = "TOKPRUNE_KERNELS_GUARD"
_GUARD_ELEMS = 1024
_GUARD_INT = -7777777
_GUARD_FLOAT = -7777.0
_MAX_TOPK_BLOCK = 1 << 16
_FLAG_SHORT = 1
_FLAG_OVER_MAX_K = 2

# The kernels call only builtins of triton.language (load/store/where/reduce/associative_scan/...), never its
# @jit-decorated helpers (tl.sum, tl.cumsum, tl.zeros): those helpers were wrapped for the mode that was active when
# triton was first imported, and a compiled-mode helper cannot be called from an interpreted kernel. Passing the
# standard sum combiner to tl.reduce / tl.associative_scan is what tl.sum / tl.cumsum do, and the interpreter
# recognises it and takes its numpy fast path.
_SUM = tl.standard._sum_combine


# --------------------------------------------------------------------------------------------------------------------
# Kernel bodies (wrapped with triton.jit in _kernels()).
# --------------------------------------------------------------------------------------------------------------------


def _topk_body(
    S, MASK, KVEC, OUT, SLOT, FLAG,
    N, K, KMAX,
    stride_sb, stride_sn, stride_mb, stride_mn, stride_ob, stride_lb,
    HAS_MASK: tl.constexpr, HAS_KVEC: tl.constexpr, WRITE_SLOT: tl.constexpr, SCORES_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """One program per row: bisection on the float bits finds the k-th largest key, then prefix sums place the kept
    indices in ascending order (ties to the lower index). Sort-free, so it is exact and cheap in the interpreter."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inb = offs < N
    if SCORES_BF16:  # S is the raw 16 bits: widen exactly (the interpreter's bf16 cast mishandles subnormals)
        raw = tl.load(S + b * stride_sb + offs * stride_sn, mask=inb, other=0)
        s = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        s = tl.load(S + b * stride_sb + offs * stride_sn, mask=inb, other=0.0).to(tl.float32)
    s = tl.where(s != s, float("-inf"), s)  # NaN -> -inf
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # same order as the floats
    valid = inb
    if HAS_MASK:
        mv = tl.load(MASK + b * stride_mb + offs * stride_mn, mask=inb, other=0)
        valid = valid & (mv != 0)
    u = tl.where(valid, key.to(tl.int64) + 2147483648, -1)  # in [0, 2**32); -1 = never selected
    if HAS_KVEC:
        kk = tl.load(KVEC + b).to(tl.int32)
    else:
        kk = K + tl.full([], 0, tl.int32)
    kk = tl.maximum(kk, 0)
    n_valid = tl.reduce(valid.to(tl.int32), 0, _SUM)
    flag = tl.where(n_valid < kk, 1, 0) + tl.where(kk > KMAX, 2, 0)
    kk = tl.minimum(kk, KMAX)
    # Largest t with count(u >= t) >= kk: the kk-th largest key (0 when the row has fewer than kk valid entries).
    t = tl.full([], 0, tl.int64)
    for i in range(32):
        cand = t | (tl.full([], 1, tl.int64) << (31 - i))
        cnt = tl.reduce((u >= cand).to(tl.int32), 0, _SUM)
        t = tl.where(cnt >= kk, cand, t)
    gt = u > t
    eq = u == t
    need = kk - tl.reduce(gt.to(tl.int32), 0, _SUM)
    keep = gt | (eq & (tl.associative_scan(eq.to(tl.int32), 0, _SUM) <= need))
    slot = tl.associative_scan(keep.to(tl.int32), 0, _SUM) - 1
    tl.store(OUT + b * stride_ob + slot, offs.to(tl.int64), mask=keep & (slot < KMAX))
    kept = tl.reduce(keep.to(tl.int32), 0, _SUM)
    for j0 in range(0, KMAX, BLOCK_T):
        oj = j0 + tl.arange(0, BLOCK_T)
        tl.store(OUT + b * stride_ob + oj, tl.full([BLOCK_T], -1, tl.int64), mask=(oj >= kept) & (oj < KMAX))
    if WRITE_SLOT:
        tl.store(SLOT + b * stride_lb + offs, tl.where(keep, slot, -1).to(tl.int64), mask=inb)
    tl.store(FLAG + b, flag)


def _gather_body(
    X, IDX, OUT,
    N, K, D,
    stride_xb, stride_xn, stride_xd, stride_ib, stride_ik, stride_ob, stride_ok,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (b, k-block, d-block) copies BLOCK_K index rows x BLOCK_D features; -1 (or out-of-range) -> zeros."""
    b = tl.program_id(0).to(tl.int64)
    ok = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    od = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    km = ok < K
    dm = od < D
    idx = tl.load(IDX + b * stride_ib + ok * stride_ik, mask=km, other=-1).to(tl.int64)
    rows = (idx >= 0) & (idx < N)
    src = X + b * stride_xb + idx[:, None] * stride_xn + od[None, :] * stride_xd
    vals = tl.load(src, mask=rows[:, None] & dm[None, :], other=0.0)
    dst = OUT + b * stride_ob + ok[:, None].to(tl.int64) * stride_ok + od[None, :]
    tl.store(dst, vals, mask=km[:, None] & dm[None, :])


def _merge_body(
    X, PERM, START, END, W, BASE, BW, OUT,
    M, D,
    stride_xb, stride_xn, stride_xd, stride_pb, stride_sb, stride_wb, stride_wn,
    stride_bb, stride_bm, stride_bd, stride_vb, stride_vm, stride_ob, stride_om,
    HAS_W: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (b, target, d-block) sums its sources (a segment of PERM, sources ordered by target) in float32 in a
    fixed order, adds the weighted base and divides: deterministic, no atomics, one launch."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1).to(tl.int64)
    od = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = od < D
    start = tl.load(START + b * stride_sb + m)
    end = tl.load(END + b * stride_sb + m)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    den = tl.full([BLOCK_S], 0.0, tl.float32)
    for j0 in range(start, end, BLOCK_S):
        oj = j0 + tl.arange(0, BLOCK_S)
        jm = oj < end
        src = tl.load(PERM + b * stride_pb + oj, mask=jm, other=0).to(tl.int64)
        if HAS_W:
            w = tl.load(W + b * stride_wb + src * stride_wn, mask=jm, other=0.0).to(tl.float32)
        else:
            w = jm.to(tl.float32)
        xv = tl.load(X + b * stride_xb + src[:, None] * stride_xn + od[None, :] * stride_xd,
                     mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc += tl.reduce(xv * w[:, None], 0, _SUM)
        den += w
    total = tl.reduce(den, 0, _SUM)
    if HAS_BASE:
        bw = tl.load(BW + b * stride_vb + m * stride_vm).to(tl.float32)
        bv = tl.load(BASE + b * stride_bb + m * stride_bm + od * stride_bd, mask=dm, other=0.0).to(tl.float32)
        acc += bw * bv
        total += bw
        fallback = bv
    else:
        fallback = tl.full([BLOCK_D], 0.0, tl.float32)
    safe = tl.where(total != 0.0, total, 1.0)
    out = tl.where(total != 0.0, acc / safe, fallback)
    tl.store(OUT + b * stride_ob + m * stride_om + od, out.to(OUT.dtype.element_ty), mask=dm)


_KERNEL_CACHE: dict[bool, dict[str, object]] = {}


def _kernels() -> dict[str, object]:
    """The jitted kernels for the current ``TRITON_INTERPRET`` mode (wrapped on first use of each mode)."""
    mode = interpreter_enabled()
    if mode not in _KERNEL_CACHE:
        _KERNEL_CACHE[mode] = {
            "topk": triton.jit(_topk_body),
            "gather": triton.jit(_gather_body),
            "merge": triton.jit(_merge_body),
        }
    return _KERNEL_CACHE[mode]


# --------------------------------------------------------------------------------------------------------------------
# Output allocation, with optional guard padding for tests (the interpreter does not bounds-check stores).
# --------------------------------------------------------------------------------------------------------------------


def _guard_on() -> bool:
    return os.environ.get(ENV_GUARD, "") == "1"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``; with ``TOKPRUNE_KERNELS_GUARD=1`` the tensor is a view into a buffer with sentinel padding on
    both sides, which :func:`_check_guards` verifies after the launch."""
    if not _guard_on():
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= s
    fill = _GUARD_FLOAT if dtype.is_floating_point else _GUARD_INT
    buf = torch.full((numel + 2 * _GUARD_ELEMS,), fill, dtype=dtype, device=device)
    return buf[_GUARD_ELEMS : _GUARD_ELEMS + numel].view(shape)


def _check_guards(*tensors: torch.Tensor) -> None:
    """Raise if a kernel wrote into the guard padding of an output made by :func:`_empty` (guard mode only)."""
    if not _guard_on():
        return
    for t in tensors:
        buf = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
        fill = _GUARD_FLOAT if t.dtype.is_floating_point else _GUARD_INT
        head, tail = buf[:_GUARD_ELEMS], buf[_GUARD_ELEMS + t.numel() :]
        if not (bool((head == fill).all()) and bool((tail == fill).all())):
            raise RuntimeError("Triton kernel wrote out of bounds (guard padding overwritten)")


def _launch(name: str, grid: tuple[int, ...], *args, num_warps: int = 4, **meta) -> None:
    """Launch a kernel; under the interpreter num_warps is irrelevant and is left out."""
    kernel = _kernels()[name]
    if interpreter_enabled():
        kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, num_warps=num_warps, **meta)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# --------------------------------------------------------------------------------------------------------------------
# Public wrappers (same signatures and semantics as tokprune.kernels.reference).
# --------------------------------------------------------------------------------------------------------------------


def _topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None,
    max_k: int | None,
    check: bool | None,
    want_slot: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Run the top-k kernel on 2-D scores; returns (indices, slot map or None, squeezed)."""
    squeeze = scores.dim() == 1
    s2 = scores.unsqueeze(0) if squeeze else scores
    if s2.dim() != 2:
        raise ValueError(f"scores must be (B, N) or (N,), got {tuple(scores.shape)}")
    if not s2.dtype.is_floating_point:
        raise TypeError(f"scores must be a float tensor, got {s2.dtype}")
    b, n = s2.shape
    device = s2.device
    if squeeze and isinstance(k, torch.Tensor):
        k = k.reshape(1)
    if max_k is not None and int(max_k) < 0:
        raise ValueError(f"max_k must be >= 0, got {max_k}")
    k_rows, width = reference.normalize_k(k, b, n, device, max_k)  # with max_k: no host sync
    m2 = None
    if mask is not None:
        m2 = mask.unsqueeze(0) if (squeeze and mask.dim() == 1) else mask
        if m2.shape != s2.shape or m2.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(s2.shape)}")
        m2 = m2.to(device).view(torch.uint8)
    if check is None:
        check = device.type == "cpu"
    block_n = max(16, _next_pow2(n))
    if block_n > _MAX_TOPK_BLOCK:  # a row this long does not fit one program's registers: use the reference
        idx = reference.select_topk(scores, k, mask, max_k=max_k, check=check)
        i2 = idx.unsqueeze(0) if squeeze else idx
        return i2, (reference.slots_from_indices(i2, n) if want_slot else None), squeeze
    if width == 0 or b == 0:  # nothing to select: no launch
        if check and k_rows is not None and bool((k_rows > width).any()):
            raise ValueError(f"per-row k exceeds max_k={width}")
        slot = torch.full((b, n), -1, dtype=torch.int64, device=device) if want_slot else None
        return torch.empty((b, width), dtype=torch.int64, device=device), slot, squeeze
    out = _empty((b, width), torch.int64, device)
    slot = _empty((b, n), torch.int64, device) if want_slot else out
    flag = _empty((b,), torch.int32, device)
    is_bf16 = s2.dtype == torch.bfloat16
    s_arg = s2.view(torch.int16) if is_bf16 else s2
    num_warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)
    _launch(
        "topk", (b,),
        s_arg, m2 if m2 is not None else s_arg, k_rows if k_rows is not None else flag, out, slot, flag,
        n, int(k) if k_rows is None else 0, width,
        s2.stride(0), s2.stride(1),
        m2.stride(0) if m2 is not None else 0, m2.stride(1) if m2 is not None else 0,
        out.stride(0), slot.stride(0),
        HAS_MASK=m2 is not None, HAS_KVEC=k_rows is not None, WRITE_SLOT=want_slot, SCORES_BF16=is_bf16,
        BLOCK_N=block_n, BLOCK_T=min(block_n, 1024), num_warps=num_warps,
    )  # fmt: skip
    _check_guards(out, slot, flag)
    if check:
        bad = flag.nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            code = int(flag[row])
            if code & _FLAG_OVER_MAX_K:
                raise ValueError(f"row {row}: per-row k exceeds max_k={width}")
            assert code & _FLAG_SHORT
            raise ValueError(f"row {row} has fewer selectable tokens than its k")
    return out, (slot if want_slot else None), squeeze


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_k: int | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """Triton :func:`tokprune.kernels.select_topk` (one launch, one program per row)."""
    idx, _, squeeze = _topk(scores, k, mask, max_k, check, want_slot=False)
    return idx.squeeze(0) if squeeze else idx


def _gather_blocks(k: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps): small tiles on GPU for parallelism, big ones in the interpreter (fewer
    programs, since each costs about 1 ms there)."""
    if interpreter_enabled():
        return min(64, _next_pow2(max(k, 1))), min(1024, _next_pow2(max(d, 1))), 4
    return 16, min(256, max(16, _next_pow2(d))), 4


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Triton :func:`tokprune.kernels.gather_tokens` (one launch)."""
    squeeze = x.dim() == 2 and idx.dim() == 1
    x3 = x.unsqueeze(0) if squeeze else x
    i2 = idx.unsqueeze(0) if squeeze else idx
    if x3.dim() != 3 or i2.dim() != 2 or i2.shape[0] != x3.shape[0]:
        raise ValueError(f"expected x (B, N, D) and idx (B, K), got {tuple(x.shape)} and {tuple(idx.shape)}")
    if i2.dtype.is_floating_point or i2.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {i2.dtype}")
    b, n, d = x3.shape
    kk = i2.shape[1]
    i2 = i2.to(x3.device)
    if x3.device.type == "cpu" and i2.numel() and (bool((i2 < -1).any()) or bool((i2 >= n).any())):
        raise IndexError(f"gather index out of range for N={n} (allowed -1..{n - 1})")
    out = _empty((b, kk, d), x3.dtype, x3.device)
    if out.numel():
        bk, bd, nw = _gather_blocks(kk, d)
        _launch(
            "gather", (b, triton.cdiv(kk, bk), triton.cdiv(d, bd)),
            x3, i2, out, n, kk, d,
            x3.stride(0), x3.stride(1), x3.stride(2), i2.stride(0), i2.stride(1), out.stride(0), out.stride(1),
            BLOCK_K=bk, BLOCK_D=bd, num_warps=nw,
        )  # fmt: skip
        _check_guards(out)
    return out.squeeze(0) if squeeze else out


def _segments(assign: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources ordered by target (stable) and each target's [start, end) in that order; device ops, no host sync.
    Skipped (-1) and out-of-range targets sort after every real target and so belong to no segment."""
    b = assign.shape[0]
    key = torch.where((assign >= 0) & (assign < m), assign, torch.full_like(assign, m))
    sorted_key, perm = torch.sort(key, dim=1, stable=True)
    bounds = torch.arange(m + 1, device=assign.device, dtype=sorted_key.dtype).expand(b, m + 1).contiguous()
    pos = torch.searchsorted(sorted_key.contiguous(), bounds)
    return perm.contiguous(), pos[:, :m].contiguous(), pos[:, 1:].contiguous()


def merge_tokens(
    x: torch.Tensor,
    assign: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_targets: int | None = None,
    base: torch.Tensor | None = None,
    base_weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Triton :func:`tokprune.kernels.merge_tokens`: a stable sort + searchsorted, then one deterministic launch."""
    x3, a2, w2, m, base3, bw = reference._merge_args(x, assign, weights, num_targets, base, base_weight)
    b, _, d = x3.shape
    out = _empty((b, m, d), x3.dtype, x3.device)
    if out.numel():
        perm, start, end = _segments(a2, m)
        if interpreter_enabled():
            bs, bd = 64, min(1024, _next_pow2(d))
        else:
            bs, bd = 16, min(256, max(16, _next_pow2(d)))
        _launch(
            "merge", (b, m, triton.cdiv(d, bd)),
            x3, perm, start, end, w2 if w2 is not None else start, base3 if base3 is not None else out,
            bw if bw is not None else start, out,
            m, d,
            x3.stride(0), x3.stride(1), x3.stride(2), perm.stride(0), start.stride(0),
            w2.stride(0) if w2 is not None else 0, w2.stride(1) if w2 is not None else 0,
            base3.stride(0) if base3 is not None else 0, base3.stride(1) if base3 is not None else 0,
            base3.stride(2) if base3 is not None else 0,
            bw.stride(0) if bw is not None else 0, bw.stride(1) if bw is not None else 0,
            out.stride(0), out.stride(1),
            HAS_W=w2 is not None, HAS_BASE=base3 is not None, BLOCK_S=bs, BLOCK_D=bd, num_warps=4,
        )  # fmt: skip
        _check_guards(out)
    return out.squeeze(0) if x.dim() == 2 else out


def prune(
    x: torch.Tensor,
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None,
    merge: str | None,
    *,
    keys: torch.Tensor | None,
    max_k: int | None,
    check: bool | None,
    result_type: type,
):
    """Triton :func:`tokprune.kernels.prune`: top-k launch (also writing the token -> slot map when merging), gather
    launch, and for ``"nearest"`` a bmm/argmax assignment plus the merge launch."""
    idx, slot, _ = _topk(scores, k, mask, max_k, check, want_slot=merge is not None)
    tokens = gather_tokens(x, idx)
    if merge is None:
        return result_type(idx, tokens)
    assign = _nearest_assign(x if keys is None else keys, idx, slot, mask)
    merged = merge_tokens(x, assign, num_targets=idx.shape[1])
    return result_type(idx, tokens, merged, assign)


def _nearest_assign(
    keys: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Same result as :func:`reference.nearest_assign`, reusing the slot map the top-k kernel wrote."""
    b, n, _ = keys.shape
    kn = torch.nn.functional.normalize(keys.to(torch.float32), dim=-1)
    if idx.shape[1] == 0:
        nearest = torch.full((b, n), -1, dtype=torch.int64, device=keys.device)
    else:
        kept = gather_tokens(kn, idx)
        sim = torch.bmm(kn, kept.transpose(1, 2)).masked_fill((idx < 0).unsqueeze(1), float("-inf"))
        nearest = sim.argmax(dim=2)
        nearest = torch.where((idx >= 0).any(dim=1, keepdim=True), nearest, torch.full_like(nearest, -1))
    assign = torch.where(slot >= 0, slot, nearest)
    if mask is not None:
        assign = torch.where(mask.to(keys.device), assign, torch.full_like(assign, -1))
    return assign
