"""The measured-cost ("calibrated") speed-up bound: what a zero-overhead pruner with a case's token schedule would
take on this device, from the unpatched model's own modules timed at the schedule's token counts.

Why: the analytic bound (:mod:`tokprune.flops`) assumes time is proportional to FLOPs. At small token counts a
decoder layer's GEMMs read the same weights for fewer tokens, so on a CPU (and on a GPU at small batch) a layer at
159 tokens takes more than 159/671 of its 671-token time: the FLOPs model overestimates the possible speed-up.
The cost bound replaces FLOPs by measured module times:

    T_ceiling(case) = T_unpruned - sum over pieces p of (D_unpruned[p] - D_case[p]) * t[p]

where a *piece* is one unpatched module run at one token count (an LLM decoder layer on ``batch x L`` hidden
states, the projector / merger on ``N`` ViT tokens, one ViT layer on ``S x N`` tokens), ``t[p]`` its time measured
in the same round, and ``D[p]`` how many times a schedule runs it (:func:`demand`). Pieces the case runs exactly
as the unpruned model does (the encoder of every method that prunes after it) cancel, so the encoder and projector
terms appear only where a method cuts inside the encoder (FlowCut, and ViT-layer vision stages). A probe (the next
layer's q/k that PyramidDrop / TransPrune score a cut with) is the method's necessary work: it enters ``D_case`` as
the FLOPs share of one layer at the probe's token count (``probe_flops / llm_layer_flops``), not timed on its own.
``cost bound = T_unpruned / T_ceiling``.

One job: the demand of a schedule, the pieces' runners (:class:`PieceClock`) and the formula (:func:`ceiling_ms`);
:mod:`tokprune.eval.speed` times the pieces round-robin with the cases.
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
    """One timed unit: ``part`` "llm" (a decoder layer on ``rows x tokens``), "proj" (projector / merger on
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

    LLM layer ``l`` runs once on ``batch x max_b tokens_b[l]`` (a batch is padded to its longest sample); a probe
    adds its FLOPs share of a layer at its token count; ViT layer ``e`` runs once on all images' sequences at the
    longest count; the projector once on all images' ViT tokens. Images without vision work (LLaVA-NeXT without
    sizes) leave the encoder out of both sides of the formula.
    """
    arch = flops.describe(config)
    batch = len(schedules)
    out: Counter[Piece] = Counter()
    for layer in range(arch.llm.layers):
        out[Piece("llm", max(s.tokens[layer] for s in schedules), batch)] += 1
    by_layer: dict[int, tuple[int, int]] = {}
    for s in schedules:
        for layer, n, rows in s.probes:
            n0, r0 = by_layer.get(layer, (0, 0))
            by_layer[layer] = (max(n0, n), max(r0, rows))
    for n, rows in by_layer.values():
        out[Piece("llm", n, batch)] += probe_flops(arch.llm, n, rows) / flops.llm_layer_flops(arch.llm, n)
    works = [w for s in schedules for w in s.images]
    if not works or arch.vision is None:
        return out
    seqs = sum(w.sequences for w in works)
    for e in range(len(works[0].layer_tokens)):
        n = max(w.layer_tokens[e] for w in works)
        windows = _windows(works[0].windows, n) if e in arch.vision.windowed and works[0].windows else ()
        out[Piece("enc", n, seqs, windows)] += 1
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


def ceiling_ms(unpruned_ms: float, full: Mapping[Piece, float], case: Mapping[Piece, float],
               times: Mapping[Piece, float]) -> float:
    """The formula: ``unpruned_ms - sum_p (full[p] - case[p]) * times[p]`` (pieces with equal demand cancel and
    need no time)."""
    saved = 0.0
    for p in set(full) | set(case):
        diff = full.get(p, 0) - case.get(p, 0)
        if diff:
            saved += diff * times[p]
    return unpruned_ms - saved


def rest_ms(unpruned_ms: float, full: Mapping[Piece, float], times: Mapping[Piece, float]) -> float:
    """What the pieces do not explain of the unpruned prefill: patch embedding, embeddings, lm_head, norms, HF's
    glue. Must be positive for the cost model to be sane (each piece is timed alone, so a piece slower alone than
    inside the model would show here as a negative rest)."""
    return unpruned_ms - sum(d * times[p] for p, d in full.items())


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
        if p.part == "llm":
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
