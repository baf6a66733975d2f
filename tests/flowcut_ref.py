"""Independent references for tokens dropped inside a vision encoder (FlowCut), written without tokprune code.

The reference never shortens a sequence: it runs the unpatched encoder with an attention function of its own that
hides the dropped tokens as *keys* (softmax over the alive keys only, computed eagerly in float32 from q/k/v).
Encoder attention is bidirectional and everything else in a ViT block is per token, so the alive tokens' states
equal those of an encoder that really removed the dropped ones (a rebuilt Qwen2.5-VL window is the old window
minus its dropped tokens, which is exactly what a key mask inside the old window gives). Drops come either from a
given list (``cuts``: "drop the same tokens") or from FlowCut's rule applied here to the eager maps and values of
each layer, written from the reference code (TungChintao/FlowCut ``flowcut/utils_flowcut.py``,
``FlowCut_Qwen/utils_flowcut.py``), per image.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "flowcut_key_mask_oracle"


def vision_tower(model: Any) -> tuple[Any, list[Any], bool]:
    """(tower, blocks, is_clip)."""
    base = model.model
    if hasattr(base, "visual"):
        return base.visual, list(base.visual.blocks), False
    tower = base.vision_tower
    enc = getattr(tower, "vision_model", tower).encoder
    return tower, list(enc.layers), True


class KeyMask:
    """Attention that hides dead keys and records q/k/v/probabilities per call."""

    def __init__(self) -> None:
        self.alive: torch.Tensor | None = None  # CLIP (B, N) bool; Qwen (L,) bool
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        scaling = module.scaling if scaling is None else scaling
        if self.alive.dim() == 2:  # CLIP: one call, batch rows
            keys = self.alive[:, None, None, : key.shape[2]]
        else:  # Qwen: one call per image / window, in sequence order
            off = sum(c[0].shape[2] for c in self.calls)
            keys = self.alive[off: off + key.shape[2]][None, None, None]
        s = (query.float() @ key.float().transpose(-1, -2)) * scaling
        p = s.masked_fill(~keys, float("-inf")).softmax(-1).nan_to_num(0.0)  # a wholly dead window: zeros
        self.calls.append((query.float(), key.float(), value.float(), p))
        v = torch.where(keys.transpose(-1, -2), value.float(), 0.0)  # dead tokens never leak, not even as NaN
        return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), p


@contextmanager
def key_mask_attention(model: Any):
    tower, _, _ = vision_tower(model)
    fn = KeyMask()
    ALL_ATTENTION_FUNCTIONS[NAME] = fn
    cfg = tower.config
    old = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        yield fn
    finally:
        cfg._attn_implementation = old
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop(NAME, None)


def _round(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float64).round())  # half to even, like the reference's torch.round


def entropy_count(a: torch.Tensor, n: int, target: int, rpl: int, eps: float) -> int:
    """The reference's adaptive prune count from one image's attention ``a`` over its n current units."""
    if rpl == 0:
        return n - target
    p = a / a.sum()
    r = float(-(p * torch.log(p + eps)).sum() / math.log(n))
    return _round((n - target) / math.sqrt(rpl) * (1 - r * r))


@torch.no_grad()
def run(model: Any, x: dict, keep: list[int] | None = None, cuts: list[tuple[int, list[torch.Tensor]]] | None = None,
        history: float = 0.5) -> dict:
    """Run the unpatched model's encoder under the key-mask attention.

    ``keep``: per encoder sequence (LLaVA image; Qwen image) the user's budget in LLM tokens: FlowCut's rule
    decides the drops (target ``keep`` patches on CLIP, ``2 * keep`` merge units on Qwen). ``cuts``: instead, the
    record's ``encoder_cuts`` to replay. Returns ``features`` (the encoder outputs of ``get_image_features`` run under
    the mask, full layout), ``alive`` (final alive mask, encoder layout), ``history`` (layer, per-sequence kept
    indices) and ``seen`` (per block, alive tokens per sequence when it ran).
    """
    tower, blocks, clip = vision_tower(model)
    cfg = model.config
    unit = 1 if clip else tower.spatial_merge_size ** 2
    if clip:
        fl = (cfg.vision_feature_layer % (len(blocks) + 1)) - 1
        layers, select = range(fl), fl
    else:
        layers, select = range(len(blocks)), len(blocks)
        sizes = x["image_grid_thw"].prod(-1)
        bounds = [0, *sizes.cumsum(0).tolist()]
    out: dict[str, Any] = {"history": [], "seen": []}
    state: dict[int, torch.Tensor] = {}
    replay = dict(cuts) if cuts is not None else None
    handles = []
    with key_mask_attention(model) as fn:

        def pre(i, module, args, kw):
            h = args[0] if args else kw["hidden_states"]
            if fn.alive is None:
                fn.alive = torch.ones(h.shape[:2] if clip else h.shape[:1], dtype=torch.bool)
            fn.calls = []
            rows = fn.alive if clip else [fn.alive[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
            out["seen"].append([int(r.sum()) for r in rows])

        def post(i, module, args, output):
            if i not in layers:
                return
            seqs = _sequences(fn, clip, None if clip else bounds)
            new_keep = []
            for s, (q, k, v, p, alive_idx) in enumerate(seqs):
                if replay is not None:
                    new_keep.append(replay[i][s] if i in replay else None)
                    continue
                n = (alive_idx.numel() - clip) // unit
                n_tok = (int(fn.alive.shape[1]) - 1) if clip else (bounds[s + 1] - bounds[s]) // unit
                target = min(keep[s] if clip else 2 * keep[s], n_tok)
                if n <= target:
                    new_keep.append(None)
                    continue
                if clip:
                    a = p[:, 0, alive_idx].mean(0)[1:]
                    va = v[:, alive_idx]
                    sem = (va[:, :1] @ va.transpose(-1, -2)).squeeze(1).softmax(-1).mean(0)[1:]
                    idn = va.mean(0).abs().sum(-1)[1:]
                    cur = (a / a.sum() + sem / sem.sum()) * idn
                    au, eps = a, 0.0
                else:
                    qa, ka, va = q[:, alive_idx], k[:, alive_idx], v[:, alive_idx]
                    a = ((qa.mean(1, keepdim=True) @ ka.transpose(-1, -2)).squeeze(1) * tower.blocks[0].attn.scaling
                         ).softmax(-1).mean(0)
                    cur = ((a / a.sum()) * va.mean(0).abs().sum(-1)).view(n, unit).mean(1)
                    au, eps = a.view(n, unit).sum(1), 1e-7
                cum = cur if s not in state else history * state[s] + (1 - history) * cur
                rpl = select - i - 1
                if rpl < 0 or rpl % 2:
                    state[s] = cum
                    new_keep.append(None)
                    continue
                new_n = max(n - entropy_count(au, n, target, rpl, eps), target)
                top = torch.sort(-cum, stable=True).indices[:new_n].sort().values
                state[s] = cum[top]
                units = alive_idx[clip:].view(n, unit)[top].flatten() - (0 if clip else bounds[s])
                new_keep.append(torch.cat([alive_idx[:1], units]) if clip else units)
            hist, dropped = [], False
            for s, kk in enumerate(new_keep):
                row = fn.alive[s] if clip else fn.alive[bounds[s]:bounds[s + 1]]
                if kk is not None:
                    dropped = dropped or int(kk.numel()) < int(row.sum())
                    row.zero_()
                    row[kk] = True
                hist.append(row.nonzero()[:, 0])
            if dropped:
                out["history"].append((i, hist))

        for i, blk in enumerate(blocks):
            handles.append(blk.register_forward_pre_hook(partial_pre(pre, i), with_kwargs=True))
            handles.append(blk.register_forward_hook(partial_post(post, i)))
        try:
            extra = {k: x[k] for k in ("image_grid_thw", "image_sizes") if k in x}
            out["features"] = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True,
                                                              **extra)
        finally:
            for h in handles:
                h.remove()
        out["alive"] = fn.alive.clone()
    return out


def partial_pre(fn, i):
    return lambda module, args, kw: fn(i, module, args, kw)


def partial_post(fn, i):
    return lambda module, args, output: fn(i, module, args, output)


def _sequences(fn: KeyMask, clip: bool, bounds: list[int] | None) -> list[tuple[torch.Tensor, ...]]:
    """Per sequence: q, k, v (H, L, d), probabilities (CLIP: H, N, N; Qwen: None) and its alive indices."""
    if clip:
        q, k, v, p = fn.calls[-1]
        return [(q[b], k[b], v[b], p[b], fn.alive[b].nonzero()[:, 0]) for b in range(q.shape[0])]
    q, k, v = (torch.cat([c[j] for c in fn.calls], 2)[0] for j in range(3))
    return [(q, k, v, None, fn.alive[s:e].nonzero()[:, 0] + s) for s, e in zip(bounds[:-1], bounds[1:])]


def llm_tokens_alive(model: Any, x: dict, alive: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the LLM-token indices (raster order) whose encoder tokens are alive at the end."""
    tower, _, clip = vision_tower(model)
    if clip:
        return [a[1:].nonzero()[:, 0] for a in alive]
    unit = tower.spatial_merge_size ** 2
    grid = x["image_grid_thw"]
    units = alive.view(-1, unit).all(1)
    if hasattr(tower, "window_size") and hasattr(tower, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                           window_size=tower.window_size, patch_size=tower.patch_size)
        raster = torch.zeros_like(units)
        raster[index] = units  # window-order unit u is raster unit index[u]
        units = raster
    counts = (grid.prod(-1) // unit).tolist()
    return [u.nonzero()[:, 0] for u in torch.split(units, counts)]
