"""What one prefill pruned: token counts, kept indices per stage, merged tokens, timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Stage:
    """One pruning stage.

    ``kind`` is ``"vision"`` (before the LLM) or ``"llm"`` (tokens dropped before decoder layer ``layer``).
    ``kept[b][i]`` holds the sorted indices, into image ``i``'s *original* visual tokens, that survive this stage.
    ``scores[b][i]`` (only with ``tokprune.apply(..., record_scores=True)``, for methods that score tokens): the
    score this stage gave each of image ``i``'s original visual tokens (float, NaN for tokens it did not score:
    dropped by an earlier stage, or LLaVA-NeXT newlines), so a heat-map shows what the method saw.
    """

    kind: str
    layer: int | None
    kept: list[list[torch.Tensor]]
    scores: list[list[torch.Tensor]] | None = None
    #: an LLM stage that adds tokens (SparseVLM's recycling): per row and image, what it built (None: nothing);
    #: ``sources`` / ``slots`` are original indices of the image (a source may itself be an earlier stage's token)
    merged: list[list[Merged | None]] | None = None
    #: an LLM stage scored by a probe of layer ``layer`` (PyramidDrop, TransPrune: that layer's norm, key projection
    #: on every token and query projection on the query rows, before the cut): per row, the number of query rows
    #: ((B,) tensor); the analytic FLOPs count this work (``tokprune.flops``), None when the stage has no probe
    probe_rows: torch.Tensor | None = None


@dataclass
class Merged:
    """Tokens a method builds from pruned ones (e.g. VisionZip contextual tokens), for one image.

    ``sources[j]`` lists the original visual-token indices absorbed into new token ``j``; ``slots[j]`` is the
    original index whose place (sequence slot and position id) it took, a dropped token of the same image. Those
    slots are part of the stage's ``kept`` indices, so ``n_kept`` counts LLM tokens, new ones included.
    """

    sources: list[torch.Tensor]
    slots: torch.Tensor | None = None


@dataclass
class PruneRecord:
    """Summary of the last prefill of a patched model (see :func:`tokprune.last_record`).

    ``timings``: host wall time of the method's own work (``select_vision_s``: scoring, selection and sequence
    rewrite before the LLM; ``select_llm_s``: the same inside the decoder), excluding the encoder and the LLM.
    On CUDA it includes waiting for the GPU at the selection's synchronisation points.
    """

    method: str
    n_visual: list[list[int]]
    seq_len: list[int]
    stages: list[Stage] = field(default_factory=list)
    merged: list[list[Merged | None]] | None = None
    #: per sample, per image: bool mask over its original visual tokens marking special tokens that carry no patch
    #: (LLaVA-NeXT's ``image_newline``): never counted in a budget, kept on top of it by methods that keep them
    special: list[list[torch.Tensor]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: methods that drop inside the vision encoder (FlowCut): per cut layer ``(layer, kept)``, ``kept[s]`` the
    #: indices of encoder sequence ``s`` (a LLaVA image or tile with [CLS] at 0, a Qwen image's patches in the ViT's
    #: order) that survive after that layer, in encoder call order; where ``generate`` repeated the images for beams
    #: (one sequence per image: LLaVA-1.5, Qwen), one entry per visual item of the expanded rows, each its image's
    encoder_cuts: list[tuple[int, list[torch.Tensor]]] | None = None
    #: per sample, per image: (H, W) pixel sizes (LLaVA-NeXT) or (t, h, w) patch grids (Qwen), when the forward had them
    image_sizes: list[list[tuple[int, ...]]] | None = None
    #: per sample, per visual item: its modality ("image"; "video" once video inputs are pruned)
    modality: list[list[str]] | None = None
    image_grid_thw: list[list[tuple[int, ...]]] | None = None
    #: the encoder layers whose received attention the method read (HiPrune, VFlowOpt, VisionZip / VisPruner
    #: without [CLS]): its tap recomputed each one's q k^T over all query rows, which the analytic FLOPs count
    #: (``tokprune.flops.read_flops``); empty when the method read none
    encoder_reads: list[int] = field(default_factory=list)
    #: what the method said about this prefill (e.g. CATP: "row 0: one image, stage 1 only")
    notes: list[str] = field(default_factory=list)
    config: Any = field(default=None, repr=False, compare=False)
    _flops: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def flops(self) -> Any:
        """Analytic FLOPs of this prefill (:class:`tokprune.flops.FlopsReport`, whole-model count) with the same
        prompt unpruned as ``.baseline``; computed on first access."""
        if self._flops is None and self.config is not None:
            from tokprune.flops import record_report

            self._flops = record_report(self.config, self)
        return self._flops

    @property
    def kept(self) -> list[list[torch.Tensor]]:
        """Kept indices per sample and image after the last stage (all indices when nothing was pruned)."""
        if self.stages:
            return self.stages[-1].kept
        return [[torch.arange(n) for n in row] for row in self.n_visual]

    @property
    def n_kept(self) -> list[list[int]]:
        return [[int(k.numel()) for k in row] for row in self.kept]

    def layer_average(self, llm_layers: int | None = None) -> list[list[float]]:
        """Per sample and image: the visual tokens averaged over the LLM's decoder layers (the budget progressive
        methods' papers compare on); ``llm_layers`` defaults to the recorded config's depth."""
        if llm_layers is None:
            if self.config is None:
                raise ValueError("this record has no config: pass llm_layers")
            llm_layers = int(self.config.get_text_config().num_hidden_layers)
        out = []
        for b, row in enumerate(self.n_visual):
            out.append([])
            for i, n in enumerate(row):
                counts = [n] * llm_layers
                for st in self.stages:
                    start = 0 if st.kind == "vision" else int(st.layer)
                    counts[start:] = [int(st.kept[b][i].numel())] * (llm_layers - start)
                out[-1].append(sum(counts) / llm_layers)
        return out

    def summary(self) -> str:
        parts = [f"method={self.method}"]
        for b, (nv, nk) in enumerate(zip(self.n_visual, self.n_kept)):
            parts.append(f"sample {b}: " + ", ".join(f"{k}/{n}" for n, k in zip(nv, nk)))
        return "; ".join(parts)


def spread(n: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(n,) float32 CPU tensor: ``values`` at ``index``, NaN elsewhere (scores over an image's original tokens)."""
    out = torch.full((n,), float("nan"))
    out[index.cpu()] = values.detach().float().cpu()
    return out
