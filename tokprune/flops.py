"""Analytic FLOPs of the supported multimodal LLMs for any visual-token schedule.

Pruning changes how many tokens each stage processes; this module turns those token counts into FLOPs, from the
transformers config alone (no weights, no forward pass). Conventions (see ``docs/flops.md``):

* ``"full"``: every matmul FLOP of the forward, at 2 FLOPs per multiply-accumulate, over all tokens: vision
  encoder (patch embedding, every ViT layer), projector/merger, every LLM decoder layer (with GQA and SwiGLU) and
  the lm_head. It equals what ``torch.utils.flop_counter.FlopCounterMode`` counts (attention as a full n x n
  product even when causal; softmax, norms, activations, RoPE and embedding lookups are not counted).
* ``"3ndm"``: the paper convention of PDrop / SparseVLM / TransPrune / CATP, ``4nd^2 + 2n^2d + 3ndm`` per LLM
  layer with n = visual tokens only. These are multiply-accumulates although papers print them as FLOPs.
* ``"2ndm"``: FastV's ``4nd^2 + 2n^2d + 2ndm`` per layer, visual tokens only (MACs too).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

CONVENTIONS = ("full", "3ndm", "2ndm")
DEFAULT_N_TEXT = 64  # a typical LLaVA-1.5 prompt: ~35 system-prompt tokens + question + "ASSISTANT:"

# ---------------------------------------------------------------------------------------------------------------
# Architecture: the shapes that matter for FLOPs, read once from a transformers config.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMShape:
    """Decoder dimensions; ``q_dim``/``kv_dim`` are heads x head_dim (they differ under GQA)."""

    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    ffn: int
    vocab: int
    ffn_mats: int = 3  # 3 = SwiGLU (gate, up, down); 2 = plain two-matrix MLP


@dataclass(frozen=True)
class VisionShape:
    """Vision-transformer dimensions; ``windowed`` lists the layers that use window attention (Qwen2.5-VL)."""

    layers: int
    hidden: int
    ffn: int
    ffn_mats: int
    patch_inputs: int  # values per patch entering the patch embedding: channels x (temporal x) patch x patch
    windowed: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ProjectorShape:
    """Projector / patch merger: ``group`` ViT tokens become one LLM token through ``linears`` (in, out).

    ``copies`` > 1 when the same shape runs several times (Qwen3-VL's DeepStack mergers).
    """

    group: int
    linears: tuple[tuple[int, int], ...]
    copies: int = 1


@dataclass(frozen=True)
class Architecture:
    """What :func:`estimate` needs to know about a model: its family and the shapes of its three parts."""

    family: str
    llm: LLMShape
    vision: VisionShape | None = None
    projector: ProjectorShape | None = None


_LLAVA = ("llava", "llava_next")
_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = _LLAVA + _QWEN


def _llm_shape(tc: Any) -> LLMShape:
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    return LLMShape(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        ffn=tc.intermediate_size,
        vocab=tc.vocab_size,
    )


def describe(config: Any) -> Architecture:
    """Read the FLOP-relevant shapes of a transformers config (a VLM of a supported family, or a bare decoder).

    A bare decoder config (``llama``, ``qwen2``, ...) gives an architecture without vision part; its MLP is assumed
    to be SwiGLU, as in every LLM the supported families use.
    """
    if isinstance(config, Architecture):
        return config
    family = getattr(config, "model_type", None)
    if family in _LLAVA:
        vc = config.vision_config
        if vc.model_type != "clip_vision_model":
            raise NotImplementedError(f"FLOPs of a {family} model with a {vc.model_type} vision tower are not modelled")
        d = config.text_config.hidden_size
        layer = config.vision_feature_layer
        n_feat = 1 if isinstance(layer, int) else len(layer)
        vision = VisionShape(vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size, 2,
                             vc.num_channels * vc.patch_size**2)
        projector = ProjectorShape(1, ((vc.hidden_size * n_feat, d), (d, d)))
        return Architecture(family, _llm_shape(config.text_config), vision, projector)
    if family in _QWEN:
        vc = config.vision_config
        merge = vc.spatial_merge_size
        patch_inputs = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        copies, windowed = 1, frozenset()
        if family == "qwen2_vl":  # ViT width is embed_dim; hidden_size is the merger's output (the LLM width)
            width, ffn, mats, out = vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), 2, vc.hidden_size
        elif family == "qwen2_5_vl":  # SwiGLU MLP; window attention outside fullatt_block_indexes
            width, ffn, mats, out = vc.hidden_size, vc.intermediate_size, 3, vc.out_hidden_size
            windowed = frozenset(range(vc.depth)) - frozenset(vc.fullatt_block_indexes)
        else:  # qwen3_vl: the main merger plus one merger of the same shape per DeepStack layer
            width, ffn, mats, out = vc.hidden_size, vc.intermediate_size, 2, vc.out_hidden_size
            copies = 1 + len(vc.deepstack_visual_indexes)
        vision = VisionShape(vc.depth, width, ffn, mats, patch_inputs, windowed)
        merged = width * merge**2
        projector = ProjectorShape(merge**2, ((merged, merged), (merged, out)), copies)
        return Architecture(family, _llm_shape(config.text_config), vision, projector)
    if hasattr(config, "num_hidden_layers") and hasattr(config, "intermediate_size"):
        return Architecture(family or "llm", _llm_shape(config))
    raise NotImplementedError(
        f"no FLOPs model for model_type={family!r}; supported: {', '.join(FAMILIES)} and bare decoder configs"
    )


# ---------------------------------------------------------------------------------------------------------------
# What runs: per-image vision work and the per-layer LLM token schedule.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionWork:
    """Work of the vision encoder and projector for one image.

    ``layer_tokens[l]`` is the number of tokens of one ViT sequence entering ViT layer ``l`` (CLS included);
    ``sequences`` independent sequences run (LLaVA-NeXT tiles, Qwen frames); ``patches`` per sequence go through the
    patch embedding; ``projector_tokens`` ViT-level tokens (all sequences) enter the projector/merger;
    ``windows`` are the token counts of the attention windows of one sequence (Qwen2.5-VL, unpruned);
    ``llm_tokens`` is how many visual tokens the image gives the LLM when nothing is pruned; ``grid`` is the
    (t, h, w) patch grid of a Qwen image.
    """

    layer_tokens: tuple[int, ...]
    patches: int
    projector_tokens: int
    llm_tokens: int
    sequences: int = 1
    cls: int = 0
    windows: tuple[int, ...] = ()
    grid: tuple[int, int, int] | None = None

    def cut(self, vit_layer: int, kept: int) -> VisionWork:
        """The same image when only ``kept`` of its ``llm_tokens`` survive from ViT layer ``vit_layer`` on.

        Exact for LLaVA-1.5 and Qwen (one LLM token = 1 resp. 2x2 ViT tokens); for LLaVA-NeXT the kept fraction is
        spread evenly over the tiles, which is an approximation.
        """
        per_seq = round(self.patches * kept / self.llm_tokens)
        tokens = tuple(min(n, self.cls + per_seq) if i >= vit_layer else n for i, n in enumerate(self.layer_tokens))
        return replace(self, layer_tokens=tokens, projector_tokens=min(self.projector_tokens, per_seq * self.sequences))


@dataclass(frozen=True)
class TokenSchedule:
    """Token counts of one sample: ``visual[l]`` visual tokens enter LLM decoder layer ``l``.

    ``n_text`` counts every other prompt token (system prompt, question, special tokens); it is the same in every
    layer. ``images`` holds the vision-encoder work per image (empty: vision part not counted).
    """

    visual: tuple[int, ...]
    n_text: int = 0
    images: tuple[VisionWork, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def tokens(self) -> tuple[int, ...]:
        """All tokens entering each LLM layer."""
        return tuple(v + self.n_text for v in self.visual)

    def pruned(self, layer: int, visual: int) -> TokenSchedule:
        """Keep at most ``visual`` visual tokens from 0-indexed LLM layer ``layer`` on (0 = before the LLM)."""
        if not 0 <= layer < len(self.visual):
            raise ValueError(f"layer must be in [0, {len(self.visual)}), got {layer}")
        new = tuple(min(v, visual) if i >= layer else v for i, v in enumerate(self.visual))
        return replace(self, visual=new)

    @classmethod
    def unpruned(cls, config: Any, *, n_text: int = DEFAULT_N_TEXT, n_images: int = 1,
                 image_size: tuple[int, int] | None = None,
                 grid_thw: tuple[int, int, int] | None = None) -> TokenSchedule:
        """The schedule of the unpruned model for ``n_images`` identical images (see :func:`image_work`)."""
        config = _resolve(config)
        arch = describe(config)
        if arch.vision is None:
            raise ValueError("a bare decoder config has no images; build TokenSchedule(visual=...) directly")
        work = image_work(config, image_size=image_size, grid_thw=grid_thw)
        return cls((work.llm_tokens * n_images,) * arch.llm.layers, n_text, (work,) * n_images)


def _qwen_grid(vc: Any, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """Patch grid of an image: each side rounded to a multiple of patch x merge (Qwen's smart_resize, no clamp)."""
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = (max(factor, round(s / factor) * factor) // vc.patch_size for s in image_size)
    return 1, h, w


def _near_square(n: int) -> tuple[int, int]:
    """The factor pair (a, b), a <= b, a * b = n, closest to a square."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def _qwen25_windows(vc: Any, h: int, w: int) -> tuple[int, ...]:
    """Tokens per attention window of one frame, as transformers' ``get_vision_window_index`` partitions it."""
    merge = vc.spatial_merge_size
    side = vc.window_size // merge // vc.patch_size  # window side in merged units
    lh, lw = h // merge, w // merge
    rows = [min(side, lh - i) for i in range(0, lh, side)]
    cols = [min(side, lw - j) for j in range(0, lw, side)]
    return tuple(r * c * merge**2 for r in rows for c in cols)


def _llava_next_tiles(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(tiles through CLIP, visual tokens after unpadding + newlines) of one LLaVA-NeXT image of size (H, W)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    vc = config.vision_config
    tiles = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, vc.image_size)
    side = vc.image_size // vc.patch_size
    gh, gw = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, vc.image_size)
    # unpad_image only looks at shapes: a meta tensor gives the unpadded grid without allocating
    grid = unpad_image(torch.empty(1, gh * side, gw * side, device="meta"), list(image_size))
    rows, cols = grid.shape[1:]
    return tiles, side * side + rows * (cols + 1)


def image_work(config: Any, *, image_size: tuple[int, int] | None = None,
               grid_thw: tuple[int, int, int] | None = None, llm_tokens: int | None = None) -> VisionWork:
    """Vision work of one unpruned image.

    LLaVA-1.5 images are always ``vision_config.image_size`` square. LLaVA-NeXT needs the original ``image_size``
    (H, W) (default: twice the tile side, square: 5 tiles). Qwen takes ``grid_thw`` in patches, or ``image_size``
    rounded to a multiple of patch x merge; the default is a square of 24 x 24 LLM tokens. When only the LLM token
    count is known (``llm_tokens``, e.g. from a pruning record), Qwen2/Qwen3 are still exact and Qwen2.5-VL
    windows assume the closest-to-square grid.
    """
    config = _resolve(config)
    arch = describe(config)
    if arch.vision is None:
        raise ValueError(f"{arch.family} has no vision encoder")
    vc = config.vision_config
    layers = arch.vision.layers
    if arch.family == "llava":
        patches = (vc.image_size // vc.patch_size) ** 2
        proj = patches + (1 if config.vision_feature_select_strategy == "full" else 0)
        return VisionWork((patches + 1,) * layers, patches, proj, proj, cls=1)
    if arch.family == "llava_next":
        size = tuple(image_size) if image_size is not None else (2 * vc.image_size, 2 * vc.image_size)
        tiles, n_llm = _llava_next_tiles(config, size)
        patches = (vc.image_size // vc.patch_size) ** 2
        return VisionWork((patches + 1,) * layers, patches, tiles * patches, n_llm, sequences=tiles, cls=1)
    merge = vc.spatial_merge_size
    if grid_thw is not None:
        t, h, w = (int(x) for x in grid_thw)
    elif image_size is not None:
        t, h, w = _qwen_grid(vc, image_size)
    elif llm_tokens is not None:
        a, b = _near_square(llm_tokens)
        t, h, w = 1, a * merge, b * merge
    else:
        t, h, w = 1, 24 * merge, 24 * merge
    windows = _qwen25_windows(vc, h, w) if arch.vision.windowed else ()
    return VisionWork((h * w,) * layers, h * w, t * h * w, t * h * w // merge**2, sequences=t,
                      windows=windows, grid=(t, h, w))


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


def paper_layer_macs(llm: LLMShape, n: int, ffn_mats: int) -> int:
    """The papers' per-layer count ``4nd^2 + 2n^2d + ffn_mats*ndm`` (MACs; GQA ignored, as the papers do)."""
    d = llm.hidden
    return 4 * n * d * d + 2 * n * n * d + ffn_mats * n * d * llm.ffn


def vision_flops(vision: VisionShape, work: VisionWork) -> int:
    """Full-convention FLOPs of the vision encoder for one image: patch embedding plus every ViT layer."""
    d, s = vision.hidden, work.sequences
    total = 2 * s * work.patches * d * vision.patch_inputs
    full_windows = sum(w * w for w in work.windows)
    for layer, n in enumerate(work.layer_tokens):
        total += s * (8 * n * d * d + 2 * n * d * vision.ffn * vision.ffn_mats)
        if layer in vision.windowed and work.windows:
            # exact when unpruned; when tokens were dropped inside the ViT the windows shrink proportionally
            scale = n / sum(work.windows)
            total += s * round(4 * d * full_windows * scale * scale)
        else:
            total += s * 4 * n * n * d
    return total


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


def _resolve(config: Any) -> Any:
    """A shipped config name or a path becomes a transformers config; anything else is returned as is."""
    if isinstance(config, (str, os.PathLike)):
        from tokprune import configs

        return configs.load(config)
    return config


def estimate(config: Any, schedule: TokenSchedule | Sequence[TokenSchedule], convention: str = "full", *,
             decode_steps: int = 0, logits_to_keep: int = 0) -> FlopsReport:
    """FLOPs of one forward of ``config`` (a transformers config, a shipped config name or an
    :class:`Architecture`) over ``schedule`` (one per sample; a sequence of them is a batch and is summed).

    ``logits_to_keep`` follows transformers: 0 computes logits for every prompt token (plain ``forward``), 1 only
    for the last (``generate``'s prefill). ``decode_steps`` adds that many single-token decode steps.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    arch = describe(_resolve(config))
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
    layers = tuple(llm_layer_flops(llm, n) for n in tokens)
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


# ---------------------------------------------------------------------------------------------------------------
# Schedules from a budget (CLI) and from a pruning record (core).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodPlan:
    """Where a method without a registered pruner drops visual tokens: before LLM layer ``layer`` (0 = before
    the LLM), or a preset ``stages`` schedule of (layer, kept fraction of the original tokens)."""

    layer: int = 0
    stages: tuple[tuple[int, float], ...] = ()
    note: str = ""


_PRE = MethodPlan(0, note="pre-LLM: every LLM layer sees the kept tokens")
#: Fallback for methods the core registry does not (yet) know; a registered pruner always wins.
METHOD_PLANS: dict[str, MethodPlan] = {
    **{m: _PRE for m in ("cls", "fastervlm", "vtc_cls", "random", "visionzip", "hiprune", "divprune")},
    "flowcut": MethodPlan(0, note="counted as pre-LLM; its savings inside the ViT are not modelled here"),
    "fastv": MethodPlan(2, note="drops before LLM layer K (default 2)"),
    "dart": MethodPlan(2, note="drops before LLM layer K (default 2)"),
    "pdrop": MethodPlan(stages=((8, 0.5), (16, 0.25), (24, 0.125)),
                        note="PyramidDrop default: after layers 8/16/24 (1-indexed) keep 1/2, 1/4, 1/8"),
    "transprune": MethodPlan(stages=((7, 504 / 576), (9, 360 / 576), (12, 72 / 576)),
                             note="TransPrune-High: 576 -> 504 -> 360 -> 72 after layers 7/9/12 (1-indexed)"),
}


def _registered(method: str) -> Any:
    """The core's pruner class for ``method``, or None when the core or the method is absent."""
    try:
        from tokprune import registry
    except ImportError:
        return None
    try:
        return registry.get_method(method)
    except (ValueError, ImportError):
        return None


def _model_info(config: Any) -> Any:
    """The core's ``ModelInfo`` for a config, as the model adapters fill it in."""
    from tokprune.pruners.base import ModelInfo

    arch = describe(config)
    if arch.vision is None:
        raise ValueError("a bare decoder config has no visual tokens to prune")
    layers = arch.vision.layers
    llava = arch.family in _LLAVA
    if llava:
        from tokprune.patches.llava import feature_layer_index

        feature = feature_layer_index(config.vision_feature_layer, layers)
    else:
        feature = layers - 1
    return ModelInfo(family=arch.family, vision_layers=layers, feature_layer=feature, has_cls=llava,
                     llm_layers=arch.llm.layers, supports_compact=llava)


def plan_stages(method: str | None, config: Any, n_visual: int, keep: int,
                layer: int | None = None) -> tuple[list[tuple[int, int]], str]:
    """(LLM layer, visual tokens kept per image) stages of ``method`` at a per-image budget ``keep`` out of
    ``n_visual``, and a note saying where they come from.

    A method registered in the core is asked directly (its vision stage prunes before layer 0, its LLM stages
    before :meth:`llm_layers` with :meth:`stage_budget`); ``layer`` is passed as its ``layer`` option when it has
    one. Other methods use :data:`METHOD_PLANS`; ``layer`` then overrides the drop layer.
    """
    if method is None:
        return [(layer or 0, keep)], f"drops before LLM layer {layer or 0}"
    cls = _registered(method)
    if cls is not None:
        from tokprune.api import make_pruner

        info = _model_info(config)
        pruner = make_pruner(method, {})
        if layer is not None:
            # ``layer`` is the LLM drop layer: the pruner's own ``layer`` option only when it drops inside the LLM
            # (FastV's K); for a pre-LLM method it is a what-if override of where the kept tokens start
            if not pruner.llm_layers(info) or "layer" not in {f.name for f in dataclasses.fields(cls)}:
                return [(layer, keep)], f"{method}: drop layer overridden to {layer}"
            pruner = make_pruner(method, {"layer": layer})
        pruner.check(info)
        stages, where = [], []
        if pruner.vision_request(info) is not None:
            stages.append((0, keep))
            where.append("before the LLM")
        current = n_visual if not stages else keep
        for s, lay in enumerate(pruner.llm_layers(info)):
            current = min(current, pruner.stage_budget(s, n_visual, keep))
            stages.append((lay, current))
            where.append(f"before LLM layer {lay}")
        return stages, f"{method} (registry): drops " + ", ".join(where)
    if method not in METHOD_PLANS:
        known = sorted(set(METHOD_PLANS) | set(_registry_names()))
        raise ValueError(f"unknown method {method!r} for FLOPs; known: {', '.join(known)} "
                         "(or pass layer=/stages= explicitly)")
    plan = METHOD_PLANS[method]
    if plan.stages:
        return [(lay, round(frac * n_visual)) for lay, frac in plan.stages], f"{method}: {plan.note}"
    return [(plan.layer if layer is None else layer, keep)], f"{method}: {plan.note}"


def _registry_names() -> list[str]:
    try:
        from tokprune.api import methods
    except ImportError:
        return []
    return list(methods())


def _kept(n: int, keep: int | None, keep_ratio: float | None) -> int:
    from tokprune.config import Budget

    return Budget(keep=keep, keep_ratio=keep_ratio).count(n)


def for_budget(config: Any, method: str | None = None, *, keep: int | None = None, keep_ratio: float | None = None,
               layer: int | None = None, stages: Sequence[tuple[int, float | int]] | None = None,
               n_text: int = DEFAULT_N_TEXT, n_images: int = 1, image_size: tuple[int, int] | None = None,
               convention: str = "full", decode_steps: int = 0, logits_to_keep: int = 0) -> FlopsReport:
    """FLOPs of ``method`` at a budget, with the unpruned model attached as ``.baseline``.

    ``keep`` (count) or ``keep_ratio`` (kept fraction) is per image; where the tokens are dropped comes from
    :func:`plan_stages` (``layer`` overrides the method's drop layer). ``stages`` replaces all of it with explicit
    (layer, kept) pairs, a float kept being a fraction of the original tokens. Methods with a preset schedule in
    :data:`METHOD_PLANS` (pdrop, transprune) use it when no budget is given.
    """
    config = _resolve(config)
    base = TokenSchedule.unpruned(config, n_text=n_text, n_images=n_images, image_size=image_size)
    per_image = base.images[0].llm_tokens
    if stages is not None:
        if keep is not None or keep_ratio is not None:
            raise ValueError("pass either stages or keep/keep_ratio, not both")
        plan = [(int(lay), round(k * per_image) if isinstance(k, float) else int(k)) for lay, k in stages]
        note = "explicit stages " + ", ".join(f"{k} before layer {lay}" for lay, k in plan)
    elif keep is None and keep_ratio is None:
        preset = METHOD_PLANS.get(method or "")
        if preset is None or not preset.stages or _registered(method or "") is not None:
            raise ValueError(f"pass keep or keep_ratio for method {method!r}")
        plan, note = plan_stages(method, config, per_image, per_image)
    else:
        plan, note = plan_stages(method, config, per_image, _kept(per_image, keep, keep_ratio), layer)
    sched = base
    for lay, count in plan:
        sched = sched.pruned(lay, count * n_images)
    kw = dict(decode_steps=decode_steps, logits_to_keep=logits_to_keep)
    report = estimate(config, sched, convention, **kw)
    return replace(report, notes=(note, *report.notes), baseline=estimate(config, base, convention, **kw))


def from_record(config: Any, record: Any, n_text: int | Sequence[int] | None = None, *,
                image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
                image_grid_thw: Sequence[Sequence[tuple[int, int, int]]] | None = None) -> list[TokenSchedule]:
    """One :class:`TokenSchedule` per sample of a pruning record (``tokprune.record.PruneRecord``).

    Stages apply in order: kind ``"vision"`` shrinks every LLM layer (and, when ``stage.layer`` is a ViT layer,
    the ViT from that layer on); kind ``"llm"`` shrinks LLM layers ``stage.layer`` and later. New (merged) tokens
    take dropped slots of their image (``record.merged[b][i].slots``), which are part of the stage's kept indices,
    so a stage's kept count is its LLM token count. ``n_text`` defaults to
    ``record.seq_len[b]`` minus the sample's visual tokens. Per-image sizes (LLaVA-NeXT: (H, W); Qwen: grid t,h,w)
    come from the arguments or from ``record.image_sizes`` / ``record.image_grid_thw`` when present; without them
    LLaVA-NeXT's vision part is left out and Qwen2.5-VL windows assume a near-square grid (see ``notes``).
    """
    config = _resolve(config)
    arch = describe(config)
    image_sizes = image_sizes if image_sizes is not None else getattr(record, "image_sizes", None)
    image_grid_thw = image_grid_thw if image_grid_thw is not None else getattr(record, "image_grid_thw", None)
    out = []
    for b, n_vis in enumerate(record.n_visual):
        n_vis = [int(n) for n in n_vis]
        if n_text is None:
            text = int(record.seq_len[b]) - sum(n_vis)
        else:
            text = int(n_text) if isinstance(n_text, int) else int(n_text[b])
        visual = [sum(n_vis)] * arch.llm.layers
        works, notes = _record_images(config, arch, b, n_vis, image_sizes, image_grid_thw)
        for st in record.stages:
            counts = [int(k.numel()) for k in st.kept[b]]
            if st.kind == "vision":
                start = 0
                if st.layer is not None and works:
                    works = [w.cut(st.layer, c) for w, c in zip(works, counts)]
            elif st.kind == "llm":
                start = int(st.layer)
            else:
                raise ValueError(f"unknown stage kind {st.kind!r}")
            total = sum(counts)
            visual[start:] = [total] * (len(visual) - start)
        out.append(TokenSchedule(tuple(visual), text, tuple(works), tuple(notes)))
    return out


def geometry_from_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The per-sample image geometry :func:`from_record` needs, read from a forward's inputs: ``image_sizes``
    (LLaVA-NeXT) and ``image_grid_thw`` (Qwen), split by sample (images are assumed evenly spread over the batch)."""
    batch = len(inputs["input_ids"])
    out: dict[str, Any] = {}
    for key in ("image_sizes", "image_grid_thw"):
        value = inputs.get(key)
        if value is not None:
            rows = [tuple(int(v) for v in r) for r in (value.tolist() if hasattr(value, "tolist") else value)]
            per = len(rows) // batch
            out[key] = [rows[b * per:(b + 1) * per] for b in range(batch)]
    return out


def record_report(config: Any, record: Any, convention: str = "full", *, logits_to_keep: int = 0,
                  **geometry: Any) -> FlopsReport:
    """FLOPs of the prefill a pruning record describes (batch summed), with the same prompt unpruned as
    ``.baseline``: what ``tokprune.last_record(model).flops`` reports. ``geometry``: ``n_text``, ``image_sizes``,
    ``image_grid_thw`` as for :func:`from_record`."""
    unpruned = SimpleNamespace(n_visual=record.n_visual, seq_len=record.seq_len, stages=[], merged=None,
                               image_sizes=getattr(record, "image_sizes", None),
                               image_grid_thw=getattr(record, "image_grid_thw", None))
    kw = dict(logits_to_keep=logits_to_keep)
    report = estimate(config, from_record(config, record, **geometry), convention, **kw)
    return replace(report, baseline=estimate(config, from_record(config, unpruned, **geometry), convention, **kw))


def _record_images(config: Any, arch: Architecture, b: int, n_vis: list[int], image_sizes: Any,
                   grids: Any) -> tuple[list[VisionWork], list[str]]:
    """Unpruned vision work of sample ``b``'s images, from whatever size information is at hand."""
    if arch.vision is None:
        return [], []
    if arch.family == "llava":
        return [image_work(config) for _ in n_vis], []
    if arch.family == "llava_next":
        if image_sizes is None:
            return [], ["vision part not counted: LLaVA-NeXT image sizes unknown (pass image_sizes)"]
        return [image_work(config, image_size=tuple(int(x) for x in s)) for s in image_sizes[b]], []
    if grids is not None:
        return [image_work(config, grid_thw=tuple(int(x) for x in g)) for g in grids[b]], []
    notes = ["Qwen2.5-VL grid unknown: window attention assumes a near-square grid"] if arch.vision.windowed else []
    return [image_work(config, llm_tokens=n) for n in n_vis], notes


# ---------------------------------------------------------------------------------------------------------------
# Measuring with torch, for cross-checks.
# ---------------------------------------------------------------------------------------------------------------

_CPU_SDPA_REGISTERED = False


def register_cpu_sdpa_formula() -> None:
    """Teach FlopCounterMode the CPU SDPA kernel (torch leaves it uncounted); safe to call repeatedly."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            b, h, sq, d = query_shape
            sk, dv = key_shape[-2], value_shape[-1]
            return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv

    _CPU_SDPA_REGISTERED = True


def counted_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Total FLOPs torch's FlopCounterMode counts while ``fn(*args, **kwargs)`` runs (CPU SDPA included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
