"""Counting: FLOPs of LLM layers, the vision encoder and the projector, and of a whole forward
(:func:`estimate`) for a :class:`~tokprune.flops.arch.TokenSchedule` under one of three conventions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokprune.flops.arch import (
    Architecture,
    LLMShape,
    ProjectorShape,
    TokenSchedule,
    VisionShape,
    VisionWork,
    config_of,
    describe,
)

CONVENTIONS = ("full", "3ndm", "2ndm")

# ---------------------------------------------------------------------------------------------------------------
# Counting.
# ---------------------------------------------------------------------------------------------------------------


def llm_layer_flops(llm: LLMShape, n: int, kv: int | None = None) -> int:
    """Full-convention FLOPs of one decoder layer for ``n`` query tokens attending to ``kv`` keys (default n)."""
    kv = n if kv is None else kv
    proj = 2 * n * llm.hidden * (2 * llm.q_dim + 2 * llm.kv_dim)  # q, o: d x q_dim; k, v: d x kv_dim
    attn = 4 * n * kv * llm.q_dim  # QK^T and AV over all heads
    mlp = 2 * n * llm.hidden * llm.ffn * llm.ffn_mats
    return proj + attn + mlp


def probe_flops(llm: LLMShape, n: int, rows: int) -> int:
    """Full-convention FLOPs of a probe of one decoder layer (PyramidDrop, TransPrune score a cut with the next
    layer's q/k): the key projection of ``n`` tokens, the query projection of ``rows`` query rows and their
    ``rows x n`` attention logits over all heads (tokprune runs nothing else: no value / output projection, no
    kernel; the norm, RoPE and softmax are elementwise and not counted, as elsewhere)."""
    return 2 * n * llm.hidden * llm.kv_dim + 2 * rows * llm.hidden * llm.q_dim + 2 * rows * n * llm.q_dim


def paper_layer_macs(llm: LLMShape, n: int, ffn_mats: int) -> int:
    """The papers' per-layer count ``4nd^2 + 2n^2d + ffn_mats*ndm`` (MACs; GQA ignored, as the papers do)."""
    d = llm.hidden
    return 4 * n * d * d + 2 * n * n * d + ffn_mats * n * d * llm.ffn


def vision_flops(vision: VisionShape, work: VisionWork) -> int:
    """Full-convention FLOPs of the vision encoder for one image: patch embedding plus every ViT layer, plus the
    received-attention reads of ``work.reads`` (:func:`read_flops`)."""
    total = 2 * work.sequences * work.patches * vision.hidden * vision.patch_inputs
    total += sum(vit_layer_flops(vision, work, layer) for layer in range(len(work.layer_tokens)))
    return total + sum(read_flops(vision, work, layer) for layer in work.reads)


def vit_layer_flops(vision: VisionShape, work: VisionWork, layer: int) -> int:
    """Full-convention FLOPs of ViT layer ``layer`` on all of one image's sequences (``work.layer_tokens[layer]``
    tokens each; a windowed Qwen2.5-VL block attends within its windows)."""
    d, s, n = vision.hidden, work.sequences, work.layer_tokens[layer]
    dense = s * (8 * n * d * d + 2 * n * d * vision.ffn * vision.ffn_mats)
    return dense + s * round(4 * d * _query_key_pairs(vision, work, layer))


def read_flops(vision: VisionShape, work: VisionWork, layer: int) -> int:
    """FLOPs of reading ViT layer ``layer``'s received attention (the column means of its attention probabilities):
    the tap recomputes the layer's logits q k^T over every query row and head, half of the layer's attention FLOPs
    (the kernel's q k^T and its probabilities times v). The exponentials and sums are elementwise and not counted,
    as elsewhere; so is subtracting the rows' log-sum-exps, which the CPU path folds into its product as one extra
    column (``received_from_lse``: torch then counts ``1 / head_dim`` more)."""
    return work.sequences * round(2 * vision.hidden * _query_key_pairs(vision, work, layer))


def _query_key_pairs(vision: VisionShape, work: VisionWork, layer: int) -> float:
    """(query, key) pairs one sequence's attention scores at ViT layer ``layer``: ``n^2``, or within the windows of a
    windowed Qwen2.5-VL block (exact when unpruned; when tokens were dropped inside the ViT the windows shrink
    proportionally)."""
    n = work.layer_tokens[layer]
    if layer in vision.windowed and work.windows:
        scale = n / sum(work.windows)
        return sum(w * w for w in work.windows) * scale * scale
    return n * n


def projector_flops(projector: ProjectorShape, tokens: int) -> int:
    """Full-convention FLOPs of the projector/merger on ``tokens`` ViT-level tokens."""
    if tokens % projector.group:
        raise ValueError(f"{tokens} tokens cannot be merged in groups of {projector.group}")
    return projector.copies * 2 * (tokens // projector.group) * sum(i * o for i, o in projector.linears)


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one forward (summed over the batch), split by part, in the unit of its ``convention``.

    ``llm_layers[l]`` is the prefill of decoder layer ``l``; ``decode_per_token`` is one decode step right after
    prefill (one new token per sample, KV = the pruned prefill length + 1); ``decode`` sums ``decode_steps`` steps.
    The paper conventions count the LLM prefill of visual tokens only: their other parts are 0. Equality compares
    the numbers only (not ``notes`` or ``baseline``).
    """

    convention: str
    vision: int
    projector: int
    llm_layers: tuple[int, ...]
    lm_head: int
    decode_per_token: int = 0
    decode_steps: int = 0
    decode: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)
    baseline: FlopsReport | None = field(default=None, compare=False, repr=False)

    @property
    def llm_prefill(self) -> int:
        return sum(self.llm_layers)

    @property
    def prefill(self) -> int:
        """Vision + projector + LLM prefill + lm_head."""
        return self.vision + self.projector + self.llm_prefill + self.lm_head

    @property
    def total(self) -> int:
        return self.prefill + self.decode

    @property
    def tflops(self) -> float:
        """``total`` in units of 10^12."""
        return self.total / 1e12

    def parts(self) -> dict[str, int]:
        """The parts by name, in FLOPs of this convention."""
        return {"vision": self.vision, "projector": self.projector, "llm_prefill": self.llm_prefill,
                "lm_head": self.lm_head, "decode": self.decode, "total": self.total}

    def ratio(self, other: FlopsReport | None = None, part: str = "total") -> float:
        """``part`` of this report over the same part of ``other`` (default: the attached unpruned baseline)."""
        other = other if other is not None else self.baseline
        if other is None:
            raise ValueError("no baseline: pass the report to compare with")
        if other.convention != self.convention:
            raise ValueError(f"cannot compare {self.convention!r} with {other.convention!r} FLOPs")
        den = other.parts()[part]
        return self.parts()[part] / den if den else float("nan")

    def reduction(self, other: FlopsReport | None = None, part: str = "total") -> float:
        """1 - :meth:`ratio`: the fraction of FLOPs saved."""
        return 1.0 - self.ratio(other, part)

    def __add__(self, other: FlopsReport) -> FlopsReport:
        if other.convention != self.convention or len(other.llm_layers) != len(self.llm_layers):
            raise ValueError("can only add reports of the same convention and model")
        return FlopsReport(
            self.convention, self.vision + other.vision, self.projector + other.projector,
            tuple(a + b for a, b in zip(self.llm_layers, other.llm_layers)), self.lm_head + other.lm_head,
            self.decode_per_token + other.decode_per_token, max(self.decode_steps, other.decode_steps),
            self.decode + other.decode, tuple(dict.fromkeys(self.notes + other.notes)),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (FLOPs as ints, plus TFLOPs and, with a baseline, ratios)."""
        out: dict[str, Any] = {"convention": self.convention, **self.parts(), "tflops": self.tflops,
                               "llm_layers": list(self.llm_layers), "decode_per_token": self.decode_per_token,
                               "decode_steps": self.decode_steps, "notes": list(self.notes)}
        if self.baseline is not None:
            out["baseline_tflops"] = self.baseline.tflops
            out["ratio"] = self.ratio()
            out["llm_prefill_ratio"] = self.ratio(part="llm_prefill")
        return out



def estimate(config: Any, schedule: TokenSchedule | Sequence[TokenSchedule], convention: str = "full", *,
             decode_steps: int = 0, logits_to_keep: int = 0) -> FlopsReport:
    """FLOPs of one forward of ``config`` (a transformers config, a shipped config name or an
    :class:`Architecture`) over ``schedule`` (one per sample; a sequence of them is a batch and is summed).

    ``logits_to_keep`` follows transformers: 0 computes logits for every prompt token (plain ``forward``), 1 only
    for the last (``generate``'s prefill). ``decode_steps`` adds that many single-token decode steps.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    arch = describe(config_of(config))
    if isinstance(schedule, TokenSchedule):
        return _estimate_one(arch, schedule, convention, decode_steps, logits_to_keep)
    reports = [_estimate_one(arch, s, convention, decode_steps, logits_to_keep) for s in schedule]
    if not reports:
        raise ValueError("empty batch of schedules")
    out = reports[0]
    for r in reports[1:]:
        out = out + r
    return out


def _estimate_one(arch: Architecture, s: TokenSchedule, convention: str, decode_steps: int,
                  logits_to_keep: int) -> FlopsReport:
    llm = arch.llm
    if len(s.visual) != llm.layers:
        raise ValueError(f"schedule has {len(s.visual)} layers, the model {llm.layers}")
    if convention != "full":
        mats = 3 if convention == "3ndm" else 2
        layers = tuple(paper_layer_macs(llm, n, mats) for n in s.visual)
        note = f"{convention}: LLM prefill of visual tokens only, in MACs (the papers' 'FLOPs')"
        return FlopsReport(convention, 0, 0, layers, 0, notes=(note, *s.notes))
    tokens = s.tokens
    layers = [llm_layer_flops(llm, n) for n in tokens]
    for layer, n, rows in s.probes:  # the scoring work of next-layer q/k probes, counted in the probed layer
        layers[layer] += probe_flops(llm, n, rows)
    layers = tuple(layers)
    head_tokens = tokens[-1] if logits_to_keep <= 0 else min(logits_to_keep, tokens[-1])
    lm_head = 2 * head_tokens * llm.hidden * llm.vocab
    vision = projector = 0
    if s.images:
        if arch.vision is None or arch.projector is None:
            raise ValueError(f"{arch.family} has no vision encoder but the schedule has images")
        vision = sum(vision_flops(arch.vision, w) for w in s.images)
        projector = sum(projector_flops(arch.projector, w.projector_tokens) for w in s.images)

    def step(j: int) -> int:  # decode step j >= 1: one new token, KV = prefill tokens + j
        return sum(llm_layer_flops(llm, 1, n + j) for n in tokens) + 2 * llm.hidden * llm.vocab

    decode = sum(step(j) for j in range(1, decode_steps + 1))
    return FlopsReport("full", vision, projector, layers, lm_head, step(1), decode_steps, decode, s.notes)


