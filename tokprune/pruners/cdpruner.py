"""CDPruner: keep the visual tokens that maximise the conditional diversity of the kept set (a DPP conditioned on
the instruction), before the LLM. Rules: :mod:`tokprune.rules.cdpruner`; code-vs-paper list: docs/methods.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.pruners.base import ModelInfo, Pruner, VisionRequest, VisionSignals
from tokprune.registry import register_method
from tokprune.rules import cdpruner as rules

TEXTS = ("instruction", "paired")


@register_method("cdpruner")
@dataclass
class CDPruner(Pruner):
    """CDPruner (NeurIPS'25, arXiv 2506.10967; code Theia-4869/CDPruner): pre-LLM, per image (LLaVA-NeXT: per
    tile, as the reference runs each crop), keep the ``keep`` visual tokens chosen by greedy MAP inference of a
    determinantal point process whose kernel is ``L = diag(r) S diag(r)``:

    * ``S``: cosine similarity of the projected visual tokens (what the LLM receives), as in the reference;
    * ``r``: each token's relevance to the instruction, ``mean_m(-cos(v_i, t_m))`` over the instruction's text
      rows, min-max normalised over the image (all its tiles together, as the reference normalises one call) as
      ``(r - min + 1e-6) / (max - min)``: the reference's sign and normalisation;
    * ``theta`` (default None: off, as in every reference script; the code carries it as a comment):
      ``r <- exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``, in (0, 1);
    * the greedy: the reference's fast incremental-Cholesky loop (:func:`tokprune.rules.cdpruner.dpp_greedy`),
      one loop over the picks, batched over images of equal size.

    **Where the features differ from the reference.** The reference scores relevance in CLIP's joint space: the
    patch features through CLIP's ``post_layernorm`` and ``visual_projection``, against CLIP's *text tower* on the
    raw question. Hugging Face checkpoints of every family carry no CLIP text tower (and Qwen has none at all), so
    here ``v_i`` is the projected visual token and ``t_m`` the LLM input embedding of each instruction token
    (found from token ids, as CATP does: the adapter's paired text, special ids removed; the chat template's words
    such as "ASSISTANT:" are part of it); an Intel port of CDPruner to HF models does the same (with every
    non-image prompt token as text). Whether the paper's Qwen2.5-VL runs did so is not verified here.
    ``text="instruction"`` (default) conditions every image of a row on the text after the row's last image (the
    question; one image: the same as ``"paired"``); ``text="paired"``: each image on its own paired text (the text
    after it up to the next image). ``negate=False`` drops the reference's minus sign (an option: in LLM space
    the sign is untested by the authors).

    On LLaVA-NeXT the reference selects on each padded 24 x 24 crop before unpadding (so a crop may end with fewer
    than ``keep`` tokens); here a tile's budget counts its content tokens after unpadding (tokprune's per-tile
    budget) and newlines are kept on top. Positions: compact on LLaVA (the reference re-packs the kept tokens),
    original on Qwen (M-RoPE).

    Presets (the paper's budgets; ``keep`` is per image): LLaVA-1.5 ``keep`` = 128, 64, 32 (of 576); LLaVA-NeXT
    ``keep`` = 32 / 16 / 8 with ``tile_budget="per_tile_reference"`` (that many in every tile: the reference's
    ``32 * 5 = 160``); Qwen2.5-VL ``keep_ratio`` = 0.25, 0.125 (the paper's reduction ratios 75 % / 87.5 %).
    """

    summary = "DPP over projected tokens, kernel conditioned on instruction relevance; greedy MAP, pre-LLM"
    paper = "CDPruner, arXiv 2506.10967"
    search_space = {"theta": ("float", 0.05, 0.95)}

    theta: float | None = None
    text: str = "instruction"
    negate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None:
            if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0 < self.theta < 1:
                raise ValueError(f"cdpruner: theta must be in (0, 1) (alpha = theta / (2 (1 - theta))) or None to "
                                 f"leave the relevance as it is, got {self.theta!r}")
        if self.text not in TEXTS:
            raise ValueError(f"cdpruner: text must be one of {TEXTS}, got {self.text!r}")
        if not isinstance(self.negate, bool):
            raise TypeError(f"cdpruner: negate must be True or False, got {self.negate!r}")

    def vision_request(self, info: ModelInfo) -> VisionRequest:
        return VisionRequest(paired_text=True)

    def _texts(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Per entry, the text embeddings it is conditioned on."""
        texts = signals.paired_text
        if self.text == "paired":
            return texts
        image_of = [src[0] if signals.source else own for src, own in
                    zip(signals.source or [None] * len(texts), signals.owners)]
        last: dict[int, tuple[int, int]] = {}
        for j, (row, img) in enumerate(image_of):
            if row not in last or img >= last[row][0]:
                last[row] = (img, j)
        return [texts[last[row][1]] for row, _ in image_of]

    def vision_scores(self, signals: VisionSignals) -> list[torch.Tensor]:
        """Per entry, each token's relevance ``r`` to the instruction (after ``theta``): the kernel's quality term,
        min-max normalised over the whole image (all its parts). The DPP, not a top-k of these, picks the tokens;
        ``record_scores`` / ``tokprune show --scores`` show them."""
        if signals.paired_text is None:
            raise RuntimeError("cdpruner needs the instruction's embeddings; the adapter did not provide them")
        texts = self._texts(signals)
        images = [src[0] if signals.source else own for src, own in
                  zip(signals.source or [None] * len(texts), signals.owners)]
        rel: list[torch.Tensor | None] = [None] * len(images)
        by_image: dict[tuple[int, int], list[int]] = {}
        for j, img in enumerate(images):
            by_image.setdefault(img, []).append(j)
        for members in by_image.values():
            # one part: its features as they are (a cat of one tensor would copy them)
            feats = signals.features[members[0]] if len(members) == 1 else torch.cat([signals.features[j]
                                                                                    for j in members])
            r = rules.theta_transform(rules.relevance(feats, texts[members[0]].to(feats.device), self.negate),
                                      self.theta)
            start = 0
            for j in members:
                n = int(signals.features[j].shape[0])
                rel[j] = r[start:start + n]
                start += n
        return rel  # type: ignore[return-value]

    def select_vision(self, signals: VisionSignals, ks: list[int]) -> list[torch.Tensor]:
        if not ks:
            return []
        rel = self.vision_scores(signals)
        # the greedy, batched over parts of one size
        out: list[torch.Tensor | None] = [None] * len(ks)
        groups: dict[int, list[int]] = {}
        for j, f in enumerate(signals.features):
            groups.setdefault(int(f.shape[0]), []).append(j)
        for members in groups.values():
            x = signals.features[members[0]][None] if len(members) == 1 else torch.stack([signals.features[j]
                                                                                         for j in members])
            kernel = rules.conditional_kernel(rules.similarity(x), torch.stack([rel[j] for j in members]), inplace=True)
            k = max(ks[j] for j in members)
            picks = rules.dpp_greedy(kernel, k) if k else torch.empty(len(members), 0, dtype=torch.long)
            for row, j in enumerate(members):
                out[j] = picks[row, :ks[j]].sort().values
        return out  # type: ignore[return-value]
