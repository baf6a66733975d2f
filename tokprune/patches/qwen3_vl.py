"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL plus DeepStack.

Only the differences from :mod:`tokprune.patches.qwen2_vl` live here. The ViT also returns
``deepstack_features`` (merged features of a few intermediate blocks, one list per level, split per image) that
the text model adds to the hidden states of the visual tokens after its first decoder layers
(``language_model._deepstack_process``, selected by ``visual_pos_masks``).

* Pre-LLM pruning prunes every DeepStack level with the same kept indices as ``pooler_output``, and builds a
  method's new (merged) tokens on every level with the same sources and weights.
* In-LLM pruning before a layer K inside the DeepStack range shortens the hidden states while
  ``visual_pos_masks`` / ``visual_embeds`` keep the prompt's length; ``_deepstack_process`` is wrapped (an instance
  attribute, deleted again by :meth:`remove`) so both follow the current slots.
"""

from __future__ import annotations

from typing import Any

import torch

from tokprune.patches.qwen2_vl import Qwen2VLAdapter
from tokprune.patches.vision_stage import Placement
from tokprune.registry import register_model


@register_model("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration",)

    def prune_encoder_outputs(self, out: Any, placements: list[Placement], source: list[int] | None = None) -> Any:
        new = super().prune_encoder_outputs(out, placements, source)
        levels = getattr(out, "deepstack_features", None)
        if levels is not None:
            new.deepstack_features = [[p.build(f, "DeepStack levels") for f, p in zip(level, placements)]
                                      for level in levels]
        return new

    def install(self) -> None:
        super().install()
        if self.llm is not None:
            lm = self.language_model
            lm._deepstack_process = self._follow_slots(lm._deepstack_process)

    def remove(self) -> None:
        vars(self.language_model).pop("_deepstack_process", None)
        super().remove()

    def _follow_slots(self, process: Any) -> Any:
        def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                              visual_embeds: torch.Tensor) -> torch.Tensor:
            run = self.llm.current() if self.llm is not None else None  # this prefill's LLM run
            if run is not None and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                idx = run.idx.to(visual_pos_masks.device)  # current slot -> prompt position (dead slots included)
                present = torch.zeros_like(visual_pos_masks).scatter_(1, idx, True)
                visual_embeds = visual_embeds[present[visual_pos_masks].to(visual_embeds.device)]
                visual_pos_masks = torch.gather(visual_pos_masks, 1, idx)
            return process(hidden_states, visual_pos_masks, visual_embeds)

        return deepstack_process
