"""Dropping visual tokens inside the decoder, before chosen layers, with forward pre-hooks only.

The text model computes one mask, one (cos, sin) pair and the position ids, and hands the same objects to every
decoder layer. A ``with_kwargs`` pre-hook on the first layer of a stage shortens the hidden states and swaps in
gathered copies of those objects; the hooks on the following layers swap in the same copies. The KV cache needs no
surgery: layers of a stage only ever store the tokens they see. During decode only the mask columns (and, for
"compact" positions, the rotary embeddings) of pruned layers are remapped.

Rows of a batch may keep different numbers of tokens (several images, different budgets, a text-only row). Each
stage re-packs the batch (:func:`~tokprune.patches.sequence.repack_slots`): its width becomes the longest row's
surviving real tokens, padding the cut freed included. The batch stays rectangular: a shorter row keeps its own
padding slots first, then carries *dead* slots, dropped tokens that stay in the tensor but are masked as keys for
every query (each still attends to itself, so no row is fully masked and no NaN can leak). New padding slots are
never invented here, as no hidden states exist for them.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from tokprune.eager import eager
from tokprune.patches.compat import get_cache
from tokprune.patches.llm_signals import LLMTaps, prompt_spans
from tokprune.patches.sequence import gather_seq, last_real_index, repack_slots
from tokprune.pruners.base import LLMDecision, LLMRequest, LLMSignals, Observed, PrefillContext
from tokprune.record import Merged, PruneRecord, Stage, spread
from tokprune.selection import Budgets, ImageBudget, check_indices, llm_budgets, select_llm

if TYPE_CHECKING:
    from tokprune.patches.base import Adapter


class LLMStages:
    """Installs a pruner's LLM stages on one model (decoder-layer pre-hooks and the LLM taps); owned by an
    :class:`~tokprune.patches.base.Adapter`. Holds no per-prefill state: each prefill gets its own :class:`LLMRun`
    (in the adapter's per-prefill state), which the hooks find for the forward that is running. ``requests``: per
    stage layer, the decoder signals that stage asks for (None: hidden states only)."""

    def __init__(self, adapter: Adapter, layers: tuple[int, ...], requests: dict[int, LLMRequest | None]) -> None:
        self.adapter, self.layers, self.requests = adapter, layers, requests
        wanted = {k: r for k, r in requests.items() if r is not None}
        self.taps = LLMTaps(self, wanted) if wanted else None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        lm = self.adapter.language_model
        for i in range(self.layers[0], len(lm.layers)):
            self._handles.append(lm.layers[i].register_forward_pre_hook(eager(partial(self._layer_hook, i)),
                                                                    with_kwargs=True))
        if self.taps is not None:
            self.taps.install()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if self.taps is not None:
            self.taps.remove()
        self._handles = []

    def current(self) -> LLMRun | None:
        """The run of the forward in progress (None: no image prefill of this model is running or decoding)."""
        state = self.adapter.current_state()
        return None if state is None else state.llm

    def begin(self, kw: dict, visual: list[list[torch.Tensor]], origin: list[list[torch.Tensor]],
              mask2d: torch.Tensor | None, record: PruneRecord, ctx: PrefillContext,
              budgets: list[list[ImageBudget]] | None = None) -> LLMRun:
        """A new run for one prefill, after any vision stage, with the sequence the LLM will see; ``budgets``: the
        prefill's per-row image budgets (:class:`tokprune.selection.Budgets`)."""
        return LLMRun(self, kw, visual, origin, mask2d, record, ctx, budgets)

    def stage_of(self, layer: int) -> int:
        return max(s for s, k in enumerate(self.layers) if k <= layer)

    def _layer_hook(self, i: int, module, args: tuple, kw: dict):
        run = self.current()
        return None if run is None else run.layer_hook(i, args, kw)


class LLMRun:
    """Everything the LLM stages learn in one prefill and need at its decode steps: the current slots (``idx``),
    dead slots, the surviving visual tokens, the gathered kwargs of each stage, and what the LLM taps recorded.
    Created per prefill by :meth:`LLMStages.begin`; two prefills of one model never share one."""

    def __init__(self, stages: LLMStages, kw: dict, visual: list[list[torch.Tensor]],
                 origin: list[list[torch.Tensor]], mask2d: torch.Tensor | None, record: PruneRecord,
                 ctx: PrefillContext, budgets: list[list[ImageBudget]] | None = None) -> None:
        self.stages, self.adapter, self.layers = stages, stages.adapter, stages.layers
        self.requests, self.taps = stages.requests, stages.taps
        if budgets is None:
            a = self.adapter
            every = Budgets(a.pruner, a.info, a.budget)
            budgets = [[every.of(sp) for sp in srow] for srow in record.special]
        self.budgets = budgets
        ids = kw["input_ids"]
        b, n0 = ids.shape
        self.phase = "prefill"
        self.n0, self.record = n0, record
        self.visual, self.origin, self.ctx = visual, origin, ctx
        # special tokens (LLaVA-NeXT newlines) among the survivors: never scored nor counted, kept on top
        self.special = [[sp[o.to(sp.device)].to(o.device) for sp, o in zip(srow, orow)]
                        for srow, orow in zip(record.special, origin)]
        self.visual0 = torch.zeros(b, n0, dtype=torch.bool, device=ids.device)
        for bi, row in enumerate(visual):
            for pos in row:
                self.visual0[bi, pos] = True
        self.q0 = last_real_index(mask2d, b, n0, ids.device)
        self.qcur = self.q0
        self.idx = torch.arange(n0, device=ids.device).expand(b, n0)  # current slots -> prompt positions
        self.dead = torch.zeros(b, n0, dtype=torch.bool, device=ids.device)
        real = mask2d.bool() if mask2d is not None else torch.ones(b, n0, dtype=torch.bool, device=ids.device)
        self.real0 = real
        self.spans0 = prompt_spans(self.visual0, self.q0, real)
        self.stage: list[dict] = []
        self._decode_cache: dict[int, Any] = {}
        # what the LLM taps record during this prefill (see LLMTaps)
        self.rows: dict[int, torch.Tensor] = {}
        self.ran: dict[int, torch.Tensor] = {}  # row_layers: rows as they ran, over the prompt positions
        self.values: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}  # LLMRequest(keys=True): post-RoPE keys of the rows' layer
        self.query_slots: dict[int, torch.Tensor] = {}  # per_query: the query slot of each row, -1 for padding
        self.embeddings: torch.Tensor | None = None  # embeddings: the hidden states entering layer 0 (prefill)
        self.observed: dict[tuple[int, str], Observed] = {}
        self.probing = False
        self.probe_rows: dict[int, torch.Tensor] = {}  # layer -> query rows its probe computed, per row (flops)

    def stage_of(self, layer: int) -> int:
        return self.stages.stage_of(layer)

    # ------------------------------------------------------------------ the current sequence
    def current_spans(self) -> dict[str, torch.Tensor]:
        """The prompt spans (see :func:`~tokprune.patches.llm_signals.prompt_spans`) over the current slots."""
        return {name: torch.gather(m, 1, self.idx) & ~self.dead for name, m in self.spans0.items()}

    def valid_slots(self) -> torch.Tensor:
        """(B, n) bool: current slots holding a real token (neither left padding nor dead)."""
        return torch.gather(self.real0, 1, self.idx) & ~self.dead

    def visual_slots(self, n: int) -> torch.Tensor:
        """(B, n) bool: current slots holding a surviving visual token."""
        return (torch.gather(self.visual0, 1, self.idx) & ~self.dead)[:, :n]

    def has_images(self) -> torch.Tensor:
        return self.visual0.any(1)

    # ------------------------------------------------------------------ hooks
    def layer_hook(self, i: int, args: tuple, kw: dict):
        """The pre-hook of decoder layer ``i`` for this run: run a stage at its first layer, swap in the stage's
        gathered kwargs (prefill) or the remapped ones (decode)."""
        hidden = args[0] if args else kw["hidden_states"]
        s = self.stage_of(i)
        if self.phase == "prefill":
            if i == self.layers[s] and len(self.stage) == s:
                request = self.requests[i]
                if request is not None and request.source == "probe":
                    self.taps.probe(self, i, hidden, {**kw, **self.stage[s - 1]["kwargs"]} if s else kw)
                hidden = self._run_stage(s, hidden, kw)
            kw = {**kw, **self.stage[s]["kwargs"]}
        else:
            kw = {**kw, **self._decode_kwargs(s, i, kw)}
        if args:
            return (hidden, *args[1:]), kw
        return args, {**kw, "hidden_states": hidden}

    def _run_stage(self, s: int, hidden: torch.Tensor, kw: dict) -> torch.Tensor:
        """Stage ``s`` before its first layer: decide what to keep (the selection core), then rewrite the slots,
        masks, positions and rotary embeddings around it; returns the shortened hidden states."""
        t0 = time.perf_counter()
        # sync: once per LLM stage per image, the content tokens' indices (a variable-size output)
        content = [[(~sp).nonzero()[:, 0] for sp in srow] for srow in self.special]
        signals = self._signals(s, hidden, content)
        rel, scores, news = self._decide(s, signals, content)
        out, merged = self._rewrite(rel, hidden, kw, news)
        self.record.stages.append(Stage("llm", self.layers[s], [[o.sort().values for o in row] for row in self.origin],
                                        scores, merged, self.probe_rows.pop(self.layers[s], None)))
        timings = self.record.timings
        timings["select_llm_s"] = timings.get("select_llm_s", 0.0) + time.perf_counter() - t0
        return out

    def _signals(self, s: int, hidden: torch.Tensor, content: list[list[torch.Tensor]]) -> LLMSignals:
        """What stage ``s`` sees: the hidden states, the taps' rows / values / observations, the current slots."""
        k, taps = self.layers[s], self.taps
        if self.requests[k] is not None and k not in self.rows:
            raise RuntimeError(f"the attention rows for the stage before layer {k} were not computed (did layer "
                               f"{k - 1} run under the patch?)")
        return LLMSignals(layer=k, hidden=hidden, attention=self.rows.get(k),
                          visual=[[p[c] for p, c in zip(row, crow)] for row, crow in zip(self.visual, content)],
                          origin=[[o[c] for o, c in zip(row, crow)] for row, crow in zip(self.origin, content)],
                          ctx=self.ctx, values=self.values.get(k), positions=self.idx,
                          spans=self.current_spans(), observed=dict(self.observed),
                          rows_at=taps.rows_at(self) if taps else {}, last=self.qcur, keys=self.keys.get(k),
                          query_slots=self.query_slots.get(k), embeddings=LLMTaps.current_embeddings(self),
                          budgets=[[(b.n, b.keep) for b in brow] for brow in self.budgets],
                          valid=self.valid_slots(), normed=self._normed(hidden, self.requests[k]))

    def _normed(self, hidden: torch.Tensor, request: LLMRequest | None) -> torch.Tensor | None:
        """``hidden`` through the decoder's final norm, when the stage asks (``LLMRequest(final_norm=True)``)."""
        want = request is not None and request.final_norm
        return self.adapter.language_model.norm(hidden) if want else None

    def _decide(self, s: int, signals: LLMSignals, content: list[list[torch.Tensor]]
                ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None, list]:
        """Per row and image, the indices among its current visual tokens that survive stage ``s`` (budgets from
        the prefill's schedule, the method's choice checked by the selection core), the scores to record, and the
        new tokens of an :class:`~tokprune.pruners.base.LLMDecision`."""
        a = self.adapter
        stage = s + (a.vision is not None)  # index of this stage in the method's schedule
        pooled = any(brow[0].schedule.pooled for brow in self.budgets if brow)
        ks = llm_budgets(a.pruner, a.info, stage, content, self.budgets, pooled)
        at_most = [[b.schedule.stages[stage].at_most for b in brow] for brow in self.budgets]
        rel, seen, news = select_llm(a.pruner, signals, ks, content, self.special, pooled, a.record_scores, at_most,
                                     lambda picked: self._new_tokens(picked, content, ks, at_most, pooled))
        if seen is None:
            return rel, None, news
        return rel, [[spread(n, o, seen[bi, pos]) for o, pos, n in zip(orow, vrow, nrow)] for bi, (orow, vrow, nrow)
                     in enumerate(zip(signals.origin, signals.visual, self.record.n_visual))], news

    def _rewrite(self, rel: list[list[torch.Tensor]], hidden: torch.Tensor, kw: dict, news: list
                 ) -> tuple[torch.Tensor, list | None]:
        """Apply a stage's decision: the surviving slots (re-packed to the longest row), the bookkeeping of
        visual tokens and their origin, new tokens written into their slots, and the gathered kwargs of this and
        later layers. Returns the shortened hidden states and the record's merges (None without new tokens)."""
        b, n_cur = hidden.shape[:2]
        self.special = [[sp[r] for sp, r in zip(srow, rrow)] for srow, rrow in zip(self.special, rel)]
        keep = self._keep_mask(rel)
        pad = ~torch.gather(self.real0, 1, self.idx)  # padding slots (never dead: they keep the prompt's mask)
        # the batch re-packed to its longest row's survivors; shorter rows: own padding first, then dead slots
        slots, dead, self.any_dead = repack_slots(keep, pad)
        width = slots.shape[1]
        new_of_cur = torch.full((b, n_cur), -1, dtype=torch.long, device=hidden.device)
        new_of_cur.scatter_(1, slots, torch.arange(width, device=hidden.device).expand(b, width))
        self.visual = [[new_of_cur[bi, pos[r.to(pos.device)]] for pos, r in zip(row, sel)]
                       for bi, (row, sel) in enumerate(zip(self.visual, rel))]
        self._prev_origin = self.origin
        self.origin = [[o[r.to(o.device)] for o, r in zip(orow, sel)] for orow, sel in zip(self.origin, rel)]
        out = gather_seq(hidden, slots)
        merged = self._place_new(out, news, rel) if _any_new(news) else None
        self.idx = torch.gather(self.idx, 1, slots)
        self.dead = torch.gather(dead, 1, slots)
        self.qcur = (self.idx == self.q0[:, None]).float().argmax(1)
        self.stage.append({"idx": self.idx, "dead": self.dead, "kwargs": self._prefill_kwargs(kw, hidden),
                           "dropped": self._dropped_total(), "any_dead": self.any_dead})
        return out, merged

    # ------------------------------------------------------------------ new tokens (LLMDecision)
    def _keep_mask(self, rel: list[list[torch.Tensor]]) -> torch.Tensor:
        """(B, n) bool over the current slots: what survives the stage (text, kept visual tokens; not dead ones)."""
        keep = ~self.dead.clone()
        for bi, (row, sel) in enumerate(zip(self.visual, rel)):
            for pos, r in zip(row, sel):
                keep[bi, pos] = False
                keep[bi, pos[r.to(pos.device)]] = True
        return keep

    def _new_tokens(self, picked: list, content: list, ks: list, at_most: list, pooled: bool) -> tuple[list, list]:
        """Turn each :class:`LLMDecision` into kept indices that include its new tokens' slots; returns (the kept
        indices per row and image, per row and image the (new tokens, slots, sources) or None)."""
        out, news = [], []
        for crow, prow, krow, arow in zip(content, picked, ks, at_most):
            pairs = [self._one_decision(c, p, kk, am, pooled) for c, p, kk, am in zip(crow, prow, krow, arow)]
            out.append([kept for kept, _ in pairs])
            news.append([new for _, new in pairs])
        return out, news

    def _one_decision(self, c: torch.Tensor, p: Any, kk: int, am: bool, pooled: bool) -> tuple[torch.Tensor, Any]:
        """One image's answer: (kept indices with any new tokens' slots, (new, slots, sources, kept) or None)."""
        if not isinstance(p, LLMDecision) or p.n_new == 0:
            return (p.kept if isinstance(p, LLMDecision) else p), None
        who = f"{self.adapter.pruner.name}.select_llm"
        n = int(c.numel())
        _check_decision(p, n, kk, am, pooled, who)
        slot_t = torch.tensor(_new_slots(p, n, who), dtype=torch.long, device=p.kept.device)
        cd = c.to(p.kept.device)  # content index -> index into the image's visual list
        new = (p.new, cd[slot_t], [cd[src.to(cd.device)] for src in p.sources], cd[p.kept])
        return torch.cat([p.kept, slot_t]).sort().values, new

    def _place_new(self, out: torch.Tensor, news: list, rel: list) -> list:
        """Write the new tokens into the gathered sequence ``out`` and return the record's :class:`Merged` per row
        and image. ``rel``: per row and image the kept indices (content and special) into the previous visual
        list; ``self.visual`` / ``self.origin`` already describe the new sequence."""
        compact = self.adapter.positions == "compact"
        merged: list[list[Merged | None]] = []
        for bi, (nrow, vrow, orow, srow) in enumerate(zip(news, self.visual, self.origin, self.special)):
            merged.append([])
            for i, (nw, pos, org, sp) in enumerate(zip(nrow, vrow, orow, srow)):
                if nw is None:
                    merged[-1].append(None)
                    continue
                new, slots, sources, kept = nw
                prev = self._prev_origin[bi][i]
                sel = rel[bi][i].to(slots.device)
                where = torch.searchsorted(sel, slots)  # each new token's place among the survivors
                if compact and not bool(sp.any()):
                    # the reference's order: the image's kept tokens, then its new tokens (contiguous positions)
                    held = torch.cat([out[bi, pos[torch.searchsorted(sel, kept.to(sel.device))]],
                                      new.to(out.dtype)])
                    out[bi, pos] = held
                    org[:] = torch.cat([prev[kept.to(prev.device)], prev[slots.to(prev.device)]])
                else:
                    out[bi, pos[where]] = new.to(out.dtype)
                merged[-1].append(Merged([prev[s.to(prev.device)] for s in sources], prev[slots.to(prev.device)]))
        return merged

    # ------------------------------------------------------------------ gathered kwargs
    def _compact_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions of the current slots as if every dropped visual token had never existed."""
        b = self.idx.shape[0]
        really_kept = torch.zeros_like(self.visual0)
        really_kept.scatter_(1, self.idx, ~self.dead)
        dropped_before = (self.visual0 & ~really_kept).long().cumsum(1)
        return torch.gather(pos.expand(b, -1), 1, self.idx) - torch.gather(dropped_before, 1, self.idx)

    def _dropped_total(self) -> torch.Tensor:
        really_kept = torch.zeros_like(self.visual0)
        really_kept.scatter_(1, self.idx, ~self.dead)
        return (self.visual0 & ~really_kept).sum(1)

    def _prefill_kwargs(self, kw: dict, hidden: torch.Tensor) -> dict:
        out: dict[str, Any] = {}
        pos = kw.get("position_ids")
        compact = self.adapter.positions == "compact"
        if compact:
            if pos is None:
                pos = torch.arange(self.n0, device=hidden.device)[None]
            new_pos = self._compact_positions(pos)
            out["position_embeddings"] = self.adapter.rotary(hidden, new_pos)
            out["position_ids"] = new_pos
        else:
            cos, sin = kw["position_embeddings"]
            out["position_embeddings"] = (gather_seq(cos, self.idx), gather_seq(sin, self.idx))
            if pos is not None:
                out["position_ids"] = torch.gather(pos.expand(self.idx.shape[0], -1), 1, self.idx)
        out["attention_mask"] = self._mask(kw.get("attention_mask"), get_cache(kw), prefill=True,
                                           dtype=hidden.dtype)
        return out

    def _decode_kwargs(self, s: int, i: int, kw: dict) -> dict:
        st = self.stage[s]
        out: dict[str, Any] = {}
        mask = kw.get("attention_mask")
        pkv = get_cache(kw)
        hidden_dtype = kw["position_embeddings"][0].dtype
        if self.adapter.positions == "compact":
            # one rotary per stage and decode step; the step's own (cos, sin) object is held in the entry, so an id
            # can never be reused by a later step's tuple while the entry lives
            src = kw["position_embeddings"]
            hit = self._decode_cache.get(s)
            if hit is None or hit[0] is not src:
                pos = kw["position_ids"] - st["dropped"][:, None]
                self._decode_cache[s] = (src, self.adapter.rotary(src[0], pos), pos)
            _, out["position_embeddings"], out["position_ids"] = self._decode_cache[s]
        q = kw["position_embeddings"][0].shape[1]
        out["attention_mask"] = self._remap_decode_mask(st, mask, pkv, i, q, hidden_dtype)
        return out

    # ------------------------------------------------------------------ masks
    def _impl(self) -> str:
        return self.adapter.language_model.config._attn_implementation or "sdpa"

    def _columns(self, st_idx: torch.Tensor, width: int, pkv: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Map the key slots of a pruned layer to columns of the full-length mask of ``width`` columns."""
        b, n_kept = st_idx.shape
        static = getattr(pkv, "is_compileable", False)
        out_width = width if static else n_kept + (width - self.n0)
        tail = torch.arange(self.n0, self.n0 + out_width - n_kept, device=st_idx.device).expand(b, -1)
        cols = torch.cat([st_idx, tail], 1)
        return cols.clamp_max(width - 1), cols < width

    def _finish(self, allowed: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Turn a boolean (B, 1, Q, K) mask into the form the attention backend expects."""
        if like is not None and like.dtype != torch.bool:
            return torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(like.dtype).min)
        if like is None and "eager" in self._impl():
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def _mask(self, m: Any, pkv: Any, prefill: bool, dtype: torch.dtype) -> Any:
        if isinstance(m, dict):
            return {k: self._mask(v, pkv, prefill, dtype) for k, v in m.items()}
        idx, dead = self.idx, self.dead
        b, n = idx.shape
        any_dead = self.any_dead  # set with ``dead`` by _run_stage, which calls this
        if m is None and not any_dead:
            return None  # order is kept, so sdpa's is_causal stays right
        if m is not None and m.dim() == 2:  # flash-attention padding mask
            return torch.gather(m.expand(b, -1), 1, idx).masked_fill(dead, 0)
        diag = torch.eye(n, dtype=torch.bool, device=idx.device)[None, None]
        key_ok = ~dead[:, None, None, :] | diag
        if m is None:
            causal = torch.ones(n, n, dtype=torch.bool, device=idx.device).tril()[None, None]
            return self._finish(causal & key_ok, None, dtype)
        if "flash" in self._impl():
            raise NotImplementedError("4D masks under flash attention are not supported")
        m = m.expand(b, *m.shape[1:])
        m = torch.gather(m, 2, idx[:, None, :, None].expand(b, m.shape[1], n, m.shape[3]))
        cols, valid = self._columns(idx, m.shape[-1], pkv)
        m = torch.gather(m, 3, cols[:, None, None, :].expand(b, m.shape[1], n, cols.shape[1]))
        ok = valid[:, None, None, :].expand(b, 1, n, cols.shape[1]).clone()
        ok[..., :n] &= key_ok.expand(b, 1, n, n)
        if m.dtype == torch.bool:
            return m & ok
        return m.masked_fill(~ok, torch.finfo(m.dtype).min)

    def _remap_decode_mask(self, st: dict, m: Any, pkv: Any, layer: int, q: int, dtype: torch.dtype) -> Any:
        if isinstance(m, dict):
            return {k: self._remap_decode_mask(st, v, pkv, layer, q, dtype) for k, v in m.items()}
        idx, dead = st["idx"], st["dead"]
        b, n_kept = idx.shape
        any_dead = st["any_dead"]  # known since the prefill: no host read per layer and decode step
        if m is None:
            if not any_dead:
                return None
            kv = pkv.get_seq_length(layer) + q if pkv is not None else n_kept + q
            key_ok = torch.cat([~dead, dead.new_ones(b, kv - n_kept)], 1)
            qslot = torch.arange(kv - q, kv, device=idx.device)[:, None]
            allowed = (torch.arange(kv, device=idx.device)[None] <= qslot)[None, None] & key_ok[:, None, None, :]
            if "flash" in self._impl():
                return key_ok.long()
            return self._finish(allowed, None, dtype)
        cols, valid = self._columns(idx, m.shape[-1], pkv)
        ok = valid.clone()
        ok[:, :n_kept] &= ~dead
        if m.dim() == 2:
            return torch.gather(m.expand(b, -1), 1, cols).masked_fill(~ok, 0)
        m = m.expand(b, *m.shape[1:])
        m = torch.gather(m, 3, cols[:, None, None, :].expand(b, m.shape[1], m.shape[2], cols.shape[1]))
        ok = ok[:, None, None, :]
        if m.dtype == torch.bool:
            return m & ok
        return m.masked_fill(~ok, torch.finfo(m.dtype).min)


def _new_slots(p: LLMDecision, n: int, who: str) -> list[int]:
    """Each new token's slot: the lowest free dropped slot among its sources, else the lowest free one."""
    free = torch.ones(n, dtype=torch.bool)
    free[p.kept.cpu()] = False
    slots = []
    for src in p.sources:  # sync: once per new token, the slot it takes (host bookkeeping)
        cand = [int(j) for j in src.cpu().sort().values if free[int(j)]]
        if not cand:
            cand = free.nonzero()[:, 0].tolist()[:1]
        if not cand:
            raise RuntimeError(f"{who}: more new tokens than dropped slots")
        free[cand[0]] = False
        slots.append(cand[0])
    return slots


def _any_new(news: list) -> bool:
    return any(n is not None for row in news for n in row)


def _check_decision(p: LLMDecision, n: int, kk: int, am: bool, pooled: bool, who: str) -> None:
    """An LLMDecision over ``n`` tokens: sorted kept indices, kept + new within the budget, one source set each."""
    check_indices(p.kept, n, None, who)
    total = int(p.kept.numel()) + p.n_new
    if not pooled and (total > kk or (not am and total != kk)):
        raise RuntimeError(f"{who} returned {int(p.kept.numel())} kept + {p.n_new} new tokens where "
                           f"the budget is {'at most ' if am else ''}{kk}")
    if len(p.sources) != p.n_new:
        raise RuntimeError(f"{who}: an LLMDecision needs one sources tensor per new token")
