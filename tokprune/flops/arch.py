"""Architecture shapes for FLOPs, read once from a transformers config, and the per-image work they imply
(vision encoder sequences, tiles, windows, grids) plus the per-layer LLM token schedule of one sample."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

DEFAULT_N_TEXT = 64  # a typical LLaVA-1.5 prompt: ~35 system-prompt tokens + question + "ASSISTANT:"


def config_of(config: Any) -> Any:
    """A transformers config, as given; a name or a path is refused (``tokprune.flops`` loads nothing itself)."""
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        raise TypeError(f"pass a transformers config, not {config!r}: tokprune.configs.load({config!r}) reads a "
                        "shipped name or a local path")
    return config


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


_LLAVA = ("llava", "llava_next", "llava_onevision")
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
        if vc.model_type not in ("clip_vision_model", "siglip_vision_model"):  # both: fc1 / fc2 MLP
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
    (t, h, w) patch grid of a Qwen image; ``newlines`` the LLaVA-NeXT row newlines among ``llm_tokens``.
    ``reads``: the ViT layers whose *received attention* a method read (HiPrune, VisionZip / VisPruner without
    [CLS], VFlowOpt): SDPA / FlashAttention do not return attention probabilities, so the method's tap recomputes
    that layer's q k^T over all query rows, which :func:`~tokprune.flops.count.read_flops` counts.
    """

    layer_tokens: tuple[int, ...]
    patches: int
    projector_tokens: int
    llm_tokens: int
    sequences: int = 1
    cls: int = 0
    windows: tuple[int, ...] = ()
    grid: tuple[int, int, int] | None = None
    newlines: int = 0
    reads: tuple[int, ...] = ()

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
    layer. ``images`` holds the vision-encoder work per image (empty: vision part not counted). ``probes``: the
    extra work of methods that score a cut with the next layer's q/k (PyramidDrop, TransPrune), one
    ``(layer, tokens, query_rows)`` per probe of layer ``layer`` on ``tokens`` tokens (counted in that layer).
    """

    visual: tuple[int, ...]
    n_text: int = 0
    images: tuple[VisionWork, ...] = ()
    notes: tuple[str, ...] = ()
    probes: tuple[tuple[int, int, int], ...] = ()

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
        config = config_of(config)
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


def _anyres_grid(config: Any, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(tiles through the encoder, rows, cols of the stitched and unpadded crop grid) of one anyres image of size
    (H, W) (LLaVA-NeXT, LLaVA-OneVision)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    vc = config.vision_config
    size, pinpoints = list(image_size), config.image_grid_pinpoints  # HF's helpers, called by keyword
    tiles = image_size_to_num_patches(image_size=size, grid_pinpoints=pinpoints, patch_size=vc.image_size)
    side = vc.image_size // vc.patch_size
    gh, gw = get_anyres_image_grid_shape(image_size=size, grid_pinpoints=pinpoints, patch_size=vc.image_size)
    # unpad_image only looks at shapes: a meta tensor gives the unpadded grid without allocating
    grid = unpad_image(tensor=torch.empty(1, gh * side, gw * side, device="meta"), original_size=size)
    rows, cols = grid.shape[1:]
    return tiles, rows, cols


def _llava_next_tiles(config: Any, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(tiles through CLIP, visual tokens after unpadding + newlines, newlines) of one LLaVA-NeXT image of size
    (H, W)."""
    tiles, rows, cols = _anyres_grid(config, image_size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    return tiles, side * side + rows * (cols + 1), rows


def _onevision_tiles(config: Any, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(tiles through SigLIP, visual tokens, newlines) of one LLaVA-OneVision image of size (H, W) alone in its
    sample: LLaVA-NeXT's unpadded grid, shrunk as ``anyres_max_<n>`` does when it exceeds n tiles (x 1.1^2)."""
    tiles, rows, cols = _anyres_grid(config, image_size)
    side = config.vision_config.image_size // config.vision_config.patch_size
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return tiles, side * side + rows * (cols + 1), rows


def image_work(config: Any, *, image_size: tuple[int, int] | None = None,
               grid_thw: tuple[int, int, int] | None = None, llm_tokens: int | None = None) -> VisionWork:
    """Vision work of one unpruned image.

    LLaVA-1.5 images are always ``vision_config.image_size`` square. LLaVA-NeXT needs the original ``image_size``
    (H, W) (default: twice the tile side, square: 5 tiles). Qwen takes ``grid_thw`` in patches, or ``image_size``
    rounded to a multiple of patch x merge; the default is a square of 24 x 24 LLM tokens. When only the LLM token
    count is known (``llm_tokens``, e.g. from a pruning record), Qwen2/Qwen3 are still exact and Qwen2.5-VL
    windows assume the closest-to-square grid.
    """
    config = config_of(config)
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
        tiles, n_llm, newlines = _llava_next_tiles(config, size)
        patches = (vc.image_size // vc.patch_size) ** 2
        return VisionWork((patches + 1,) * layers, patches, tiles * patches, n_llm, sequences=tiles, cls=1,
                          newlines=newlines)
    if arch.family == "llava_onevision":  # SigLIP: no [CLS] token
        size = tuple(image_size) if image_size is not None else (2 * vc.image_size, 2 * vc.image_size)
        tiles, n_llm, newlines = _onevision_tiles(config, size)
        patches = (vc.image_size // vc.patch_size) ** 2
        return VisionWork((patches,) * layers, patches, tiles * patches, n_llm, sequences=tiles, newlines=newlines)
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


