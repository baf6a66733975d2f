"""The measured-cost ("calibrated") speed-up bound: what a zero-overhead pruner with a case's token schedule would
take on this device, measured by **replaying** the schedule on the unpatched model.

Why: the analytic bound (:mod:`tokprune.flops`) assumes time is proportional to FLOPs. At small token counts a
decoder layer's GEMMs read the same weights for fewer tokens, so on a CPU (and on a GPU at small batch) a layer at
159 tokens takes more than 159/671 of its 671-token time: the FLOPs model overestimates the possible speed-up.
The cost bound replaces FLOPs by measured time:

    T_ceiling(case) = T_replay(tokens) + sum over probes p of D_case[p] * t[p]
                      - sum over encoder pieces p of (D_unpruned[p] - D_case[p]) * t[p]

* ``T_replay(tokens)`` (:class:`ScheduleReplay`): one forward of the *unpatched* model in which LLM layer ``l``
  runs on the first ``tokens[l]`` positions only (a forward pre-hook slices the hidden states, rotary tables,
  position ids and mask; a causal prefix needs nothing else). It is the case's LLM schedule with no scoring, no
  selection and no gather: the model's own modules inside a real forward, so caches, threads and allocator behave
  as in the case's run (modules timed alone ran up to ~10 % slower at small token counts and faster at large ones,
  which biased the earlier all-pieces bound both ways).
* A *piece* is one unpatched module run alone at one token count, for what a replay does not run: a **probe** (the
  next layer's q/k that PyramidDrop / TransPrune score a cut with; the method's necessary work, counted as its FLOPs
  share ``probe_flops / llm_layer_flops`` of a decoder layer at the probe's token count) and the **encoder** pieces
  (a ViT layer on ``S x N`` tokens, the projector / merger on ``N`` ViT tokens) of a method that cuts inside the
  encoder (FlowCut): the replay runs the whole encoder, and what those cuts save is subtracted. A method that reads
  a ViT layer's **received attention** (HiPrune, VFlowOpt, VisionZip / VisPruner without [CLS]) recomputes that
  layer's q k^T over every query (SDPA returns no probabilities); like a probe, that is its necessary work, counted
  as its FLOPs share of the layer's encoder piece (:func:`tokprune.flops.read_flops`). ``t[p]`` is the
  piece's time measured in the same round, ``D[p]`` how many times a schedule runs it (:func:`demand`).

``cost bound = T_unpruned / T_ceiling``; the goal compares the case with its ceiling of the same round.

One job: the demand of a schedule, the replay, the pieces' runners (:class:`PieceClock`) and the formula
(:func:`ceiling_ms`); :mod:`tokprune.eval.speed` times them round-robin with the cases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokprune import flops
from tokprune.flops.count import probe_flops

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True, order=True)
class Piece:
    """One timed unit: ``part`` "llm" (a decoder layer on ``rows x tokens``), "probe" (the same layer, standing for
    a probe: its demand is the probe's FLOPs share of it), "proj" (projector / merger on
    ``rows x tokens`` ViT tokens) or "enc" (a ViT layer on ``rows`` sequences of ``tokens``; ``windows``: the
    window sizes of a windowed Qwen2.5-VL block, empty for full attention)."""

    part: str
    tokens: int
    rows: int = 1
    windows: tuple[int, ...] = ()

    def __str__(self) -> str:
        w = f", {len(self.windows)} windows" if self.windows else ""
        return f"{self.part}({self.rows}x{self.tokens}{w})"


def demand(config: Any, schedules: Sequence[flops.TokenSchedule]) -> Counter[Piece]:
    """How many times the prefill of ``schedules`` (one per sample, run as one batch) runs each piece.

    LLM layer ``l`` runs once on ``batch x max_b tokens_b[l]`` (a batch is padded to its longest sample; the
    replay runs these, :func:`llm_tokens`); a probe adds its FLOPs share of a layer at its token count (part
    "probe"); ViT layer ``e`` runs once on all images' sequences at the longest count, and a received-attention read
    of it (``VisionWork.reads``) adds the read's FLOPs share of that layer; the projector once on all images' ViT
    tokens. Images without vision work (LLaVA-NeXT without sizes) leave the encoder out of both sides of
    the formula.
    """
    arch = flops.describe(config)
    batch = len(schedules)
    out: Counter[Piece] = Counter()
    for n in llm_tokens(schedules):
        out[Piece("llm", n, batch)] += 1
    by_layer: dict[int, tuple[int, int]] = {}
    for s in schedules:
        for layer, n, rows in s.probes:
            n0, r0 = by_layer.get(layer, (0, 0))
            by_layer[layer] = (max(n0, n), max(r0, rows))
    for n, rows in by_layer.values():
        out[Piece("probe", n, batch)] += probe_flops(arch.llm, n, rows) / flops.llm_layer_flops(arch.llm, n)
    works = [w for s in schedules for w in s.images]
    if not works or arch.vision is None:
        return out
    seqs = sum(w.sequences for w in works)
    for e in range(len(works[0].layer_tokens)):
        n = max(w.layer_tokens[e] for w in works)
        windows = _windows(works[0].windows, n) if e in arch.vision.windowed and works[0].windows else ()
        out[Piece("enc", n, seqs, windows)] += 1
        if e in works[0].reads:  # a received-attention read: its FLOPs share of this layer, run again
            w = max(works, key=lambda w: w.layer_tokens[e])
            out[Piece("enc", n, seqs, windows)] += (flops.read_flops(arch.vision, w, e)
                                                    / flops.vit_layer_flops(arch.vision, w, e))
    if arch.projector is not None:
        copies = arch.projector.copies
        if arch.family in QWEN:  # the merger takes all images' tokens as one flat sequence
            out[Piece("proj", sum(w.projector_tokens for w in works), 1)] += copies
        else:
            per = max(w.projector_tokens // w.sequences for w in works)
            out[Piece("proj", per, seqs)] += copies
    return out


def _windows(unpruned: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``n`` tokens spread over the windows in proportion to their unpruned sizes (as the FLOPs model scales them),
    largest remainders first; empty windows dropped."""
    total = sum(unpruned)
    exact = [w * n / total for w in unpruned]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])[: n - sum(sizes)]:
        sizes[i] += 1
    return tuple(s for s in sizes if s)


def llm_tokens(schedules: Sequence[flops.TokenSchedule]) -> tuple[int, ...]:
    """Tokens per LLM layer of a batch's prefill (the longest sample's): what :class:`ScheduleReplay` runs."""
    return tuple(max(s.tokens[layer] for s in schedules) for layer in range(len(schedules[0].tokens)))


def timed_pieces(full: Mapping[Piece, float], case: Mapping[Piece, float]) -> set[Piece]:
    """The pieces :func:`ceiling_ms` needs a time for: the case's probes, and the encoder / projector pieces whose
    demand differs from the unpruned schedule's (the replay runs the LLM layers and the whole encoder)."""
    out = {p for p, d in case.items() if p.part == "probe" and d}
    for p in set(full) | set(case):
        if p.part in ("enc", "proj") and full.get(p, 0) != case.get(p, 0):
            out.add(p)
    return out


def ceiling_ms(replay_ms: float, full: Mapping[Piece, float], case: Mapping[Piece, float],
               times: Mapping[Piece, float]) -> float:
    """The formula: ``replay_ms + sum_probes case[p] * times[p] - sum_encoder (full[p] - case[p]) * times[p]``
    (LLM layer pieces are in the replay; encoder pieces with equal demand cancel and need no time)."""
    out = replay_ms
    for p in timed_pieces(full, case):
        out += (case.get(p, 0) if p.part == "probe" else case.get(p, 0) - full.get(p, 0)) * times[p]
    return out


class ScheduleReplay:
    """Run the unpatched model's forward with LLM layer ``l`` on the first ``tokens[l]`` positions only: a zero-cost
    "pruner" with a case's LLM token schedule (see the module docstring). A forward pre-hook on each decoder layer
    slices its hidden states and the per-token arguments HF passes it (rotary ``position_embeddings`` (B, N, D),
    ``position_ids`` (..., N), a 4-D mask, ``cache_position``); the KV cache then holds the prefix. Because
    attention is causal, the replay's last logits equal the unpatched model's logits at position ``tokens[-1] - 1``
    (tests/test_speed_cost.py checks it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        base = getattr(model, "model", model)
        lm = getattr(base, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise NotImplementedError(f"{type(model).__name__}: no language_model.layers to replay a schedule on")
        if getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None):
            raise NotImplementedError("Qwen3-VL adds DeepStack features to the first LLM layers' hidden states at the "
                                      "image's positions; a replay that slices them is not supported, measure the "
                                      "analytic bound only")
        self.layers = list(lm.layers)

    def run(self, tokens: Sequence[int], forward: Callable[[], Any]) -> Any:
        """``forward()`` with the layers trimmed to ``tokens`` (one count per decoder layer)."""
        if len(tokens) != len(self.layers):
            raise ValueError(f"{len(tokens)} token counts for {len(self.layers)} decoder layers")
        handles = [layer.register_forward_pre_hook(_trim(n), with_kwargs=True)
                   for layer, n in zip(self.layers, tokens)]
        try:
            return forward()
        finally:
            for h in handles:
                h.remove()


def _trim(n: int) -> Callable[[torch.nn.Module, tuple, dict], tuple[tuple, dict]]:
    def hook(module: torch.nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict]:
        kw = dict(kw)
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kw.pop("hidden_states")
        if hidden.shape[1] < n:
            raise ValueError(f"replay: a layer gets {hidden.shape[1]} tokens, the schedule asks for {n} (a schedule "
                             "never grows)")
        pe = kw.get("position_embeddings")
        if pe is not None:
            kw["position_embeddings"] = tuple(x[..., :n, :] for x in pe)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"][..., :n]
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"][:n]
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 4:
                raise NotImplementedError(f"replay: a {mask.dim()}-D attention mask")
            kw["attention_mask"] = mask[..., :n, :n]
        elif mask is not None:
            raise NotImplementedError(f"replay: attention mask of type {type(mask).__name__}")
        return (hidden[:, :n], *args), kw

    return hook


class PieceClock:
    """Runs pieces on the unpatched modules of ``model`` with random hidden states (built once per piece) and
    times them with ``timer`` (``timer(fn) -> (ms, out)``, :func:`tokprune.eval.bench._timer`): the model's own
    decoder layer with its attention implementation, causal (no mask: SDPA's causal path, as the unpadded prefill
    uses), position embeddings from the model's rotary module (Qwen: 3-D mrope ids, all three rows the text
    positions: the same cost); ViT layers of CLIP / SigLIP, or Qwen vision blocks with ``cu_seqlens`` (windows) and
    neutral rotary tables (cos 1, sin 0: the same elementwise work)."""

    def __init__(self, model: torch.nn.Module, timer: Callable[[Callable[[], Any]], tuple[float, Any]]) -> None:
        self.model, self.timer = model, timer
        self.base = getattr(model, "model", model)
        self.family = flops.describe(model.config).family
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._runs: dict[Piece, Callable[[], Any]] = {}

    def time(self, pieces: Sequence[Piece]) -> dict[Piece, float]:
        """One timed run of each piece (ms), in order."""
        out = {}
        with torch.inference_mode():
            for p in pieces:
                run = self._runs.get(p)
                if run is None:  # first use: build its inputs and run it once untimed (allocations, kernels)
                    run = self._runs[p] = self._build(p)
                    run()
                out[p] = self.timer(run)[0]
        return out

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def _build(self, p: Piece) -> Callable[[], Any]:
        if p.part in ("llm", "probe"):
            return self._llm(p)
        if p.part == "proj":
            return self._proj(p)
        if p.part == "enc":
            return self._enc(p)
        raise ValueError(f"unknown piece {p}")

    def _llm(self, p: Piece) -> Callable[[], Any]:
        lm = self.base.language_model
        kinds = set(getattr(lm.config, "layer_types", None) or ())
        if len(kinds) > 1:  # one timed layer stands for all: only true when they are alike
            raise NotImplementedError(f"decoder layers of different kinds {sorted(kinds)}: the cost bound times one "
                                      "layer for all; time each kind (a Piece per layer kind) before using it here")
        layer, hidden = lm.layers[0], self._randn(p.rows, p.tokens, lm.config.hidden_size)
        ids = torch.arange(p.tokens, device=self.device).expand(p.rows, -1)
        if self.family in QWEN:
            ids = ids.expand(3, p.rows, -1)
        pe = lm.rotary_emb(hidden, ids)
        return lambda: layer(hidden, attention_mask=None, position_ids=ids, position_embeddings=pe)

    def _vision(self) -> torch.nn.Module:
        return self.base.visual if self.family in QWEN else self.base.vision_tower

    def _proj(self, p: Piece) -> Callable[[], Any]:
        if self.family in QWEN:
            merger = self.base.visual.merger
            x = self._randn(p.tokens, self._vit_width())
            return lambda: merger(x)
        proj = self.base.multi_modal_projector
        x = self._randn(p.rows, p.tokens, self._vit_width())
        return lambda: proj(x)

    def _vit_width(self) -> int:
        vc = self.model.config.vision_config
        return getattr(vc, "embed_dim", None) or vc.hidden_size

    def _enc(self, p: Piece) -> Callable[[], Any]:
        width = self._vit_width()
        if self.family not in QWEN:
            tower = self._vision()
            layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
            x = self._randn(p.rows, p.tokens, width)
            return lambda: layers[0](x, None)
        visual = self.base.visual
        block = visual.blocks[0]
        sizes = list(p.windows or (p.tokens,)) * p.rows
        cu = torch.tensor([0, *sizes], device=self.device).cumsum(0).to(torch.int32)
        x = self._randn(p.rows * p.tokens, width)
        head_dim = width // self.model.config.vision_config.num_heads
        pe = (torch.ones(p.rows * p.tokens, head_dim, device=self.device, dtype=self.dtype),
              torch.zeros(p.rows * p.tokens, head_dim, device=self.device, dtype=self.dtype))
        return lambda: block(x, cu_seqlens=cu, position_embeddings=pe)
