"""SparseVLM: text raters chosen from the prompt, visual tokens ranked by the raters' attention inside the LLM at
three (v1: four) layers, pruned tokens recycled into cluster means (rules: :mod:`tokprune.rules.sparsevlm`;
code-vs-paper choices: docs/methods.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokprune.pruners.base import LLMDecision, LLMRequest, LLMSignals, ModelInfo, Pruner
from tokprune.registry import register_method
from tokprune.rules import sparsevlm as rules
from tokprune.schedule import Schedule, StageBudget

VERSIONS = ("v1.5", "v1")
#: ctx.state key: per row, the prompt positions of its raters (chosen at the first stage)
STATE = "sparsevlm_raters"


@dataclass(frozen=True)
class Step:
    """One stage of one image: ``n`` tokens enter, ``kept`` stay as they are, ``new`` recycled tokens are added."""

    n: int
    kept: int
    new: int

    @property
    def total(self) -> int:
        return self.kept + self.new


@register_method("sparsevlm")
@dataclass
class SparseVLM(Pruner):
    """SparseVLM (ICML'25, reference code Gumpest/SparseVLMs), **v1.5 by default** (the repository's default path;
    ``version="v1"`` is the first release's rank-based count).

    **Raters** (once per prefill, per prompt row): on the decoder's input embeddings, the relevance of each
    instruction token (every token after the row's last image up to its last prompt token: the question and the
    template tail, as the reference's "text after the image") is ``softmax over the text of V T^T`` averaged over
    the row's visual tokens; raters are the tokens above the mean relevance. **Stages**: the reference cuts the
    *output* of 0-based decoder layers 2, 6, 15 (v1: 2, 6, 15, 19); here the cuts act before layers 3, 7, 16 (20)
    with the rows of the layer before, as it ran (q/k taps: head-mean softmax over the whole causal row, one row
    per rater), the same relative depths on other LLMs. Each visual token scores the mean over raters.
    **Counts**: v1.5 keeps ``min(c_s, n - 1)`` tokens of the ``n`` alive (``c_s`` from the reference's table for
    ``keep`` 192 / 128 / 96 / 64 of 576, the same fractions of other token counts, linear between the labels;
    ``counts=`` sets them); v1 keeps ``min(int(rank * scale + bias), n - 1)``, ``rank`` = ``torch.linalg.matrix_rank``
    of the (raters x visual tokens) attention in float32 with its default tolerance, and nothing when the rank is
    ``n``. **Recycling** (``recycle=True``, both versions): of the dropped tokens the ``int(0.3 d) + 1`` best scored
    are clustered (DPC-kNN) into ``int(m / 10) + 1`` tokens, each its cluster's mean hidden state, placed after the
    image's kept tokens with contiguous positions (the reference; on M-RoPE families, which keep original
    positions, each sits at a dropped slot of its image: see :class:`~tokprune.pruners.base.LLMDecision`).

    **Budget**: ``keep`` is the authors' nominal label (``budget_meaning="layer_average"``; by their accounting
    ``(2*576 + 4*300 + 10*200 + 16*110) / 32 ~ 191`` for 192); the stages are exact for v1.5 (kept + recycled).
    For v1 the counts depend on the data: every stage is ``at_most`` the tokens alive (the schedule and FLOPs are
    an upper bound); ``scale`` / ``bias`` default to the reference's scripts for keep 192 / 128 / 64 of 576 tokens
    (13.5 / 0, 9 / 6, 0.8 / 0). Multi-image prompts: raters from all the row's images, counts and recycling per image.
    Paper numbers: the ICML'25 paper describes v1 and its tables (those FlowCut quotes) are v1's; HiPrune's
    reproduction runs v1.5.

    Paper budgets (presets): LLaVA-1.5 ``keep=192 / 128 / 64`` (and 96), the reference's ``RETAIN_TOKN`` labels:
    v1.5 keeps 300/200/110, 303/110/36, 66/30/17 (238/48/26) plus the recycled tokens; v1 uses the scripts'
    scale / bias for 192 / 128 / 64. LLaVA-NeXT ``keep=640 / 320 / 160`` (FlowCut's comparison) and Qwen
    ``keep_ratio=0.333 / 0.222 / 0.111`` take the same fractions of each image's tokens. On Qwen3-VL a recycled
    token sitting in a slot receives that slot's DeepStack features in later DeepStack layers (the default cuts,
    before layers 3, 8, 18 of 36, come after all of them).
    """

    summary = "text raters' attention at LLM layers 2/6/15, recycled cluster tokens (v1.5; v1: rank-based counts)"
    paper = "SparseVLM, arXiv 2410.04417"
    budget_meaning: ClassVar[str] = "layer_average"
    #: the recycling's two numbers, valid in both versions (v1's scale / bias need ``version="v1"``)
    search_space: ClassVar[dict[str, tuple]] = {"recycle_share": ("float", 0.05, 1.0), "per_cluster": ("int", 1, 40)}

    version: str = "v1.5"
    layers: tuple[int, ...] | None = None
    counts: tuple[int, ...] | None = None
    scale: float | None = None
    bias: float | None = None
    recycle: bool = True
    recycle_share: float = rules.RECYCLE_SHARE
    per_cluster: int = rules.PER_CLUSTER

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version not in VERSIONS:
            raise ValueError(f"sparsevlm: version must be one of {VERSIONS} ('v1.5': the repository's default, "
                             f"fixed per-stage counts; 'v1': rank-based counts), got {self.version!r}")
        if not isinstance(self.recycle, bool):
            raise TypeError(f"sparsevlm: recycle must be True or False, got {self.recycle!r}")
        rs = self.recycle_share
        if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not 0 < rs <= 1:
            raise ValueError(f"sparsevlm: recycle_share is the share of the dropped tokens that is clustered (the "
                             f"reference's 0.3), in (0, 1]; got {rs!r}")
        self.recycle_share = float(rs)
        if isinstance(self.per_cluster, bool) or not isinstance(self.per_cluster, int) or self.per_cluster < 1:
            raise ValueError(f"sparsevlm: per_cluster is the candidates per recycled token (the reference's 10), an "
                             f"int >= 1; got {self.per_cluster!r}")
        if self.layers is not None:
            lay = tuple(self.layers) if not isinstance(self.layers, (str, bytes)) else ()
            if not lay or any(isinstance(x, bool) or not isinstance(x, int) for x in lay):
                raise ValueError(f"sparsevlm: layers must be 0-based decoder layers before which the cuts act "
                                 f"(the reference's 2, 6, 15 + 1: (3, 7, 16)), got {self.layers!r}")
            self.layers = lay
        if self.counts is not None:
            if self.version != "v1.5":
                raise ValueError("sparsevlm: counts= are v1.5's fixed counts; v1 takes scale= and bias=")
            c = tuple(self.counts) if not isinstance(self.counts, (str, bytes)) else ()
            if not c or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in c):
                raise ValueError(f"sparsevlm: counts must be positive ints, the tokens kept at each stage before "
                                 f"recycling (e.g. (300, 200, 110)), got {self.counts!r}")
            self.counts = c
        for name in ("scale", "bias"):
            v = getattr(self, name)
            if v is None:
                continue
            if self.version != "v1":
                raise ValueError(f"sparsevlm: {name}= belongs to the rank-based count; pass version='v1' with it")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"sparsevlm: {name} must be a finite number >= 0 (v1 keeps int(rank * scale + "
                                 f"bias) tokens), got {v!r}")
            setattr(self, name, float(v))
        n = len(self._default_layers())
        if self.layers is not None and len(self.layers) != n and self.counts is None and self.version == "v1.5":
            raise ValueError(f"sparsevlm: {len(self.layers)} layers for the {n} stages of v1.5's table; pass one "
                             "layer per stage, or counts= with as many entries as layers")
        if self.counts is not None and self.layers is not None and len(self.counts) != len(self.layers):
            raise ValueError(f"sparsevlm: {len(self.counts)} counts for {len(self.layers)} layers; give one per layer")
        if self.counts is not None and self.layers is None and len(self.counts) != n:
            raise ValueError(f"sparsevlm: {len(self.counts)} counts for the {n} default layers; pass layers= too")

    # ------------------------------------------------------------------ layers and budgets
    def _default_layers(self) -> tuple[int, ...]:
        return rules.LAYERS_V1 if self.version == "v1" else rules.LAYERS_V15

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        out: list[int] = []
        for x in self._default_layers():  # the layer whose output is cut, + 1; same relative depth elsewhere
            v = max(round((x + 1) * info.llm_layers / rules.REFERENCE_DEPTH), 1)
            out.append(max(v, out[-1] + 1) if out else v)
        if out[-1] >= info.llm_layers:
            raise ValueError(f"sparsevlm: {self.version}'s {len(out)} cuts do not fit a {info.llm_layers}-layer LLM; "
                             "pass layers= (fewer) with counts=, or version='v1.5'")
        return tuple(out)

    def default_keep_ratio(self) -> float:
        return 192 / rules.N_REFERENCE  # the reference's RETAIN_TOKN default

    def v1_scale(self, n_visual: int, keep: int) -> tuple[float, float]:
        """v1's (scale, bias): the options, else the reference scripts' for this budget's label."""
        if self.scale is not None:
            return self.scale, self.bias or 0.0
        label = round(keep * rules.N_REFERENCE / n_visual)
        if label not in rules.V1_PRESETS:
            raise ValueError(f"sparsevlm v1: no reference scale/bias for keep={keep} of {n_visual} tokens (presets: "
                             f"keep {sorted(rules.V1_PRESETS)} of 576); pass scale= and bias=")
        return rules.V1_PRESETS[label]

    def steps(self, n_visual: int, keep: int, n_stages: int) -> list[Step]:
        """v1.5's per-stage counts of an image (exact); keep-all keeps everything."""
        if keep >= n_visual:
            return [Step(n_visual, n_visual, 0)] * n_stages
        fr = None if self.counts is not None else rules.stage_fractions(keep / n_visual)
        out, n = [], n_visual
        for s in range(n_stages):
            want = self.counts[s] if self.counts is not None else max(1, round(fr[s] * n_visual))
            kept = max(0, min(want, n - 1))
            new = self._clusters(n - kept)
            out.append(Step(n, kept, new))
            n = kept + new
        return out

    def _clusters(self, dropped: int) -> int:
        return rules.cluster_count(dropped, self.recycle_share, self.per_cluster) if self.recycle else 0

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        """v1.5's exact stages or v1's bounds; the fractions follow ``keep / n_visual`` (a ``keep_ratio`` budget
        is used through the count it resolved to, which is also what the stages see at run time)."""
        layers = self.llm_layers(info)
        if self.version == "v1":
            if keep < n_visual:
                self.v1_scale(n_visual, keep)  # fail at the first forward with the fix, not inside a stage
            at_most = keep < n_visual
            stages = tuple(StageBudget("llm", k, n_visual, at_most=at_most) for k in layers)
        else:
            stages = tuple(StageBudget("llm", k, st.total) for k, st in
                           zip(layers, self.steps(n_visual, keep, len(layers))))
        return Schedule(n_visual, stages, self.budget_meaning)

    # ------------------------------------------------------------------ LLM stages
    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="instruction", source="previous", heads="mean", domain="causal",
                          per_query=True, embeddings=True)

    def _raters(self, signals: LLMSignals) -> list[torch.Tensor]:
        """Per row, the prompt positions of its raters (chosen once, at the first stage, from the embeddings)."""
        state = signals.ctx.state
        if STATE in state:
            return state[STATE]
        emb, instr = signals.embeddings, signals.spans["instruction"]
        out = []
        for b, row in enumerate(signals.visual):
            if not row or not sum(int(p.numel()) for p in row):
                out.append(torch.zeros(0, dtype=torch.long, device=emb.device))
                continue
            vis = emb[b, torch.cat(row).to(emb.device)]
            tpos = instr[b].nonzero()[:, 0]
            chosen = rules.raters(vis, emb[b, tpos])
            if not bool(chosen.any()):  # all relevances equal: the reference would average an empty set (NaN)
                signals.ctx.notes.append(f"row {b}: no instruction token above the mean relevance; every "
                                         "instruction token rates")
                chosen = torch.ones_like(chosen)
            out.append(signals.positions[b, tpos[chosen]])
        state[STATE] = out
        return out

    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor | LLMDecision]]:
        layers = self.llm_layers(signals.ctx.info)
        stage = layers.index(signals.layer)
        raters = self._raters(signals)
        att, qslots = signals.attention, signals.query_slots
        out: list[list[torch.Tensor | LLMDecision]] = []
        for b, row in enumerate(signals.visual):
            out.append([])
            if not row:
                continue
            slots = qslots[b][qslots[b] >= 0]
            is_rater = torch.isin(signals.positions[b, slots], raters[b].to(slots.device))
            rows = att[b][(qslots[b] >= 0).nonzero()[:, 0][is_rater]]  # (raters, n)
            for i, pos in enumerate(row):
                n = int(pos.numel())
                relation = rows[:, pos.to(rows.device)].float()
                score = relation.mean(0)
                n0, keep = signals.budgets[b][i]
                if self.version == "v1":
                    if keep >= n0:
                        kept, cut = n, False
                    else:
                        kept, cut = rules.rank_count(relation, *self.v1_scale(n0, keep))
                    new = self._clusters(n - kept) if cut else 0
                else:
                    st = self.steps(n0, keep, len(layers))[stage]
                    if st.n != n:
                        raise RuntimeError(f"sparsevlm: stage {stage} of image {i} in row {b} sees {n} tokens, its "
                                           f"schedule {st.n}")
                    kept, new = st.kept, st.new
                if kept >= n:
                    out[-1].append(torch.arange(n, device=pos.device))
                    continue
                order = torch.sort(-score, stable=True).indices  # ties: the lower index
                keep_idx = order[:kept].sort().values
                if not new:
                    out[-1].append(keep_idx.to(pos.device))
                    continue
                # the reference's candidates: the best scored dropped tokens, by decreasing score
                m, c = rules.recycle_count(n - kept, self.recycle_share, self.per_cluster)
                cand = order[kept:kept + m]
                merged, assign = rules.dpc_knn_merge(signals.hidden[b, pos[cand].to(signals.hidden.device)], c)
                sources = [cand[assign == j] for j in range(c)]
                out[-1].append(LLMDecision(keep_idx.to(pos.device), merged.to(signals.hidden.dtype),
                                           [s.to(pos.device) for s in sources]))
        return out
