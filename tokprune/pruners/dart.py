"""DART: at LLM layer K keep the image tokens least duplicated with a few pivot tokens ("duplication matters more").
Rules: :mod:`tokprune.rules.dart`; code-vs-paper list: docs/methods.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import LLMRequest, LLMSignals, ModelInfo, Pruner
from tokprune.registry import register_method
from tokprune.rules import dart as rules


@register_method("dart")
@dataclass
class DART(Pruner):
    """DART (EMNLP'25, arXiv 2502.11494; code ZichenWen1/DART, also LightCompress): before decoder layer ``layer``
    (K, default 2), per image:

    * ``pivot_image`` (4) image tokens and ``pivot_text`` (4) text tokens with the largest L1 norm of their keys
      in layer K-1 (post-RoPE, all heads); the text candidates are the tokens after the row's last image up to the
      last prompt token (one image: everything after it, as in the reference);
    * each pivot in turn takes its share of the image tokens (image pivots excluded) whose hidden state, layer
      K-1's output through the decoder's final norm, has the lowest cosine similarity to the pivot's, and they
      leave the pool; kept = image pivots + taken tokens. ``pivot_order="reference"`` (default) visits the pivots
      in the iteration order of the Python ``set`` of their absolute sequence indices, as the reference does (an
      accident of CPython that changes the kept set on most images); ``"score"``: image pivots then text pivots,
      each by descending key norm (the list the reference builds before the set).

    ``keep`` counts the image tokens kept: the image pivots plus ``keep - pivot_image`` taken tokens, ``//`` the
    number of pivots each and one more for the first pivots of the order when it does not divide. The reference
    sets a per-pivot count ``t`` and keeps ``pivot_image + (pivot_image + pivot_text) t``. Presets (the reference's
    counts for the paper's budgets): LLaVA-1.5 budgets 192 / 128 / 64 (``max_num_trunction``) -> ``keep`` = 196 /
    132 / 68; LLaVA-NeXT 320 / 160 / 80 (``retain_token_num_for_llava_next``) -> 324 / 164 / 84 per image;
    Qwen2-VL / Qwen2.5-VL reduction ratios 0.667 / 0.778 / 0.889 -> ``reduction_ratio=`` (``t = int(n (1 - r) /
    8)`` per image, the reference's rule, without another budget). Survivors keep their original positions (the
    reference passes the kept indices as position ids; ``positions="compact"`` re-indexes on LLaVA).

    Differences (docs/methods.md): the reference runs batch 1 with one image; here rows are batched (left padding
    does not change the pivots, their set order uses each row's unpadded indices) and each image of a row runs the
    rule on its own tokens with the row's instruction as text candidates. LLaVA-NeXT newlines are never scored
    nor pivots here (the reference treats them as image tokens) and are kept on top. An image with fewer tokens
    than ``pivot_image`` or a budget below it keeps its top-``keep`` pivots only. The selection is not a top-k of
    one score, so no per-token score is recorded (``tokprune show --scores`` says so).
    """

    summary = "pivots by key L1 norm at LLM layer K-1; each pivot keeps the image tokens least similar to it"
    paper = "DART, arXiv 2502.11494"
    search_space = {"layer": ("int", 1, 4), "pivot_image": ("int", 1, 16), "pivot_text": ("int", 0, 16)}

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: str = "reference"
    reduction_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("layer", 1), ("pivot_image", 1), ("pivot_text", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"dart: {name} must be an int >= {low}, got {v!r}")
        if self.pivot_order not in rules.ORDERS:
            raise ValueError(f"dart: pivot_order must be one of {rules.ORDERS} ('reference': the reference's set "
                             f"order; 'score': by key norm), got {self.pivot_order!r}")
        if self.reduction_ratio is not None and not (isinstance(self.reduction_ratio, (int, float))
                                                     and 0 <= self.reduction_ratio < 1):
            raise ValueError(f"dart: reduction_ratio must be in [0, 1) (the pruned fraction), got "
                             f"{self.reduction_ratio!r}; or pass keep / keep_ratio instead")

    # ------------------------------------------------------------------ schedule
    def llm_layers(self, info: ModelInfo) -> tuple[int, ...]:
        return (self.layer,)

    def llm_request(self, info: ModelInfo) -> LLMRequest:
        return LLMRequest(queries="last", source="previous", keys=True, final_norm=True)

    def default_positions(self, info: ModelInfo) -> str:
        return "original"

    def default_keep_ratio(self) -> float | None:
        """With ``reduction_ratio=r`` and no other budget: the adapter's budget is ``keep_ratio = 1 - r``; the count
        is then the reference's (:meth:`stage_budget`)."""
        return None if self.reduction_ratio is None else 1 - self.reduction_ratio

    def stage_budget(self, stage: int, n_visual: int, keep: int) -> int:
        """``keep``; with ``reduction_ratio`` the reference's ``pivot_image + P int(n (1 - r) / P)`` (P = all
        pivots), at most ``n``."""
        if self.reduction_ratio is None or keep >= n_visual:
            return keep
        p = self.pivot_image + self.pivot_text
        return min(n_visual, self.pivot_image + p * int(n_visual * (1 - self.reduction_ratio) / p))

    # ------------------------------------------------------------------ the stage
    def select_llm(self, signals: LLMSignals, ks: list[list[int]]) -> list[list[torch.Tensor]]:
        if signals.keys is None or signals.normed is None:
            raise RuntimeError("dart needs layer K-1's keys and the normed hidden states; the adapter gave none")
        valid = signals.valid if signals.valid is not None else torch.ones(signals.hidden.shape[:2], dtype=torch.bool,
                                                                           device=signals.hidden.device)
        absolute = valid.long().cumsum(1) - 1  # each slot's index in the row's unpadded prompt (set order)
        text_span = signals.spans.get("instruction")
        out = []
        for b, (vis, krow) in enumerate(zip(signals.visual, ks)):
            keys_b = signals.keys[b].transpose(0, 1)  # (n, Hkv, d)
            text_pos = (text_span[b].nonzero()[:, 0] if text_span is not None
                        else torch.empty(0, dtype=torch.long, device=keys_b.device))
            row = []
            for pos, k in zip(vis, krow):
                row.append(self._image(signals.normed[b], keys_b, absolute[b], pos, text_pos, k))
            out.append(row)
        return out

    def _image(self, hidden: torch.Tensor, keys: torch.Tensor, absolute: torch.Tensor, pos: torch.Tensor,
               text_pos: torch.Tensor, k: int) -> torch.Tensor:
        """Kept indices into ``pos`` (one image's current slots), ``k`` of them."""
        n = int(pos.numel())
        if k >= n:
            return torch.arange(n, device=pos.device)
        img_piv = rules.pivots(rules.key_norms(keys[pos]), min(self.pivot_image, k))
        txt_piv = rules.pivots(rules.key_norms(keys[text_pos]), self.pivot_text) if text_pos.numel() else img_piv[:0]
        # sync: once per image, the pivots' absolute indices (a Python set decides their order, as in the reference)
        img_abs = absolute[pos[img_piv]].tolist()
        txt_abs = absolute[text_pos[txt_piv]].tolist()
        order = rules.pivot_order(img_abs, txt_abs, self.pivot_order)
        slot_of = {a: int(s) for a, s in zip(img_abs + txt_abs, pos[img_piv].tolist() + text_pos[txt_piv].tolist())}
        anchors = hidden[torch.tensor([slot_of[a] for a in order], dtype=torch.long, device=hidden.device)]
        pool = torch.ones(n, dtype=torch.bool, device=pos.device)
        pool[img_piv] = False
        counts = rules.share_counts(k - int(img_piv.numel()), len(order))
        taken = rules.take_least_similar(hidden[pos], pool, anchors, counts)
        return torch.cat([img_piv, taken]).sort().values
