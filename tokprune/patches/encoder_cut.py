"""The in-encoder dropping seam: a method drops tokens *between* vision-encoder layers, so later layers run on fewer.

A pruner declares :class:`~tokprune.pruners.base.EncoderCut` (the layers after which it may drop, and the
per-sequence signals it needs there) and answers :meth:`~tokprune.pruners.base.Pruner.cut_encoder`. This module,
owned by the adapter, does the rest on every family through a few family hooks:

* **Signals.** An attention tap on each cut layer collects q/k/v as the backend received them (one call per image
  or window under SDPA / eager on Qwen, one packed call under FlashAttention); the requested rows ([CLS] row,
  token-mean-query row) are 1 x n per sequence and head, computed from q/k (no eager attention, no N x N map).
* **Dropping.** The decision after layer i is applied in a forward pre-hook of the module that runs next.
  ``adapter.cut_layout() == "batch"`` (CLIP: (B, N, D), one image or tile per row): the rows are gathered and, when
  their counts differ (a per-image count never depends on what shares the batch), padded at the end with an
  additive key mask that every later layer receives. ``"packed"`` (Qwen: (L, D), images packed, 2x2 merge units of
  4 consecutive patches): whole merge units are dropped, and every later block gets its ``cu_seqlens`` (the image
  boundaries on full-attention blocks, the *window* boundaries on Qwen2.5-VL's windowed blocks: both rebuilt from
  the survivors by counting, empty windows removed), ``max_seqlen`` and rotary ``position_embeddings`` gathered.
* **Scatter back.** The modules that read the encoder's per-token output (``adapter.cut_heads()``: the LLaVA
  projector; the Qwen merger and Qwen3-VL's DeepStack mergers) get a forward hook that writes their output back
  into the full token layout, zeros at dropped tokens, so everything after the encoder (LLaVA-NeXT packing and
  unpadding, Qwen2.5-VL's ``reverse_indices``, ``get_image_features``' per-image split, the top-level prefill hook,
  and ``generate()``, which runs the encoder before that hook) sees the shapes it expects. A DeepStack merger
  reads the hidden states of its block, before any cut decided after that block, so its level holds every token
  alive there (a superset of the final set).
* **Index map.** After the encoder call the survivors are published as the vision signal
  ``Signal("encoder_kept")`` (1.0 per surviving LLM token, through the family's ``to_tokens``), which the
  method's vision stage turns into its kept set, and as ``history`` (per cut layer, what each sequence kept),
  copied to the record as ``PruneRecord.encoder_cuts``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokprune.patches.threads import PerThread
from tokprune.patches.vision_stage import check_indices
from tokprune.pruners.base import EncoderCut, EncoderStep, Signal
from tokprune.signals import TAPS, _repeat_kv, remove_installed

if TYPE_CHECKING:
    from tokprune.patches.base import Adapter

KEPT = Signal("encoder_kept")


def sequence_signals(names: tuple[str, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scaling: float) -> dict[str, torch.Tensor]:
    """The :data:`~tokprune.pruners.base.CUT_SIGNALS` of one sequence from its q/k/v (H, n, d)."""
    out: dict[str, torch.Tensor] = {}
    k = k.float()
    for name in names:
        if name == "cls_row":
            out[name] = ((q[:, :1].float() @ k.transpose(-1, -2)).squeeze(1) * scaling).softmax(-1).mean(0)
        elif name == "mean_query_row":
            qbar = q.float().mean(1, keepdim=True)
            out[name] = ((qbar @ k.transpose(-1, -2)).squeeze(1) * scaling).softmax(-1).mean(0)
        elif name == "values":
            out[name] = v.float()
        elif name == "value_mean":
            out[name] = v.float().mean(0)
        elif name == "keys":
            out[name] = k
    return out


class EncoderCutStage:
    """Runs a pruner's :class:`EncoderCut` on one model; owned by an :class:`~tokprune.patches.base.Adapter`.

    What one encoder call learns (the survivors, the pending decision, the key mask, the cut history the record
    copies) is per thread (:class:`~tokprune.patches.threads.PerThread`): two threads encoding through one patched
    model at once never read each other's cut; within a thread, each encoder call starts afresh (``reset``) and
    its prefill reads it before the next call."""

    origin = PerThread()  # batch: per row; packed: global positions
    counts = PerThread(list)
    n_full = PerThread(int)
    bounds = PerThread()  # packed: image boundaries in the original sequence
    chunks = PerThread(dict)
    pending = PerThread()
    mask = PerThread()
    state = PerThread(list)
    keep = PerThread(list)
    n_tokens = PerThread(list)
    history = PerThread(list)
    dropped = PerThread(bool)

    def __init__(self, adapter: Adapter, cut: EncoderCut) -> None:
        self.adapter, self.cut = adapter, cut
        self.layout = adapter.cut_layout()
        n = adapter.info.vision_layers
        last = n - 1 if self.layout == "packed" else n - 2
        for layer in cut.layers:
            if not 0 <= layer <= last:
                raise ValueError(f"{adapter.pruner.name}: an encoder cut after layer {layer} is out of range for "
                                 f"the {adapter.info.family} encoder; pass layers in [0, {last}]")
        self.prefix = int(adapter.info.has_cls) if self.layout == "batch" else 0
        self.unit = getattr(adapter, "merge_unit", 1) if self.layout == "packed" else 1
        self._handles: list[Any] = []
        self._tapped: list[nn.Module] = []
        self.reset()

    def reset(self) -> None:
        """This thread's encoder-call state, emptied (at each encoder call, and at remove)."""
        self.origin = None
        self.counts = []
        self.n_full = 0
        self.bounds = None
        self.chunks = {}
        self.pending = None
        self.mask = None
        self.state = []
        self.keep = []
        self.n_tokens = []
        self.history = []
        self.dropped = False

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        a = self.adapter
        tower = a.vision_tower
        self._handles.append(tower.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(tower.register_forward_hook(self._end))
        for layer in self.cut.layers:
            _, attn = a.vision_layer(layer)
            TAPS.add(attn, partial(self._tap, layer))
            self._tapped.append(attn)
        for j in range(self.cut.layers[0] + 1, a.info.vision_layers):
            block, _ = a.vision_layer(j)
            self._handles.append(block.register_forward_pre_hook(partial(self._before_block, j), with_kwargs=True))
        pre, scatter = a.cut_heads()
        if pre is not None:
            self._handles.append(pre.register_forward_pre_hook(self._before_head, with_kwargs=True))
        for mod in scatter:
            self._handles.append(mod.register_forward_hook(self._scatter))

    def remove(self) -> None:
        remove_installed(self._handles, self._tapped)
        self._handles, self._tapped = [], []
        self.reset()

    # ------------------------------------------------------------------ encoder call
    def _begin(self, module: nn.Module, args: tuple, kw: dict) -> None:
        self.reset()
        if self.layout == "packed":
            grid = kw.get("grid_thw", args[1] if len(args) > 1 else None)
            sizes = grid.prod(-1).long()
            self.bounds = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
            # sync: once per encoder call, the packed images' sizes (the model reads grid_thw on the host too)
            n_img = (sizes // self.unit).tolist()
            self.n_full = int(self.bounds[-1])
            self.origin = torch.arange(self.n_full, device=grid.device)
            self._budgets(n_img)

    def _budgets(self, n_tokens: list[int]) -> None:
        self.n_tokens = n_tokens
        self.keep = self.adapter.cut_budgets(n_tokens)
        self.state = [{} for _ in n_tokens]

    def _end(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.origin is None:
            return
        vision = self.adapter.vision
        if self.layout == "batch":
            mask = torch.zeros(len(self.origin), self.n_full)
            for b, o in enumerate(self.origin):
                mask[b, o.cpu()] = 1.0
        else:
            mask = torch.zeros(1, self.n_full)
            mask[0, self.origin.cpu()] = 1.0
        if vision is not None and KEPT in vision.request.signals:
            vision.raw[KEPT] = [mask]

    # ------------------------------------------------------------------ taps and decisions
    def _tap(self, layer: int, module, query, key, value, mask, scaling, kwargs) -> None:
        if self.layout == "batch" and self.origin is None:
            b, _, n, _ = query.shape
            self.n_full = n
            self.origin = [torch.arange(n, device=query.device) for _ in range(b)]
            self.counts = [n] * b
            self._budgets([n - self.prefix] * b)
        k, v = _repeat_kv(key, query.shape[1] // key.shape[1]), _repeat_kv(value, query.shape[1] // value.shape[1])
        self.chunks.setdefault(layer, []).append((query.detach(), k.detach(), v.detach(), scaling))
        self.pending = layer

    def _sequences(self, layer: int) -> tuple[list[tuple[torch.Tensor, ...]], float]:
        """Per sequence (q, k, v) (H, n, d) of ``layer`` over its current tokens."""
        chunks = self.chunks.pop(layer)
        scaling = chunks[0][3]
        if self.layout == "batch":
            q, k, v = (torch.cat([c[i] for c in chunks], 0) for i in range(3))
            return [(q[b, :, :c], k[b, :, :c], v[b, :, :c]) for b, c in enumerate(self.counts)], scaling
        q, k, v = (torch.cat([c[i] for c in chunks], 2)[0] for i in range(3))
        seg = self._segments()
        return [(q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in zip(seg[:-1], seg[1:])], scaling

    def _segments(self) -> list[int]:
        """Packed: each image's [start, end) in the current sequence."""
        # sync: once per cut layer, the images' current extents
        return torch.searchsorted(self.origin, self.bounds.to(self.origin.device)).tolist()

    def _decide(self) -> list[torch.Tensor] | None:
        """Ask the pruner about the pending layer; returns per sequence the current positions to keep (None when
        nothing is dropped)."""
        layer, self.pending = self.pending, None
        seqs, scaling = self._sequences(layer)
        names = self.cut.signals
        per = [sequence_signals(names, q, k, v, scaling) for q, k, v in seqs]
        origin = self._origins()
        step = EncoderStep(layer, self.adapter.info, self.prefix, self.unit, self.keep, self.n_tokens,
                           {n: [p[n] for p in per] for n in names}, origin, self.state)
        picks = self.adapter.pruner.cut_encoder(step)
        if len(picks) != len(seqs):
            raise RuntimeError(f"{self.adapter.pruner.name}.cut_encoder returned {len(picks)} answers for "
                               f"{len(seqs)} encoder sequences")
        sizes = [q.shape[1] for q, _, _ in seqs]
        keep = [self._kept_positions(n, pick, q.device) for n, (q, _, _), pick in zip(sizes, seqs, picks)]
        if all(int(kp.numel()) == n for n, kp in zip(sizes, keep)):
            return None
        return self._apply(layer, origin, keep)

    def _origins(self) -> list[torch.Tensor]:
        """Per sequence, each current token's index in the sequence as it entered the encoder."""
        if self.layout == "batch":
            return list(self.origin)
        seg = self._segments()
        return [self.origin[s:e] - self.bounds[i] for i, (s, e) in enumerate(zip(seg[:-1], seg[1:]))]

    def _kept_positions(self, n: int, pick: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """A sequence of ``n`` current tokens: the positions the pruner's ``pick`` (kept units, None: all) keeps,
        the ``prefix`` ([CLS]) always; checked."""
        if pick is None:
            return torch.arange(n, device=device)
        who = f"{self.adapter.pruner.name}.cut_encoder"
        pick = pick.to(device).long()
        check_indices(pick, (n - self.prefix) // self.unit, None, who, check=True)
        if pick.numel() == 0:
            raise RuntimeError(f"{who} dropped every token of a sequence")
        pos = (pick[:, None] * self.unit + torch.arange(self.unit, device=device)).flatten() + self.prefix
        return torch.cat([torch.arange(self.prefix, device=device), pos])

    def _apply(self, layer: int, origin: list[torch.Tensor], keep: list[torch.Tensor]) -> list[torch.Tensor]:
        """Record a cut that drops tokens; returns the positions to gather (packed: one global index)."""
        self.dropped = True
        self.history.append((layer, [o[kp] for o, kp in zip(origin, keep)]))
        if self.layout == "packed":
            seg = self._segments()
            glob = torch.cat([kp + s for kp, s in zip(keep, seg[:-1])])
            self.origin = self.origin[glob]
            return [glob]
        self.origin = self.history[-1][1]
        return keep

    def _packed_kwargs(self, kw: dict) -> dict:
        """A packed (Qwen) block's kwargs after a cut: ``cu_seqlens`` recounted from the survivors, ``max_seqlen``
        and the rotary embeddings gathered."""
        kw = dict(kw)
        o = self.origin
        cu = kw.get("cu_seqlens")
        if cu is not None:
            new_cu = torch.searchsorted(o, cu.to(o.device).long()).unique_consecutive()
            kw["cu_seqlens"] = new_cu.to(cu.dtype).to(cu.device)
            if kw.get("max_seqlen") is not None:
                # sync: once per block after a cut, the longest sequence (what the model computes itself)
                kw["max_seqlen"] = int((new_cu[1:] - new_cu[:-1]).max())
        pe = kw.get("position_embeddings")
        if pe is not None and pe[0].shape[0] == self.n_full:
            kw["position_embeddings"] = tuple(x[o.to(x.device)] for x in pe)
        return kw

    # ------------------------------------------------------------------ hooks that shorten what later modules see
    def _before_block(self, j: int, module: nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict] | None:
        if self.origin is None:
            return None
        h = args[0] if args else kw["hidden_states"]
        if self.pending is not None:
            keep = self._decide()
            if keep is not None:
                h = self._gather(h, keep)
        if not self.dropped:
            return None
        if self.layout == "batch":
            if len(args) > 1:
                return (h, self.mask, *args[2:]), kw
            kw = {**kw, "attention_mask": self.mask}
            return ((h,), kw) if args else ((), {**kw, "hidden_states": h})
        kw = self._packed_kwargs(kw)
        if args:
            return (h, *args[1:]), kw
        kw["hidden_states"] = h
        return args, kw

    def _before_head(self, module: nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict] | None:
        if self.origin is None or self.pending is None:
            return None
        h = args[0] if args else kw["hidden_states"]
        keep = self._decide()
        if keep is None:
            return None
        h = self._gather(h, keep)
        return ((h, *args[1:]), kw) if args else (args, {**kw, "hidden_states": h})

    def _gather(self, h: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor:
        if self.layout == "packed":
            return h[keep[0].to(h.device)]
        self.counts = [int(kp.numel()) for kp in keep]
        m = max(self.counts)
        idx = torch.stack([torch.cat([kp, kp.new_zeros(m - kp.numel())]) for kp in keep]).to(h.device)
        out = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        if len(set(self.counts)) > 1:
            valid = torch.arange(m, device=h.device)[None] < torch.tensor(self.counts, device=h.device)[:, None]
            add = torch.zeros(len(keep), 1, m, m, dtype=h.dtype, device=h.device)
            self.mask = add.masked_fill(~valid[:, None, None, :], torch.finfo(h.dtype).min)
        else:
            self.mask = None
        return out

    def _scatter(self, module: nn.Module, args: tuple, out: Any) -> Any:
        """Write a head module's per-token output back into the full layout (zeros at dropped tokens)."""
        if self.origin is None or not self.dropped:
            return None
        y = out[0] if isinstance(out, tuple) else out
        if self.layout == "packed":
            o = self.origin[:: self.unit] // self.unit
            full = y.new_zeros(self.n_full // self.unit, *y.shape[1:])
            full[o.to(y.device)] = y
        else:
            strip = self.adapter.cut_strip()
            full = y.new_zeros(y.shape[0], self.n_full - strip, *y.shape[2:])
            for b, (o, c) in enumerate(zip(self.origin, self.counts)):
                full[b, (o[strip:] - strip).to(y.device)] = y[b, : c - strip]
        return (full, *out[1:]) if isinstance(out, tuple) else full
