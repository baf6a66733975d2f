"""Attention statistics computed from q/k, in plain PyTorch (no transformers): the rows of chosen queries, the
attention each key receives, and the split of a FlashAttention varlen call per sequence.

The taps of :mod:`tokprune.signals` call these inside any attention backend; a serving engine can call them on its
own q/k, since this module imports nothing but torch.
"""

from __future__ import annotations

import torch

#: query rows per block when received attention is accumulated (memory O(heads x chunk x keys))
RECEIVED_CHUNK = 256

#: query rows per block when received attention is read off the kernel's row log-sum-exps (smaller blocks stay
#: nearer the cache for the exponential and the column sum; 64 and 128 timed the same on CPU, 256 slower)
LSE_CHUNK = 64


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor,
    causal: bool,
    keys: torch.Tensor | None = None,
    model_dtype: bool = False,
) -> torch.Tensor:
    """Softmax attention probabilities of selected query rows over all keys, in float32.

    ``model_dtype`` (``score_dtype="model"``): the logits are computed in q/k's dtype and the probabilities
    rounded to it after a float32 softmax, as an eager kernel in fp16 / bf16 (the references') does; the result is
    still returned as float32 values.

    ``query`` (B, H, Q, d) and ``key`` (B, Hkv, K, d) as the attention function receives them; ``rows`` (B, R)
    long: per batch row, the query positions wanted. The mask may be a 4D bool (SDPA) or additive float (eager)
    mask, a 2D key-padding mask (FlashAttention) or None (then causality is rebuilt when ``causal``). ``keys``
    (B, K) bool, optional: the softmax domain is restricted to those keys (e.g. visual tokens only).
    Returns (B, H, R, K).
    """
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    r = rows.shape[1]
    q = torch.gather(query, 2, rows[:, None, :, None].expand(b, h, r, d))
    k = _repeat_kv(key, h // key.shape[1])
    if model_dtype:
        s = (torch.matmul(q, k.transpose(-1, -2)) * scaling).float()
    else:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[..., :kv].expand(b, -1, -1, -1)
        m = torch.gather(m, 2, rows[:, None, :, None].expand(b, m.shape[1], r, kv))
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    else:
        if attention_mask is not None:  # 2D key padding mask
            s = s.masked_fill(~attention_mask[:, None, None, -kv:].bool(), float("-inf"))
        if causal and q_len > 1:
            qpos = (rows + (kv - q_len))[:, None, :, None]
            s = s.masked_fill(torch.arange(kv, device=s.device) > qpos, float("-inf"))
    if keys is not None:
        s = s.masked_fill(~keys[:, None, None, :kv].to(s.device), float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)  # a row with no allowed key is all zero
    return p.to(query.dtype).float() if model_dtype else p


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk: int | None = None,
    model_dtype: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key *receives*: the column mean of softmax(q k^T) over all queries, per head, in float32
    (``model_dtype``: logits and probabilities rounded to q/k's dtype, as in :func:`attention_rows`).

    Bidirectional (encoder) attention only. ``query`` (B, H, Q, d), ``key`` (B, Hkv, K, d); a 4D bool / additive
    mask is honoured, and queries that see no key at all (padding) do not count. The softmax is computed for
    ``chunk`` query rows at a time (default :data:`RECEIVED_CHUNK`, or :data:`LSE_CHUNK` on the ``lse`` path), so
    memory stays O(B x H x chunk x K): never a Q x K matrix per head. ``lse`` (B, H, Q): the rows' log-sum-exps,
    when the attention kernel returned them for an unmasked call (:func:`received_from_lse`: no softmax pass here).
    Returns (B, H, K).
    """
    if lse is not None and attention_mask is None and not model_dtype:
        return received_from_lse(query, key, lse, scaling, chunk or LSE_CHUNK)
    chunk = chunk or RECEIVED_CHUNK
    b, h, q_len, _ = query.shape
    kv = key.shape[2]
    k = _repeat_kv(key, h // key.shape[1])
    k = k if model_dtype else k.float()
    if attention_mask is None and not model_dtype:  # every query sees every key: no mask pass, no dead rows
        return _received_unmasked(query.float(), k, scaling, chunk)
    total = torch.zeros(b, h, kv, dtype=torch.float32, device=query.device)
    counted = torch.zeros(b, h, 1, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        q = query[:, :, start:start + chunk]
        s = (torch.matmul(q if model_dtype else q.float(), k.transpose(-1, -2)) * scaling).float()
        if attention_mask is not None and attention_mask.dim() == 4:
            m = attention_mask[:, :, start:start + chunk, :kv]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        elif attention_mask is not None:  # 2D key padding mask
            s = s.masked_fill(~attention_mask[:, None, None, -kv:].bool(), float("-inf"))
        live = torch.isfinite(s).any(-1, keepdim=True)
        p = s.softmax(-1).masked_fill(~live, 0.0)
        if model_dtype:
            p = p.to(query.dtype).float()
        total += p.sum(2)
        counted += live.sum(2).float()
    return total / counted.clamp_min(1.0)


def _received_unmasked(query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int) -> torch.Tensor:
    """:func:`received_attention` without a mask, in float32: per chunk one scaled product (``baddbmm``), one
    softmax and one sum over the N x K block (no finiteness or fill pass: no query can be fully masked).

    The logits and probabilities of every chunk are written into buffers allocated once per call (``out=``), not
    into fresh tensors: a chunk block is tens of MB (Qwen2.5-VL's full-attention block: 16 heads x 256 x 5476
    floats = 90 MB), and a fresh allocation of that size is new pages from the OS each time (page faults and
    zeroing on every chunk), which took about half of this function's time on CPU. Same operations, same values."""
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    q3, kt = query.reshape(b * h, q_len, d), key.reshape(b * h, kv, d).transpose(1, 2)
    total = torch.zeros(b * h, kv, dtype=torch.float32, device=query.device)
    logits = torch.empty(b * h * min(chunk, q_len) * kv, dtype=query.dtype, device=query.device)
    probs = torch.empty_like(logits)
    for start in range(0, q_len, chunk):
        q = q3[:, start:start + chunk]
        shape = (b * h, q.shape[1], kv)
        n = shape[0] * shape[1] * kv  # a contiguous prefix of the buffers (the last chunk may be shorter)
        s, p = logits[:n].view(shape), probs[:n].view(shape)
        torch.baddbmm(s, q, kt, beta=0.0, alpha=scaling, out=s)
        torch.softmax(s, dim=-1, out=p)
        total += p.sum(1)
    return (total / q_len).view(b, h, kv)


def sdpa_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash-attention kernel that ``F.scaled_dot_product_attention`` runs for an unmasked, non-causal call
    without dropout, called directly so that it also hands back what it computes anyway: each query row's
    log-sum-exp of the scaled logits. Returns (output (B, H, Q, d), lse (B, H, Q) float32); the output is the one
    SDPA returns, bit for bit, when SDPA would pick this kernel (the caller checks that)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                         scale=scale)[:2]
    return out, lse.float()


def received_from_lse(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float,
                      chunk: int = LSE_CHUNK) -> torch.Tensor:
    """:func:`received_attention` of an unmasked call whose row log-sum-exps ``lse`` (B, H, Q) the attention kernel
    already computed (:func:`sdpa_with_lse`): a probability is then ``exp(scaling * q.k - lse)``, so no row max, row
    sum or division is needed. Equal to :func:`received_attention` up to float rounding (the kernel's row sums are
    accumulated in its own order). Returns (B, H, K).

    The exponent is one matrix product: each query row is extended by one column to ``(scaling * q, -lse)`` and
    each key by ``(k, 1)``, so a chunk is that product written into a buffer allocated once, an exponential in
    place and a column sum, in float32 (no separate bias or scaling pass over the chunk). The extended keys are
    laid out (d + 1, K) contiguously: a product with the transposed view of an odd inner size was ~25 % slower on
    CPU. On a Qwen2.5-VL-7B full-attention block (16 x 5476 x 80) this took ~0.75x the time of the earlier
    ``baddbmm``-with-bias form (benchmarks/received_lse.py)."""
    b, h, q_len, d = query.shape
    k = _repeat_kv(key, h // key.shape[1]).float()
    kv = k.shape[2]
    qa = torch.cat([query.float() * scaling, lse.float().neg()[..., None]], -1).reshape(b * h, q_len, d + 1)
    ka = torch.cat([k, k.new_ones(b, h, kv, 1)], -1).reshape(b * h, kv, d + 1).transpose(1, 2).contiguous()
    total = torch.zeros(b * h, kv, dtype=torch.float32, device=query.device)
    buf = torch.empty(b * h * min(chunk, q_len) * kv, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        qc = qa[:, start:start + chunk]
        p = buf[:qc.shape[0] * qc.shape[1] * kv].view(qc.shape[0], qc.shape[1], kv)  # the last chunk may be shorter
        torch.bmm(qc, ka, out=p)
        total += p.exp_().sum(1)
    return (total / q_len).view(b, h, kv)


def varlen_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The separate sequences of one attention call: a FlashAttention varlen call packs several (``cu_seq_lens_q``
    / ``cu_seq_lens_k`` in its kwargs, batch 1) and is split along the sequence axis; any other call is one."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        return [(query, key, value)]
    if query.shape[0] != 1:
        raise RuntimeError("a varlen attention call must have batch size 1")
    cu_k = cu_q if cu_k is None else cu_k
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    return list(zip(torch.split(query, lq, 2), torch.split(key, lk, 2), torch.split(value, lk, 2)))
