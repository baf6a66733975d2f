"""The decoder signals an LLM stage requests (:class:`~tokprune.pruners.base.LLMRequest`), computed from q/k.

* **Rows** of the requested query tokens (the last prompt token, the instruction after the last image, or the
  query sample), averaged over those rows, head mean or per head, over the whole causal row or the visual keys only.
  They come from an attention tap on layer K-1 as it runs (``source="previous"``), or from a *probe* of layer K
  (``source="probe"``): at the entry of layer K the layer's own norm and ``self_attn`` run on the current hidden
  states without a cache, under a tap that computes the rows and skips the attention kernel. Only the work the
  rows need is done: the key projection on every token, the query projection on the query rows only (the other
  query rows are zeros, never read), and neither the value nor the output projection (they return zero-stride
  zeros while the probe runs; the real layer's calls are untouched); nothing is stored. Both sources work the same
  way on every family, under any attention backend.
* **Values** of the same layer (head mean), at every current slot; **keys** (post-RoPE, per key/value head).
* **Observed modules**: forward hooks on ``self_attn`` and ``mlp`` of the requested layers reduce their input
  (after the norm) and output (before the residual) to per-token norms and cosines during the prefill, with the
  prompt position of each slot (no copy of the hidden states is kept).

:class:`LLMTaps` is owned by :class:`~tokprune.patches.llm_stage.LLMStages`, which tells it the current sequence.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokprune.eager import eager
from tokprune.patches.compat import cache_kwargs
from tokprune.pruners.base import LLMRequest, Observed
from tokprune.signals import TAPS, attention_rows, remove_installed

if TYPE_CHECKING:
    from tokprune.patches.llm_stage import LLMRun, LLMStages


def _zeros_like_output(run: Any, inner: Any, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What a skipped projection returns during a probe: zeros of its output shape, zero-stride (no memory)."""
    return x.new_zeros(()).expand(*x.shape[:-1], proj.out_features)


def prompt_spans(visual0: torch.Tensor, q0: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, N) bool masks over the prompt: "instruction" (after the row's last visual token up to its last prompt
    token), "sample" (from the first token of its last image up to its last prompt token) and "context" (the real
    tokens before the sample: a few-shot prompt's demonstrations)."""
    b, n = visual0.shape
    pos = torch.arange(n, device=visual0.device).expand(b, n)
    last_visual = torch.where(visual0, pos, -1).max(1).values
    # the last image starts after the last non-visual token that precedes the last visual token
    before = ~visual0 & (pos < last_visual[:, None])
    start = torch.where(before, pos, -1).max(1).values + 1
    start = torch.where(last_visual >= 0, start, n)
    upto = pos <= q0[:, None]
    return {"instruction": (pos > last_visual[:, None]) & upto & real,
            "sample": (pos >= start[:, None]) & upto & real,
            "context": (pos < start[:, None]) & real}


class LLMTaps:
    """Installs and answers the :class:`LLMRequest` of each LLM stage of one model (``requests``: stage layer ->
    request). Each stage taps its own module (layer K-1 as it runs, or layer K under a probe) and computes its own
    rows, values and keys; observed modules, ``row_layers`` and the input embeddings serve every stage that asks.
    Several stages may tap one attention module (a probe of layer K and the next stage's rows of layer K as it
    runs): one tap on the module calls each of them, and each answers only its own kind of call."""

    def __init__(self, stages: LLMStages, requests: dict[int, LLMRequest]) -> None:
        self.stages, self.requests = stages, requests
        self._handles: list[Any] = []
        self._tapped: list[Any] = []
        self._ran: dict[int, LLMRequest] = {}  # row_layers layer -> the request whose rows it records
        self._elided: list[tuple[nn.Module, Any]] = []  # (projection, its own instance forward or None)

    def _probing(self) -> bool:
        """Whether the forward in progress is a probe of this model's run (its attention kernel is skipped)."""
        run = self.stages.current()
        return run is not None and run.probing

    def _prefill_run(self, probe_only: bool = False) -> LLMRun | None:
        """The run whose prefill is in progress (None during decode, text-only forwards or another model's);
        ``probe_only``: only while it probes, else only while it does not."""
        run = self.stages.current()
        if run is None or run.phase != "prefill" or run.probing != probe_only:
            return None
        return run

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        layers = self.stages.adapter.language_model.layers
        n = len(layers)
        self._install_observers(layers)
        calls: dict[int, list[Any]] = {}  # decoder layer -> the tap functions on its self_attn
        probed: set[int] = set()
        for k, request in self.requests.items():
            probe = request.source == "probe"
            at = k if probe else k - 1
            calls.setdefault(at, []).append(partial(self._tap, k))
            if probe:
                probed.add(at)
        for lay in self._row_layers(n):
            calls.setdefault(lay, []).append(partial(self._tap_ran, lay))
        for at, fns in calls.items():
            mod = layers[at].self_attn
            TAPS.add(mod, fns[0] if len(fns) == 1 else partial(_each, tuple(fns)),
                     skip=self._probing if at in probed else None)
            if at in probed:
                self._elide_projections(mod, self.requests[at])
            self._tapped.append(mod)

    def _row_layers(self, n: int) -> list[int]:
        """The ``row_layers`` of every stage's request (each recorded once, for the request naming it)."""
        for request in self.requests.values():
            for lay in request.row_layers:
                if not 0 <= lay < n:
                    raise ValueError(f"LLMRequest records the rows of layer {lay}; the LLM has {n} layers")
                other = self._ran.setdefault(lay, request)
                if other != request:
                    raise ValueError(f"two LLM stages record the rows of layer {lay} (row_layers) with different "
                                     "requests; give them the same queries / heads / domain or another layer")
        return list(self._ran)

    def _install_observers(self, layers: Any) -> None:
        """Forward hooks on the modules any stage observes, and the embeddings hook on layer 0 when one asks."""
        observe = sorted({lay for r in self.requests.values() for lay in r.observe})
        for lay in observe:
            if not 0 <= lay < len(layers):
                raise ValueError(f"LLMRequest observes layer {lay}; the LLM has {len(layers)} layers")
            for part, mod in (("attn", layers[lay].self_attn), ("mlp", layers[lay].mlp)):
                self._handles.append(mod.register_forward_hook(eager(partial(self._observe, lay, part)),
                                                                 with_kwargs=True))
        if any(r.embeddings for r in self.requests.values()):
            self._handles.append(layers[0].register_forward_pre_hook(eager(self._embed), with_kwargs=True))

    def _elide_projections(self, attn: nn.Module, request: LLMRequest) -> None:
        """While this model probes (and only then, per prefill: the real layer's calls run as before), the probed
        layer's ``q_proj`` computes the query rows only and ``v_proj`` / ``o_proj`` compute nothing; a family whose
        attention has no such ``nn.Linear`` keeps the full projection."""
        for name in ("q_proj", "v_proj", "o_proj"):
            proj = getattr(attn, name, None)
            if not isinstance(proj, nn.Linear) or (name == "v_proj" and request.values):
                continue
            own = proj.__dict__.get("forward")  # an instance forward someone else installed (restored on remove)
            inner = own if own is not None else type(proj).forward.__get__(proj)
            elided = partial(self._query_rows_only, request) if name == "q_proj" else _zeros_like_output
            proj.forward = partial(self._elidable, inner, elided, proj)
            self._elided.append((proj, own))

    def _elidable(self, inner: Any, elided: Any, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        run = self._prefill_run(probe_only=True)
        return inner(x) if run is None else elided(run, inner, proj, x)

    def _query_rows_only(self, request: LLMRequest, run: LLMRun, inner: Any, proj: nn.Linear,
                         x: torch.Tensor) -> torch.Tensor:
        """The query projection of the rows the probe's tap reads; zeros elsewhere (never read)."""
        rows, _ = self._query_rows(run, request, x.shape[1])
        part = inner(torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1])))
        out = x.new_zeros(*x.shape[:-1], part.shape[-1])
        return out.scatter_(1, rows[..., None].expand_as(part), part)

    def remove(self) -> None:
        remove_installed(self._handles, self._tapped)
        for proj, own in self._elided:
            if own is None:
                proj.__dict__.pop("forward", None)
            else:
                proj.forward = own
        self._handles, self._tapped, self._ran, self._elided = [], [], {}, []

    # ------------------------------------------------------------------ signals
    def probe(self, run: LLMRun, k: int, hidden: torch.Tensor, kw: dict) -> None:
        """Layer ``k``'s q/k on the hidden states entering it (its norm and projections; no kernel, no cache)."""
        layer = self.stages.adapter.language_model.layers[k]
        _, weights = self._query_rows(run, self.requests[k], hidden.shape[1])
        run.probe_rows[k] = (weights > 0).sum(1).clamp_min(1)  # per row, for the FLOPs count (no sync)
        run.probing = True
        try:
            layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=kw.get("attention_mask"),
                            position_embeddings=kw["position_embeddings"], **cache_kwargs(None))
        finally:
            run.probing = False

    def _tap(self, k: int, module, query, key, value, mask, scaling, kwargs) -> None:
        """The signals of the stage cutting before layer ``k``, from the attention call it taps."""
        request = self.requests[k]
        st = self._prefill_run(probe_only=request.source == "probe")
        if st is None:
            return
        n = query.shape[2]
        st.rows[k] = self._rows(st, request, k, query, key, mask, scaling)
        if request.values == "heads":
            st.values[k] = value[:, :, :n].float()
        elif request.values:
            st.values[k] = value[:, :, :n].float().mean(1)
        if request.keys:
            st.keys[k] = key[:, :, :n].detach()

    def _tap_ran(self, layer: int, module, query, key, value, mask, scaling, kwargs) -> None:
        """A ``row_layers`` layer as it runs: its rows, stored over the prompt positions of the current slots."""
        st = self._prefill_run()
        if st is None:
            return
        n = query.shape[2]
        rows = self._rows(st, self._ran[layer], layer, query, key, mask, scaling)
        idx = st.idx[:, :n]
        full = rows.new_zeros(*rows.shape[:-1], st.n0)
        st.ran[layer] = full.scatter(-1, idx if rows.dim() == 2 else idx[:, None].expand_as(rows), rows)

    def rows_at(self, st: LLMRun) -> dict[int, torch.Tensor]:
        """The recorded ``row_layers`` rows over the current slots (see :attr:`LLMSignals.rows_at`)."""
        idx = st.idx
        return {lay: torch.gather(r, -1, idx if r.dim() == 2 else idx[:, None].expand(-1, r.shape[1], -1))
                for lay, r in st.ran.items()}

    def _rows(self, st: LLMRun, request: LLMRequest, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any,
              scaling: float) -> torch.Tensor:
        """The rows ``request`` asks for from one attention call (of decoder ``layer``) over the current sequence,
        (B, n) or (B, H, n)."""
        n = query.shape[2]
        rows, weights = self._query_rows(st, request, n)
        keys = st.visual_slots(n) if request.domain == "visual" else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] > n:
            mask = mask[..., :n]
        model_dtype = getattr(st.adapter.pruner, "score_dtype", "float32") == "model"
        probs = attention_rows(query, key[:, :, :n], mask, scaling, rows, causal=True, keys=keys,
                               model_dtype=model_dtype)[..., :n]
        if request.per_query:
            st.query_slots[layer] = torch.where(weights > 0, rows, -1)
            out = probs.mean(1) if request.heads == "mean" else probs
            return out.to(query.dtype).float() if model_dtype else out
        rows_mean = (probs * weights[:, None, :, None]).sum(2) / weights.sum(1).clamp_min(1)[:, None, None]
        out = rows_mean.mean(1) if request.heads == "mean" else rows_mean
        return out.to(query.dtype).float() if model_dtype else out  # score_dtype="model": the references' rounding

    def _query_rows(self, st: LLMRun, request: LLMRequest, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) query positions in the current sequence and (B, R) weights (0 = padding of a shorter row)."""
        if request.queries == "last":
            return st.qcur[:, None], torch.ones(st.qcur.shape[0], 1, device=st.qcur.device)
        # a probe asks twice (its query projection, then its tap): the slots change only when a stage rewrites them
        key = (len(st.stage), n, request.queries)
        memo = st.__dict__.get("_query_rows_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        span = st.current_spans()[request.queries][:, :n]
        counts = span.sum(1)
        # sync: once per LLM stage: an empty instruction span is an error, not a silent empty row
        if bool(((counts == 0) & st.has_images()).any()):
            raise ValueError(f"a row's {request.queries} span is empty (the prompt ends with its image); "
                             "ask for queries='last' or put the question after the image")
        # sync: once per LLM stage, the widest instruction span (an output shape)
        r = int(counts.max().clamp_min(1))
        order = torch.sort((~span).to(torch.int8), dim=1, stable=True).indices[:, :r]  # span positions first
        weights = torch.gather(span, 1, order).float()
        rows = torch.where(weights > 0, order, st.qcur[:, None])
        st._query_rows_memo = (key, (rows, weights))
        return rows, weights

    def _embed(self, module, args: tuple, kw: dict) -> None:
        """The hidden states entering decoder layer 0 at the prefill: the input embeddings (kept on the run)."""
        st = self._prefill_run()
        if st is not None and st.embeddings is None:
            st.embeddings = (args[0] if args else kw["hidden_states"]).detach()

    @staticmethod
    def current_embeddings(st: LLMRun) -> torch.Tensor | None:
        """The input embeddings over the run's current slots, (B, n, D)."""
        if st.embeddings is None:
            return None
        idx = st.idx
        return torch.gather(st.embeddings, 1, idx[..., None].expand(-1, -1, st.embeddings.shape[-1]))

    def _observe(self, layer: int, part: str, module, args: tuple, kw: dict, out: Any) -> None:
        st = self._prefill_run()
        if st is None:
            return
        x = args[0] if args else kw["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        st.observed[(layer, part)] = Observed.of(x.detach(), y.detach(), st.idx.clone(), st.valid_slots())


def _each(fns: tuple[Any, ...], *args: Any) -> None:
    """One tap calling several (stages tapping the same attention module)."""
    for fn in fns:
        fn(*args)
