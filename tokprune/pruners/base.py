"""The Pruner interface: a method decides *which* visual tokens to keep, knowing nothing about any model.

A method is a small dataclass whose fields are its hyper-parameters. It is a schedule of stages:

* a **vision stage** (before the LLM) declares the encoder signals it needs with :meth:`Pruner.vision_request`
  and returns, per image, the sorted indices to keep from :meth:`Pruner.select_vision`;
* **LLM stages** (inside the decoder, before the layers named by :meth:`Pruner.llm_layers`) score the surviving
  visual tokens from signals of that layer and return which to keep from :meth:`Pruner.select_llm`.

The model adapter owns everything else (spans, positions, masks, cache, batching). Selection rules are pure
tensor functions, so they can be tested on hand-made inputs and reused by other runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from tokprune.kernels import select_topk

POSITIONS = ("compact", "original")


class UnsupportedError(ValueError):
    """A method cannot run on a model (e.g. it needs a [CLS] token the vision encoder does not have)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know about the model it is applied to (filled in by the adapter)."""

    family: str
    vision_layers: int
    feature_layer: int  # 0-based encoder layer whose output feeds the projector
    has_cls: bool
    llm_layers: int
    supports_compact: bool  # whether kept tokens may be re-indexed contiguously (not for M-RoPE)


@dataclass(frozen=True)
class VisionRequest:
    """Encoder signals a vision stage needs. ``cls_layers``: encoder layers whose CLS->token attention is used."""

    cls_layers: tuple[int, ...] = ()


@dataclass
class VisionSignals:
    """Inputs of a vision stage, one entry per image in the batch (row-major order).

    ``features[i]`` (n_i, D): the projected visual tokens the LLM would receive.
    ``cls_attention[layer][i]`` (n_i,): head-mean attention of the [CLS] query to each visual token at that
    encoder layer, aligned with ``features[i]``.
    ``owners[i]``: (row in the batch, image index within that row), so a rule can depend on an image's place in
    its own prompt but never on what else shares the batch.
    """

    features: list[torch.Tensor]
    cls_attention: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    owners: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class LLMSignals:
    """Inputs of an LLM stage acting before decoder layer ``layer``.

    ``hidden`` (B, n, D): hidden states entering the layer. ``attention`` (B, n): head-mean attention of each
    row's last prompt token over the current sequence, from layer ``layer - 1`` (None unless requested).
    ``visual[b][i]``: positions in the current sequence of the surviving visual tokens of image ``i`` of row ``b``.
    """

    layer: int
    hidden: torch.Tensor
    attention: torch.Tensor | None
    visual: list[list[torch.Tensor]]


def topk_groups(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """Sorted top-k indices for each score vector; vectors of equal length and k are batched in one call."""
    out: list[torch.Tensor | None] = [None] * len(scores)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, k) in enumerate(zip(scores, ks)):
        groups.setdefault((s.numel(), k), []).append(j)
    for (_, k), members in groups.items():
        idx = select_topk(torch.stack([scores[j] for j in members]), k)
        for row, j in enumerate(members):
            out[j] = idx[row]
    return out  # type: ignore[return-value]


@dataclass
class Pruner:
    """Base class of all methods. ``positions``: "compact" re-indexes kept tokens contiguously, "original"
    keeps each token's position; None picks the paper's default for the model family."""

    name: ClassVar[str] = "base"
    #: one-line description shown in docs and the CLI
    summary: ClassVar[str] = ""
    #: paper reference
    paper: ClassVar[str] = ""
    #: whether an LLM stage needs the last prompt token's attention row of the previous layer
    needs_llm_attention: ClassVar[bool] = False
    #: LLaVA-NeXT: keep the per-row ``image_newline`` tokens on top of the budget (FasterVLM, HiPrune); methods whose
    #: paper drops them (VisionZip, FlowCut) set False
    keep_newlines: ClassVar[bool] = True

    positions: str | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or None, got {self.positions!r}")

    # ------------------------------------------------------------------ schedule
    def vision_request(self, info: ModelInfo) -> VisionRequest | None:
        """Signals of the vision stage, or None when the method has no vision stage."""
        return None

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        """Decoder layers before which LLM stages drop tokens (0-indexed), in increasing order."""
        return ()

    def check(self, info: ModelInfo) -> None:
        """Raise :class:`UnsupportedError` when the method cannot run on this model; called by ``apply``."""
        if self.positions == "compact" and not info.supports_compact:
            raise UnsupportedError(
                f"positions='compact' is not defined for {info.family} (M-RoPE keeps each token's 3-D position); "
                "use positions='original'"
            )
        layers = self.llm_layers(info)
        for k in layers:
            if not 1 <= k < info.llm_layers:
                raise ValueError(
                    f"{self.name}: LLM layer {k} is out of range; the LLM has {info.llm_layers} layers, "
                    f"pass a layer in [1, {info.llm_layers - 1}]"
                )
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{self.name}: LLM stage layers must be strictly increasing, got {layers}")

    def resolved_positions(self, info: ModelInfo) -> str:
        if self.positions is not None:
            return self.positions
        return self.default_positions(info)

    def default_positions(self, info: ModelInfo) -> str:
        """Paper default: pre-LLM methods on LLaVA re-index contiguously; M-RoPE models keep original positions."""
        return "compact" if info.supports_compact else "original"

    # ------------------------------------------------------------------ vision stage
    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Importance of every visual token of every image (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} has no vision scoring")

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        """Sorted kept indices per image; by default the top-k of :meth:`vision_scores`."""
        return topk_groups(self.vision_scores(signals), ks)

    # ------------------------------------------------------------------ LLM stages
    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        """Tokens of an image (``n_visual`` originally) to keep at LLM stage ``stage``; ``keep`` is the final
        per-image budget. Progressive methods override this with their schedule."""
        return keep

    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        """Importance (B, n) over the current sequence; only visual positions are read."""
        raise NotImplementedError(f"{type(self).__name__} has no LLM scoring")

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor]]:
        """Per row and image, sorted indices into ``signals.visual[b][i]`` to keep."""
        scores = self.llm_scores(signals)
        flat = [scores[b, pos] for b, row in enumerate(signals.visual) for pos in row]
        sel = iter(topk_groups(flat, [k for row in ks for k in row]))
        return [[next(sel) for _ in row] for row in signals.visual]

    # ------------------------------------------------------------------ description
    def options(self) -> dict[str, object]:
        """The method's hyper-parameters as a dict (for records and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
