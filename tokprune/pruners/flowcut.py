"""FlowCut: tokens dropped *inside* the vision encoder by an information-flow score, progressively."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.kernels import select_topk
from tokprune.pruners.base import (
    EncoderCut,
    EncoderStep,
    LLMRequest,
    LLMSignals,
    ModelInfo,
    Pruner,
    Signal,
    UnsupportedError,
    VisionRequest,
    VisionSignals,
)
from tokprune.registry import register_method
from tokprune.rules.flowcut import (
    flowcut_layer_score,
    flowcut_prune_count,
    remaining_prune_layers,
    semantic_attention,
)
from tokprune.schedule import Schedule, StageBudget

KEPT = Signal("encoder_kept")
#: the log epsilon of the entropy: none in the CLIP code, 1e-7 in ``FlowCut_Qwen/utils_flowcut.py``
CLIP_EPS, QWEN_EPS = 0.0, 1e-7


@register_method("flowcut")
@dataclass
class FlowCut(Pruner):
    """FlowCut (arXiv 2505.19536, NeurIPS'25; reference code TungChintao/FlowCut): drops patch tokens between
    vision-encoder layers, so later layers run on fewer tokens (the in-encoder seam,
    :mod:`tokprune.patches.encoder_cut`); rules in :mod:`tokprune.rules.flowcut`.

    After each encoder layer, while more than the target remain: score ``(a/Σa + s/Σs) * ||v̄||_1`` (``a`` the
    head-mean [CLS] row over the patches, ``s`` the head-mean ``softmax_j(v_CLS · v_j)``, ``v̄`` the head-mean
    value), EMA ``0.5 * old + 0.5 * new``; on layers with an even number of remaining prune layers the
    entropy-adaptive count ``round((N - T)/sqrt(rpl) * (1 - r_H^2))`` goes (torch's half-to-even round), the
    survivors are the top by the EMA in original order, and the layer before the feature layer cuts to exactly the
    target.

    Families:

    * **LLaVA-1.5**: target = ``keep`` patches ([CLS] kept throughout, dropped by the model's feature select);
      layers ``0 .. feature_layer - 1`` score, the feature layer (22 of 24) runs on ``keep + 1`` tokens; no LLM
      stage.
    * **Qwen2-VL / Qwen2.5-VL / Qwen3-VL** (§3.3): no [CLS]: ``a`` is the head-mean softmax row of the token-mean
      query of each image (the global query); no semantic term; ``rpl = blocks - 1 - i`` (the last block cuts);
      target ``2 * keep`` merged tokens (``8 * keep`` patches) in the ViT, then at LLM layer ``llm_layer`` (1) the
      last prompt token's score ``(rel/Σrel + sem/Σsem) * ||mean_h v_j||_1`` (softmaxes over the visual keys,
      ``sem`` from value dot products scaled by ``1/sqrt(d_head)``) keeps ``keep``, removed before layer 2.
    * **LLaVA-NeXT** (§3.2): every tile (base and crops, one CLIP row each) is cut as on LLaVA-1.5 to
      ``int(keep / 2)`` patches (the reference's ``int(target_num / 2)``, at least 1; +[CLS]; ``keep`` the image's
      budget, so ``keep_ratio`` counts its unpadded content tokens); the vision stage keeps the survivors that lie
      in HF's unpadded layout, in its raster order (base tile first), a data-dependent count (the schedule's vision
      stage is an upper bound, ``at_most``); then LLM layer ``llm_layer`` scores as on Qwen and keeps
      ``min(keep, survivors)``, removed
      before layer 2. The reference scatters the crops' kept patches into the stitched grid and unpads the mask,
      the same set. Newlines: ``newlines=True`` (default) keeps the row newlines on top of every stage, as for
      ``visionzip`` (keep-all must equal the model, and it is the trained layout); ``newlines=False`` inserts none,
      as the reference.

    Options: ``semantic`` ("dot", the code's unscaled value dot product; "cosine", the paper's wording);
    ``history`` (0.5, the EMA weight of the past; the paper's 5:5); ``llm_layer`` (None = 1, Qwen and
    LLaVA-NeXT: the LLM layer whose attention scores the LLM cut, in ``[0, llm_layers - 2]``; an error on
    LLaVA-1.5, which has no LLM cut); ``newlines`` (LLaVA-NeXT, above).

    Code vs paper and our choices (code is the default): per-image prune counts (the reference takes the batch
    maximum of ``P``, which makes a count depend on what shares the batch; ours never does, equal to the reference
    at batch 1); the Qwen ViT drops whole 2x2 merge units (unit score = mean of its patches' scores, ``a`` summed
    per unit for the entropy, counts in units: target ``2 * keep`` units) where the reference drops single patches
    and merges any 4 consecutive survivors, which are no spatial 2x2 block; each kept LLM token therefore keeps its
    true M-RoPE id (the reference gives the first ``2 * keep`` ids of the span); Qwen's global query is per image
    (the reference's ignores ``cu_seqlens``, batch 1 only); on Qwen2.5-VL's windowed blocks the global query runs
    over the whole image from the block's q/k (the reference has no Qwen2.5-VL path) and the windows are rebuilt
    from the surviving units (each unit stays in its window); Qwen3-VL's DeepStack levels are read where they are
    computed, so each holds the tokens alive at its block and the LLM uses the final survivors of each level; the
    LLM cut's softmaxes run over all visual tokens of the row (one image in the reference).

    Paper budgets (presets): LLaVA-1.5 ``keep=192 / 128 / 64`` (and 32); Qwen2-VL ``keep_ratio=0.333 / 0.222 /
    0.111``; LLaVA-NeXT ``keep=640 / 320 / 160``.
    """

    summary = "in-encoder progressive drop: [CLS]/value information-flow score, EMA, entropy-adaptive counts"
    paper = "FlowCut, arXiv 2505.19536"

    semantic: str = "dot"
    history: float = 0.5
    llm_layer: int | None = None
    newlines: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.semantic not in ("dot", "cosine"):
            raise ValueError(f"flowcut: semantic must be 'dot' (the reference code) or 'cosine' (the paper's "
                             f"wording), got {self.semantic!r}")
        if isinstance(self.history, bool) or not isinstance(self.history, (int, float)) or not 0 <= self.history <= 1:
            raise ValueError(f"flowcut: history must be a number in [0, 1] (the EMA weight of the past; the paper "
                             f"uses 0.5), got {self.history!r}")
        self.history = float(self.history)
        if not isinstance(self.newlines, bool):
            raise ValueError(f"flowcut: newlines must be True (LLaVA-NeXT's row newlines kept on top of the budget, "
                             f"the model's trained layout) or False (none, the reference), got {self.newlines!r}")
        self.keep_newlines = self.newlines
        if self.llm_layer is not None and (isinstance(self.llm_layer, bool) or not isinstance(self.llm_layer, int)
                                           or self.llm_layer < 0):
            raise ValueError(f"flowcut: llm_layer must be a 0-based LLM layer (the reference uses 1), "
                             f"got {self.llm_layer!r}")

    # ------------------------------------------------------------------ schedule
    def check(self, info: ModelInfo) -> None:
        if info.has_cls and info.feature_layer < 1:
            raise UnsupportedError("flowcut needs at least one encoder layer before the feature layer")
        if not self.has_llm_cut(info):
            if self.llm_layer is not None:
                raise ValueError(f"flowcut: llm_layer={self.llm_layer} has no effect on {info.family}, where FlowCut "
                                 "prunes only inside the vision encoder (no LLM cut); leave llm_layer out")
        elif not 0 <= self.scoring_layer <= info.llm_layers - 2:
            raise ValueError(f"flowcut: llm_layer={self.scoring_layer} is out of range; the LLM has {info.llm_layers} "
                             f"layers and the cut happens before layer llm_layer + 1, so pass llm_layer in "
                             f"[0, {info.llm_layers - 2}]")
        super().check(info)

    @property
    def scoring_layer(self) -> int:
        """The LLM layer whose attention scores the LLM cut (``llm_layer``, default 1 as in the reference)."""
        return 1 if self.llm_layer is None else self.llm_layer

    @staticmethod
    def has_llm_cut(info: ModelInfo) -> bool:
        """Qwen families and LLaVA-NeXT cut again inside the LLM; LLaVA-1.5 prunes only in its encoder."""
        return not info.has_cls or info.family == "llava_next"

    def encoder_cut(self, info: ModelInfo) -> EncoderCut:
        if info.has_cls:
            return EncoderCut(tuple(range(info.feature_layer)), ("cls_row", "values", "value_mean"))
        return EncoderCut(tuple(range(info.vision_layers)), ("mean_query_row", "value_mean"))

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest((KEPT,))

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (self.scoring_layer + 1,) if self.has_llm_cut(info) else ()

    def llm_request(self, info: ModelInfo) -> LLMRequest | None:
        if not self.llm_layers(info):
            return None
        return LLMRequest(queries="last", source="previous", heads="mean", domain="visual", values="heads")

    def encoder_keep(self, info: ModelInfo, n_tokens: int, keep: int) -> int:
        """LLM tokens of an encoder sequence the encoder keeps: ``keep`` on CLIP, ``2 * keep`` merged tokens on Qwen,
        ``int(keep / 2)`` per tile on LLaVA-NeXT (``keep``: the budget of the tile's image; TungChintao/FlowCut
        ``flowcut/main.py``: ``int(target_num / 2)``, an odd budget rounds down; at least 1 patch)."""
        if info.family == "llava_next":
            return min(n_tokens, max(1, keep // 2))
        return min(n_tokens, keep if info.has_cls else 2 * keep)

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        keep = min(keep, n_visual)
        if info.family == "llava_next":  # per-tile cuts, then unpadding: at most every content token survives
            stages = [StageBudget("vision", None, n_visual, at_most=True)]
        else:
            stages = [StageBudget("vision", None, self.encoder_keep(info, n_visual, keep))]
        stages += [StageBudget("llm", layer, keep) for layer in self.llm_layers(info)]
        return Schedule(n_visual, tuple(stages), self.budget_meaning, self.pooled_budget)

    # ------------------------------------------------------------------ inside the encoder
    def cut_encoder(self, step: EncoderStep) -> list[torch.Tensor | None]:
        info, cls = step.info, step.info.has_cls
        select_layer = info.feature_layer if cls else info.vision_layers
        rpl = remaining_prune_layers(step.layer, select_layer)
        out: list[torch.Tensor | None] = []
        for s, origin in enumerate(step.origin):
            target = self.encoder_keep(info, step.n_tokens[s], step.keep[s])
            n = (int(origin.numel()) - step.prefix) // step.unit
            if n <= target:
                out.append(None)
                continue
            if cls:
                a = step.signals["cls_row"][s][1:]
                sem = semantic_attention(step.signals["values"][s][None], self.semantic)[0]
                cur = flowcut_layer_score(a[None], step.signals["value_mean"][s][None, 1:], sem[None])[0]
            else:
                a_patch = step.signals["mean_query_row"][s]
                cur = flowcut_layer_score(a_patch[None], step.signals["value_mean"][s][None])[0]
                cur = cur.view(n, step.unit).mean(1)
                a = a_patch.view(n, step.unit).sum(1)
            st = step.state[s]
            cum = cur if "cum" not in st else self.history * st["cum"] + (1 - self.history) * cur
            if rpl < 0 or rpl % 2:
                st["cum"] = cum
                out.append(None)
                continue
            new_n = max(n - flowcut_prune_count(a[None], rpl, target, CLIP_EPS if cls else QWEN_EPS), target)
            idx = select_topk(cum[None], new_n)[0]
            st["cum"] = cum[idx]
            out.append(idx)
        return out

    # ------------------------------------------------------------------ vision stage: the encoder's survivors
    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        out = []
        for m, k in zip(signals[KEPT], ks):
            idx = (m > 0.5).nonzero()[:, 0]  # sync: once per image, the survivors (a variable-size output)
            # the vision stage checks the exact count (or the bound, LLaVA-NeXT); this names the likely cause
            if idx.numel() > k:
                raise RuntimeError(f"flowcut: the vision encoder kept {idx.numel()} tokens of an image where the "
                                   f"schedule allows {k} (were the image features computed before tokprune.apply?)")
            out.append(idx)
        return out

    # ------------------------------------------------------------------ LLM layer-1 cut (Qwen)
    def llm_scores(self, signals: LLMSignals) -> torch.Tensor:
        """``(rel/Σrel + sem/Σsem) * ||mean_h v_j||_1`` per image over its surviving visual tokens (B, n); rel and
        sem are softmaxes over the row's visual tokens, normalised per image."""
        rows, vals = signals.attention, signals.values  # (B, n); (B, Hkv, n, d)
        b, _, n, d = vals.shape
        scores = torch.zeros(b, n, device=vals.device)
        for bi, row in enumerate(signals.visual):
            if not row:
                continue
            allpos = torch.cat(row).to(vals.device)
            v_last = vals[bi, :, signals.last[bi]]  # (Hkv, d)
            sem_all = ((vals[bi][:, allpos] @ v_last[..., None]).squeeze(-1) * d**-0.5).softmax(-1).mean(0)
            start = 0
            for pos in row:
                p = pos.to(vals.device)
                sem = sem_all[start:start + p.numel()]
                start += p.numel()
                v_mean = vals[bi][:, p].mean(0)
                scores[bi, p] = flowcut_layer_score(rows[bi, p][None].to(vals.device), v_mean[None], sem[None])[0]
        return scores

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor]]:
        scores = self.llm_scores(signals)
        return [[select_topk(scores[bi, pos.to(scores.device)][None], k)[0] for pos, k in zip(row, krow)]
                for bi, (row, krow) in enumerate(zip(signals.visual, ks))]
