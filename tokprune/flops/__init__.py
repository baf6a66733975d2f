"""Analytic FLOPs of the supported multimodal LLMs for any visual-token schedule.

Pruning changes how many tokens each stage processes; this package turns those token counts into FLOPs, from the
transformers config alone (no weights, no forward pass). Conventions (see ``docs/flops.md``):

* ``"full"``: every matmul FLOP of the forward, at 2 FLOPs per multiply-accumulate, over all tokens: vision
  encoder (patch embedding, every ViT layer), projector/merger, every LLM decoder layer (with GQA and SwiGLU) and
  the lm_head. It equals what ``torch.utils.flop_counter.FlopCounterMode`` counts (attention as a full n x n
  product even when causal; softmax, norms, activations, RoPE and embedding lookups are not counted).
* ``"3ndm"``: the paper convention of PDrop / SparseVLM / TransPrune / CATP, ``4nd^2 + 2n^2d + 3ndm`` per LLM
  layer with n = visual tokens only. These are multiply-accumulates although papers print them as FLOPs.
* ``"2ndm"``: FastV's ``4nd^2 + 2n^2d + 2ndm`` per layer, visual tokens only (MACs too).

One job per module: :mod:`~tokprune.flops.arch` (shapes and per-image work from a config),
:mod:`~tokprune.flops.count` (formulas, :func:`estimate`), :mod:`~tokprune.flops.plan` (budgets and method
schedules), :mod:`~tokprune.flops.record` (pruning records), :mod:`~tokprune.flops.measure` (FlopCounterMode).
A leaf of the package: it imports neither ``tokprune.api``, ``tokprune.registry`` nor ``tokprune.patches``, and
takes transformers configs (``tokprune.configs.load`` reads the shipped names).
"""

from tokprune.flops.arch import (
    DEFAULT_N_TEXT,
    FAMILIES,
    Architecture,
    LLMShape,
    ProjectorShape,
    TokenSchedule,
    VisionShape,
    VisionWork,
    describe,
    image_work,
)
from tokprune.flops.count import (
    CONVENTIONS,
    FlopsReport,
    estimate,
    llm_layer_flops,
    paper_layer_macs,
    projector_flops,
    read_flops,
    vision_flops,
    vit_layer_flops,
)
from tokprune.flops.measure import counted_flops, register_cpu_sdpa_formula
from tokprune.flops.plan import for_budget, plan_of
from tokprune.flops.record import from_record, geometry_from_inputs, record_report

__all__ = [
    "CONVENTIONS", "DEFAULT_N_TEXT", "FAMILIES", "Architecture", "FlopsReport", "LLMShape", "ProjectorShape",
    "TokenSchedule", "VisionShape", "VisionWork", "counted_flops", "describe", "estimate", "for_budget",
    "from_record", "geometry_from_inputs", "image_work", "llm_layer_flops", "paper_layer_macs", "plan_of",
    "projector_flops", "read_flops", "record_report", "register_cpu_sdpa_formula", "vision_flops", "vit_layer_flops",
]
