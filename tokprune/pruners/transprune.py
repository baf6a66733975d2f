"""TransPrune: progressive drops inside the LLM by token transition variation (TTV, from the observed attention and
FFN inputs/outputs of the accumulation layers) plus instruction-guided attention (IGA, the instruction rows with
the next layer's q/k). Rules: :mod:`tokprune.rules.transprune`; code-vs-paper choices: docs/rules.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.pruners.base import LLMRequest, LLMSignals, ModelInfo
from tokprune.pruners.progressive import Progressive
from tokprune.registry import register_method
from tokprune.rules import transprune as rules

PARTS = ("attn", "mlp")


@register_method("transprune")
@dataclass
class TransPrune(Progressive):
    """TransPrune (CVPR'26): cuts before 0-based layers ``layers`` (default 7, 9, 12 on 32 layers) keep ``ratios``
    (default 0.875, 0.625, 0.125: TransPrune-High) of the original image tokens, ranked by
    ``norm(TTV) + norm(IGA)`` per image. TTV sums, over the ``accumulate_layers`` that already ran (default 6..11),
    ``||y||/||x|| * softmax_tokens(1 - cos(x, y))`` of each layer's attention and FFN (x: the module's normed input,
    y: its output before the residual; the softmax over every real token of the row; ``direction="paper"`` uses
    ``1 - |cos|``). IGA: the head-mean attention of every instruction token after the image, with the next
    layer's q/k, softmax over the causal row, mean over the instruction rows. ``alpha``: the paper's
    ``alpha TTV + (1 - alpha) IGA`` (None: the reference's plain sum). ``keep_ratio=r`` without ratios scales the
    default fractions by r / 0.125 (at most 1), r after the last cut. Contiguous positions by default (decode shifted);
    M-RoPE families keep their original positions."""

    summary = "progressive: token transition variation + instruction attention, cuts before layers 7/9/12"
    paper = "TransPrune, arXiv 2507.20630"

    DEFAULT_LAYERS = rules.DEFAULT_LAYERS
    DEFAULT_RATIOS = rules.DEFAULT_RATIOS
    DEFAULT_ACCUMULATE = rules.DEFAULT_ACCUMULATE_LAYERS
    REFERENCE_DEPTH = 32

    #: ``tokprune tune``: the paper's TTV / IGA balance (``alpha TTV + (1 - alpha) IGA``; 0.5 ranks as the default sum)
    search_space = {"alpha": ("float", 0.0, 1.0)}

    accumulate_layers: tuple[int, ...] | None = None
    direction: str = "code"
    alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in ("code", "paper"):
            raise ValueError(f"transprune: direction must be 'code' (1 - cos) or 'paper' (1 - |cos|), "
                             f"got {self.direction!r}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"transprune: alpha must be in [0, 1] or None, got {self.alpha!r}")
        if self.accumulate_layers is not None:
            self.accumulate_layers = tuple(int(x) for x in self.accumulate_layers)

    def shape(self, keep_ratio: float) -> tuple[float, ...]:
        scale = keep_ratio / self.DEFAULT_RATIOS[-1]
        return tuple(min(1.0, r * scale) for r in self.DEFAULT_RATIOS[:-1]) + (keep_ratio,)

    def accumulated(self, info: ModelInfo) -> tuple[int, ...]:
        """The accumulation layers: given, or the paper's 6..11 scaled (from floor(6 d / 32) up to the last cut)."""
        if self.accumulate_layers is not None:
            return self.accumulate_layers
        if self.layers is None and info.llm_layers == self.REFERENCE_DEPTH:
            return self.DEFAULT_ACCUMULATE
        last = self.llm_layers(info)[-1]
        start = math.floor(self.DEFAULT_ACCUMULATE[0] * info.llm_layers / self.REFERENCE_DEPTH)
        return tuple(range(min(start, last - 1), last))

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        bad = [x for x in self.accumulated(info) if not 0 <= x < info.llm_layers]
        if bad:
            raise ValueError(f"transprune: accumulate_layers {bad} out of range for {info.llm_layers} LLM layers")

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        last = self.llm_layers(info)[-1]
        observe = tuple(x for x in self.accumulated(info) if x < last)
        return LLMRequest(queries="instruction", source="probe", heads="mean", domain="causal", observe=observe)

    # ------------------------------------------------------------------ scores
    def ttv(self, signals: LLMSignals) -> torch.Tensor:
        """Accumulated TTV (B, n) at every current slot: the sum over the observed accumulation layers (those that
        ran before this cut) of attention + FFN transition weights, each computed over the sequence that layer
        saw and carried to the survivors by prompt position."""
        b, n = signals.hidden.shape[:2]
        out = torch.zeros(b, n, dtype=torch.float32, device=signals.hidden.device)
        layers = sorted({lay for lay, _ in signals.observed if lay < signals.layer})
        # sync: once per LLM stage, the prompt length the TTV vectors are indexed by
        n0 = int(signals.positions.max()) + 1
        for lay in layers:
            for part in PARTS:
                obs = signals.observed[(lay, part)]
                w = rules.transition_weight_of(obs.input_norm, obs.output_norm, obs.cos, valid=obs.valid,
                                               direction=self.direction)
                # sync: once per observed module, the prompt length (as above)
                n0 = max(n0, int(obs.positions.max()) + 1)
                by_pos = torch.zeros(b, n0, dtype=torch.float32, device=w.device)
                valid = obs.valid if obs.valid is not None else torch.ones_like(w, dtype=torch.bool)
                by_pos.scatter_(1, obs.positions, torch.where(valid, w, 0.0))
                out += torch.gather(by_pos, 1, signals.positions.clamp_max(n0 - 1))
        return out

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        ttv, iga = self.ttv(signals), signals.attention.float()
        score = torch.zeros_like(iga)
        for bi, row in enumerate(signals.visual):
            for pos in row:
                if pos.numel():
                    score[bi, pos] = rules.transprune_scores(ttv[bi, pos][None], iga[bi, pos][None], self.alpha)[0]
        return score
