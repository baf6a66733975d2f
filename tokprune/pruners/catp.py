"""CATP: contextually adaptive token pruning for multimodal in-context learning (interleaved few-shot prompts).

Stage 1 (after the projector) selects, per image, a diverse and text-aligned subset by greedy facility location;
stage 2 (inside the LLM) ranks all demonstration image tokens of a prompt together, then prunes the query image by
its similarity to the distilled context. Rules: :mod:`tokprune.rules.catp`; paper-vs-choice table: docs/rules.md
and docs/methods.md (the paper has no public code, so it is the spec).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokprune.pruners.base import (
    LLMRequest,
    LLMSignals,
    ModelInfo,
    Pruner,
    VisionRequest,
    VisionSignals,
)
from tokprune.registry import register_method
from tokprune.rules import catp as rules
from tokprune.schedule import Schedule

#: the paper's stage-2 layer by LLM depth: K = 6 for LLaVA-NeXT-7B / InternVL2.5-8B (32 layers) and Qwen2.5-VL-7B
#: (28), K = 10 for LLaVA-NeXT-13B (40); other depths: 6 scaled from 32 layers
PAPER_LAYERS = {28: 6, 32: 6, 40: 10}
PAPER_LAYER, REFERENCE_DEPTH = 6, 32
SIMILARITIES = ("rescaled", "cosine")
CONTEXT_SUMMARIES = ("demonstrations", "tokens", "images")
STATE = "catp"
COVERAGES = ("sum", "mean")


@register_method("catp")
@dataclass
class CATP(Pruner):
    """CATP (AAAI'26, arXiv 2508.07871; no public code, the paper is the spec): for interleaved few-shot prompts
    (demonstrations (image, text) followed by a query image and question), removes a fraction R of all image tokens
    of a prompt, R/2 in each of two stages.

    Budget: ``keep_ratio`` is the kept fraction (``R = 1 - keep / n`` per image, ``keep`` the count the budget gives
    an image); ``prune_ratio=R`` (the paper's number, the *pruned* fraction, e.g. 0.778) uses the paper's counts
    exactly. Never both. Per image ``i`` of ``S_i`` tokens:

    * **stage 1** (after the projector, before the LLM): keep ``floor(S_i (1 - R/2))`` tokens by greedy
      facility location (diversity) plus ``lambda1`` (0.7) times the similarity to the mean LLM input embedding of
      the image's paired text (:func:`tokprune.kernels.facility_location`, vectorised); similarities are the cosine
      rescaled to [0, 1] as ``(cos + 1)/2`` (``similarity="cosine"``: raw cosine). The diversity term is the
      paper's sum over the image's tokens (``coverage="mean"``: divided by ``S_i``, which makes the alignment
      term weigh ``S_i`` times more; the paper does not normalise). The paired text comes from token ids (the adapter's
      ``VisionSignals.paired_text``: the text after the image up to the next one; the query image: its question).
    * **stage 2a, at 0-based decoder layer** ``layer`` (K; default the paper's: 6 on 28- and 32-layer LLMs,
      10 on 40 layers, else ``round(6 L / 32)``, at least 1): after layer K has run on every token, all
      demonstration image tokens of a row are ranked together by ``max(0, A_K - A_{K-1}) + lambda2 sim(h_K, v_q)``
      (lambda2 = 0.6) and the pool is cut to ``floor(N_ctx (1 - R))`` (``N_ctx`` the demonstrations' original
      tokens; with ``keep_ratio``: the sum of their ``keep``), so the per-demonstration counts adapt; the cut acts
      before layer K+1. ``A_K`` / ``A_{K-1}``: the head-mean attention rows of the query's last prompt token in
      layers K and K-1 as they ran (HF ``attentions[K]``, ``attentions[K-1]``); ``h_K``: layer K's output (HF
      ``hidden_states[K+1]``); ``v_q``: its mean over the query sample (its image and the text after it). ``sim``:
      the plain cosine (``stage2_similarity="rescaled"``: ``(cos + 1)/2``, which halves its weight against the
      attention increase).
    * **stage 2b, at layer K+1** (acting before K+2): the query image keeps ``floor(S_q (1 - R))`` (``keep``) of
      its tokens, by ``sim(h_{K+1}, v_c)`` with ``v_c`` the mean of layer K+1's output over the retained context
      (``context_summary="demonstrations"``: every retained token from the first demonstration image up to the
      query sample, the demonstrations' texts included, not the BOS / system prompt before them, whose hidden states
      in real LLMs carry massive activations that would dominate a mean; ``"tokens"``: every real token before the
      query sample; ``"images"``: the retained demonstration image tokens only). From layer K+2 on, ``1 - R`` of
      the image tokens remain (the paper's wording). The paper does not say whether its layers count from 0 or 1:
      ``layer`` is 0-based, the paper's K read 1-based is ``layer=K-1``.

    The last image of a row is the query, the earlier ones demonstrations (:func:`tokprune.prompts.icl` builds such
    prompts). A row with one image runs stage 1 only (no context to rank, no context vector) and says so in
    ``record.notes``. Survivors keep their original positions by default (the paper is silent; M-RoPE needs them).
    """

    summary = "multimodal ICL: facility location + text alignment per image, then context-adaptive cuts at K, K+1"
    paper = "CATP, arXiv 2508.07871"
    pooled_budget = True

    prune_ratio: float | None = None
    layer: int | None = None
    lambda1: float = 0.7
    lambda2: float = 0.6
    similarity: str = "rescaled"
    stage2_similarity: str = "cosine"
    coverage: str = "sum"
    context_summary: str = "demonstrations"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prune_ratio is not None:
            rules.prune_ratio(prune_ratio=self.prune_ratio)  # validates: in [0, 1)
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"catp: similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.stage2_similarity not in SIMILARITIES:
            raise ValueError(f"catp: stage2_similarity must be one of {SIMILARITIES}, got {self.stage2_similarity!r}")
        if self.coverage not in COVERAGES:
            raise ValueError(f"catp: coverage must be one of {COVERAGES}, got {self.coverage!r}")
        if self.context_summary not in CONTEXT_SUMMARIES:
            raise ValueError(f"catp: context_summary must be one of {CONTEXT_SUMMARIES}, got {self.context_summary!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"catp: layer must be an int (0-based decoder layer), got {self.layer!r}")

    # ------------------------------------------------------------------ schedule
    def default_keep_ratio(self) -> float | None:
        """With ``prune_ratio=R`` and no other budget: the adapter's budget is ``keep_ratio = 1 - R``."""
        return None if self.prune_ratio is None else 1 - self.prune_ratio

    def stage_layer(self, info: ModelInfo) -> int:
        """K: the 0-based decoder layer whose attention and output rank the demonstration tokens (cut before K+1)."""
        if self.layer is not None:
            return self.layer
        if info.llm_layers in PAPER_LAYERS:
            return PAPER_LAYERS[info.llm_layers]
        return max(1, round(PAPER_LAYER * info.llm_layers / REFERENCE_DEPTH))

    def check(self, info: ModelInfo) -> None:
        k = self.stage_layer(info)
        if not 1 <= k <= info.llm_layers - 3:
            raise ValueError(f"catp: layer={k} needs layers K-1 to K+2 (the cuts act before K+1 and K+2); the LLM "
                             f"has {info.llm_layers} layers, pass a layer in [1, {info.llm_layers - 3}]")
        super().check(info)

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest(paired_text=True)

    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        k = self.stage_layer(info)
        return (k + 1, k + 2)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        k = self.stage_layer(info)
        # at the cut before K+1: "previous" is layer K as it ran; layer K-1's row is recorded as it ran
        return LLMRequest(queries="last", source="previous", heads="mean", domain="causal", row_layers=(k - 1,))

    def ratio(self, n_visual: int, keep: int) -> float:
        """R for an image of ``n_visual`` tokens and user budget ``keep``."""
        if keep >= n_visual:
            return 0.0
        return self.prune_ratio if self.prune_ratio is not None else 1 - keep / n_visual

    def final(self, n_visual: int, keep: int) -> int:
        """An image's count after both stages when it is pruned by stage 2."""
        if self.prune_ratio is None or keep >= n_visual:
            return min(keep, n_visual)
        return rules.pool_keep(n_visual, self.prune_ratio)

    def stage1(self, n_visual: int, keep: int) -> int:
        return int(rules.stage1_counts(n_visual, self.ratio(n_visual, keep)))

    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        """One image alone (stage 1 only): ``floor(S (1 - R/2))`` at every stage. In a row of several images the
        budgets are pooled (:meth:`row_budgets`)."""
        return self.stage1(n_visual, keep)

    def schedule(self, info: ModelInfo, n_visual: int, keep: int, keep_ratio: float | None = None) -> Schedule:
        """One image alone: its stage-1 count at every stage, which is more than ``keep`` (``floor(S (1 - R/2))``,
        at least half the image); the schedule's note says so, since ``keep`` is the final count of each image of a
        few-shot prompt only."""
        sched = super().schedule(info, n_visual, keep, keep_ratio)
        if keep >= n_visual:
            return sched
        r = self.ratio(n_visual, keep)
        note = (f"one image runs stage 1 only and keeps floor(S (1 - R/2)) = {sched.stages[-1].keep} of {n_visual} "
                f"at R = {r:.3f}, not keep={keep}; keep is the final count of each image of a few-shot prompt")
        return dataclasses.replace(sched, note=note)

    def row_budgets(self, info: ModelInfo, stage: int, n_visual: list[int], keep: list[int]) -> list[int]:
        """Per image of a row: stage 0 ``floor(S_i (1 - R/2))``; stage 1 (after K) the demonstrations' pool
        ``floor(N_ctx (1 - R))`` spread over them (only the sum binds: the ranking moves it), the query unchanged;
        stage 2 (after K+1) the query's final count. A row of one image keeps its stage-1 count."""
        s1 = [self.stage1(n, k) for n, k in zip(n_visual, keep)]
        if stage == 0 or len(n_visual) < 2:
            return s1
        ctx_n, ctx_k = n_visual[:-1], keep[:-1]
        if self.prune_ratio is not None and all(k < n for n, k in zip(ctx_n, ctx_k)):
            pool = rules.pool_keep(sum(ctx_n), self.prune_ratio)
        else:
            pool = sum(self.final(n, k) for n, k in zip(ctx_n, ctx_k))
        pool = min(pool, sum(s1[:-1]))
        spread = [min(s, self.final(n, k)) for s, n, k in zip(s1[:-1], ctx_n, ctx_k)]
        for i in range(len(spread)):  # the pool's remainder on the first images with room (the sum is what binds)
            extra = min(pool - sum(spread), s1[i] - spread[i])
            spread[i] += max(extra, 0)
        query = s1[-1] if stage == 1 else min(s1[-1], self.final(n_visual[-1], keep[-1]))
        return [*spread, query]

    def default_positions(self, info: ModelInfo) -> str:
        """Original positions on every family (the paper is silent; M-RoPE needs them; ``positions="compact"``
        re-indexes on LLaVA)."""
        return "original"

    # ------------------------------------------------------------------ stage 1
    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        if not ks:
            return []
        picks = self._greedy(signals, ks)
        self.vision_scores(signals, picks)  # what record_scores stores: the greedy's order as a score
        return [picks[j, :k].sort().values for j, k in enumerate(ks)]

    def vision_scores(self, signals: VisionSignals, picks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage 1's choice as a per-token score (for ``record_scores`` heat-maps; the greedy has no score of its
        own): ``1 - r / n`` for the token picked r-th (0-based) of an image's n tokens, 0 for a token never picked,
        so the top k of these scores are the greedy's k picks. ``picks``: (B, max k) in pick order, -1 padded; by
        default the greedy runs to every token (its first k picks are the same for any k)."""
        if picks is None:
            picks = self._greedy(signals, [int(f.shape[0]) for f in signals.features])
        out = []
        for j, f in enumerate(signals.features):
            order = picks[j][picks[j] >= 0]
            score = torch.zeros(int(f.shape[0]), device=order.device)
            score[order] = 1 - torch.arange(order.numel(), device=order.device, dtype=score.dtype) / f.shape[0]
            out.append(score)
        return out

    def _greedy(self, signals: VisionSignals, ks: list[int]) -> torch.Tensor:
        """(B, max k) greedy facility-location picks of each image, in pick order, -1 padded."""
        if signals.paired_text is None:
            raise RuntimeError("catp needs each image's paired text; the adapter did not provide it")
        feats = signals.features
        dev = feats[0].device
        width = max(int(f.shape[0]) for f in feats)
        tokens = torch.zeros(len(feats), width, feats[0].shape[-1], device=dev)
        valid = torch.zeros(len(feats), width, dtype=torch.bool, device=dev)
        for j, f in enumerate(feats):
            tokens[j, :f.shape[0]] = f.float()
            valid[j, :f.shape[0]] = True
        text = torch.stack([t.float().mean(0).to(dev) for t in signals.paired_text])
        return rules.facility_location_greedy(tokens, text, torch.tensor(ks), self.lambda1, valid, self.similarity,
                                              self.coverage)

    # ------------------------------------------------------------------ stage 2
    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor]]:
        first = signals.ctx is None or signals.layer == self.stage_layer(signals.ctx.info) + 1
        out = []
        for b, (vis, krow) in enumerate(zip(signals.visual, ks)):
            keep_all = [torch.arange(int(p.numel()), device=p.device) for p in vis]
            if len(vis) < 2:
                if first and signals.ctx is not None and vis:
                    signals.ctx.notes.append(f"row {b}: one image, stage 1 only (no demonstrations to rank after "
                                             f"layer {signals.layer - 1})")
                out.append(keep_all)
                continue
            out.append(self._context_cut(signals, b, vis, krow) if first else self._query_cut(signals, b, vis, krow))
        return out

    def _context_cut(self, signals: LLMSignals, b: int, vis: list[torch.Tensor], krow: list[int]
                     ) -> list[torch.Tensor]:
        """Stage 2a (before K+1, ``hidden`` = layer K's output): every demonstration image token of row ``b`` in
        one pool, the query image untouched."""
        ctx_pos = torch.cat(vis[:-1])
        hidden = signals.hidden[b]
        v_q = rules.masked_mean(hidden[None], signals.spans["sample"][b][None])
        prev = signals.rows_at[signals.layer - 2][b]  # layer K-1 as it ran; signals.attention: layer K as it ran
        scores = rules.context_scores(signals.attention[b, ctx_pos][None], prev[ctx_pos][None],
                                      hidden[ctx_pos][None], v_q, self.lambda2, self.stage2_similarity)
        kept = rules.select_pool(scores, sum(krow[:-1]))[0]
        if signals.ctx is not None and signals.positions is not None:  # where the demonstrations start, for v_c
            signals.ctx.state.setdefault(STATE, {})[b] = int(signals.positions[b, vis[0][0]])
        image_of = torch.cat([torch.full((int(p.numel()),), i, device=kept.device) for i, p in enumerate(vis[:-1])])
        starts = torch.cumsum(torch.tensor([0] + [int(p.numel()) for p in vis[:-1]]), 0).tolist()
        out = [kept[image_of[kept] == i] - starts[i] for i in range(len(vis) - 1)]
        return [*out, torch.arange(int(vis[-1].numel()), device=vis[-1].device)]

    def _query_cut(self, signals: LLMSignals, b: int, vis: list[torch.Tensor], krow: list[int]
                   ) -> list[torch.Tensor]:
        """Stage 2b (before K+2, ``hidden`` = layer K+1's output): the query image's tokens by similarity to the
        distilled context vector."""
        hidden = signals.hidden[b]
        if self.context_summary in ("tokens", "demonstrations"):
            ctx_mask = signals.spans["context"][b]
            if self.context_summary == "demonstrations":
                ctx_mask = ctx_mask & self._from_first_demonstration(signals, b, vis)
        else:
            ctx_mask = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            ctx_mask[torch.cat(vis[:-1])] = True
        v_c = rules.masked_mean(hidden[None], ctx_mask[None])
        scores = rules.query_scores(hidden[vis[-1]][None], v_c, self.stage2_similarity)
        query = rules.select_pool(scores, krow[-1])[0]
        return [*(torch.arange(int(p.numel()), device=p.device) for p in vis[:-1]), query]

    @staticmethod
    def _from_first_demonstration(signals: LLMSignals, b: int, vis: list[torch.Tensor]) -> torch.Tensor:
        """(n,) bool: the current slots at or after the first demonstration image's first token (its prompt position,
        noted by stage 2a: the cut may have removed every token of that image since)."""
        n = signals.hidden.shape[1]
        first = None if signals.ctx is None else signals.ctx.state.get(STATE, {}).get(b)
        if first is not None and signals.positions is not None:
            return signals.positions[b] >= first
        starts = [int(p[0]) for p in vis[:-1] if p.numel()]  # no note (a hand-built call): the surviving tokens
        start = min(starts) if starts else int(vis[-1][0])
        return torch.arange(n, device=signals.hidden.device) >= start
