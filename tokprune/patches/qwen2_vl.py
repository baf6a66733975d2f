"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): ViT without [CLS], 2x2 patch merger, M-RoPE language model.

What differs from LLaVA, and how this adapter handles it:

* **Granularity.** One LLM token is one 2x2 merge unit of ViT patches; ``pooler_output`` (one tensor per image)
  is what gets pruned, so a kept index is a merged token. Vision signals computed per patch must be aggregated per
  merge unit (mean over the ``spatial_merge_size**2`` consecutive patches) before they are aligned with tokens.
* **Positions.** M-RoPE gives image tokens 3-D (t, h, w) positions and text after an image restarts at
  ``max + 1``. Re-indexing kept tokens contiguously is undefined (``supports_compact=False``): survivors keep
  their original positions. Without explicit ``position_ids`` the defaults come from the model's own
  ``get_rope_index`` with a text row prepended, i.e. the (4, B, N) tensor ``generate()`` builds.
  After a pre-LLM prune the text row (used only for masks and packed-sequence detection) is renumbered
  contiguously, so a gap can never be mistaken for a packed-sequence boundary, and ``model.rope_deltas`` is set
  to ``last original position + 1 - kept length`` so a hand-written decode loop without ``position_ids``
  continues at the right positions (``generate()`` always passes them).
* **Per-token kwargs.** ``mm_token_type_ids`` is rewritten with the sequence (padding value 0 = text).
* **Vision signals.** The ViT packs all images of a call into one sequence and attends per image (per window on
  Qwen2.5-VL's windowed blocks): under SDPA / eager the attention function is called once per image or window,
  under FlashAttention once with ``cu_seq_lens`` (split per sequence by the tap). :meth:`Qwen2VLAdapter.to_tokens`
  joins the calls in order, averages each merge unit, undoes any window permutation and splits per image.
  Grid coordinates of a token are its merged (row, col) and frame ``t`` (the part).
* **No [CLS].** ``cls`` and ``vtc_cls`` raise :class:`~tokprune.UnsupportedError`; ``fastv`` and ``random`` work.
* **Video** inputs are not supported and raise (they are never silently left unpruned).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokprune.encoder_taps import merge_units
from tokprune.patches.base import Adapter
from tokprune.patches.prefill import PrefillState
from tokprune.patches.threads import PerThread
from tokprune.pruners.base import ModelInfo
from tokprune.registry import register_model


def text_positions(mask2d: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """The 1-D text position row (B, N) ``generate`` builds: ``cumsum(mask) - 1``, 0 on padding."""
    if mask2d is None:
        return torch.arange(n, device=device).expand(b, n)
    real = mask2d.bool()
    return (real.long().cumsum(1) - 1).masked_fill(~real, 0)


@register_model("qwen2_vl")
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL; the Qwen2.5-VL and Qwen3-VL adapters subclass it and state only their differences."""

    model_classes = ("Qwen2VLForConditionalGeneration",)
    pixel_keys = ("pixel_values", "image_grid_thw")
    token_keys = {"labels": -100, "mm_token_type_ids": 0}
    #: the ``grid_thw`` of this thread's last vision-tower call (two threads encoding at once keep their own)
    _vit_grid = PerThread()

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.visual

    def model_info(self) -> ModelInfo:
        blocks = len(self.vision_tower.blocks)
        return ModelInfo(
            family=self.family,
            vision_layers=blocks,
            feature_layer=blocks - 1,  # the merger reads the last block
            has_cls=False,
            llm_layers=len(self.language_model.layers),
            supports_compact=False,
        )

    def vision_layer(self, layer: int) -> tuple[nn.Module, nn.Module]:
        block = self.vision_tower.blocks[layer]
        return block, block.attn

    def cut_layout(self) -> str:
        return "packed"

    def cut_heads(self) -> tuple[nn.Module | None, list[nn.Module]]:
        """The merger runs after the last block (a cut there shortens its input); it and Qwen3-VL's DeepStack
        mergers write their merged tokens back into the full layout."""
        vt = self.vision_tower
        return vt.merger, [vt.merger, *getattr(vt, "deepstack_merger_list", [])]

    def install(self) -> None:
        super().install()
        if self.vision is not None:
            self._handles.append(self.vision_tower.register_forward_pre_hook(self._note_grid, with_kwargs=True))

    def _note_grid(self, module: nn.Module, args: tuple, kw: dict) -> None:
        self._vit_grid = kw.get("grid_thw", args[1] if len(args) > 1 else None)

    def to_tokens(self, calls: list[torch.Tensor], features: list[torch.Tensor],
                  reduce: str = "mean") -> list[torch.Tensor]:
        grid = getattr(self, "_vit_grid", None)
        if grid is None:
            raise RuntimeError("the Qwen ViT ran without tokprune's hooks; pass pixel_values and image_grid_thw")
        per_patch = torch.cat([c.flatten(0, 1) for c in calls])  # every call is one image or window, in ViT order
        if reduce == "concat":  # the unit's patches side by side along the last axis (pixels: read in raster order)
            u = self.merge_unit
            units = per_patch.unflatten(0, (-1, u)).movedim(1, -2).flatten(-2)
        else:
            units = self.to_token_order(merge_units(per_patch, self.merge_unit, dim=0), grid)
        # sync: once per prefill, tokens per image (the model reads image_grid_thw on the host too)
        counts = (grid.prod(-1) // self.merge_unit).tolist()
        if len(counts) != len(features) or [int(f.shape[0]) for f in features] != counts:
            raise RuntimeError(
                f"{len(counts)} images went through the ViT but {len(features)} reached the LLM with other token "
                "counts (image features computed outside this call or generate(); pass pixel_values and "
                "image_grid_thw so the ViT runs under the patch)"
            )
        return [u.to(f.device) for u, f in zip(torch.split(units, counts), features)]

    def pixel_patches(self, pixels: torch.Tensor, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> torch.Tensor:
        """The ViT input (patches, C * T * p * p), block-major (4 consecutive patches per merge unit) and in raster
        order, -> (1, patches, C, T * p * p) un-normalised."""
        c = len(mean)
        x = pixels.reshape(1, pixels.shape[0], c, -1)
        return x * torch.tensor(std, device=x.device).view(1, 1, c, 1) + torch.tensor(mean, device=x.device).view(
            1, 1, c, 1)

    def token_layout(self, features: list[torch.Tensor], kw: dict) -> tuple[list[torch.Tensor] | None,
                                                                            list[torch.Tensor]]:
        special = [torch.zeros(f.shape[0], dtype=torch.bool, device=f.device) for f in features]
        grid_thw = kw.get("image_grid_thw")
        m = self.vision_tower.spatial_merge_size
        if grid_thw is None:  # generate() pre-encodes the images and passes no grid: the ViT's last call saw it
            grid_thw = getattr(self, "_vit_grid", None)
            if grid_thw is not None and [int(f.shape[0]) for f in features] != (grid_thw.prod(-1) // m**2).tolist():
                grid_thw = None
        if grid_thw is None or len(grid_thw) != len(features):
            return None, special
        grids = []
        # sync: once per prefill, the patch grids (the model's own forward reads image_grid_thw to the host too)
        for (t, h, w), f in zip(grid_thw.tolist(), features):
            i = torch.arange(t * (h // m) * (w // m), device=f.device)
            wm, hm = w // m, h // m
            grids.append(torch.stack([(i // wm) % hm, i % wm, i // (hm * wm)], 1))
        return grids, special

    @property
    def merge_unit(self) -> int:
        """ViT patches per LLM token (4 for the 2x2 merger)."""
        return self.vision_tower.spatial_merge_size ** 2

    def to_token_order(self, units: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-merge-unit values (U, ...) read inside the ViT, in LLM token order. Qwen2-VL's blocks run in raster
        order already; Qwen2.5-VL overrides this to undo its window permutation."""
        return units

    # ------------------------------------------------------------------ positions
    def default_positions(self, input_ids: torch.Tensor, mask2d: torch.Tensor | None, kw: dict) -> torch.Tensor:
        """(4, B, N) = [text row; t; h; w] exactly as the unpatched model computes them at prefill."""
        b, n = input_ids.shape
        text = text_positions(mask2d, b, n, input_ids.device)
        grid, types = kw.get("image_grid_thw"), kw.get("mm_token_type_ids")
        if grid is None:
            # encoder outputs passed without their grid: the model itself falls back to 1-D positions
            return torch.arange(n, device=input_ids.device).expand(4, b, n)
        if types is None:
            raise ValueError(
                "Qwen M-RoPE needs mm_token_type_ids next to image_grid_thw (the processor returns them with "
                "input_ids); pass them, or pass position_ids"
            )
        mrope, deltas = self.base.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                 attention_mask=mask2d)
        self._keep_deltas(deltas)
        return torch.cat([text[None], mrope.to(text.dtype)], 0)

    def after_rewrite(self, new: dict, pos: torch.Tensor) -> dict:
        """The text position row renumbered contiguously (no gap read as a packed-sequence boundary) and
        ``rope_deltas`` set so a decode loop without ``position_ids`` continues at the right positions."""
        mask = new["attention_mask"]
        b, n = new["input_ids"].shape
        p = new["position_ids"]
        if p.dim() == 3 and p.shape[0] == 4:
            p = torch.cat([text_positions(mask, b, n, p.device)[None].to(p.dtype), p[1:]], 0)
            new["position_ids"] = p
        spatial = pos[-3:] if pos.dim() == 3 else pos[None].expand(3, *pos.shape[-2:])
        n_real = mask.sum(1) if mask is not None else torch.full((b,), n, device=p.device)
        self._keep_deltas((spatial.amax(dim=(0, 2)) + 1 - n_real.to(spatial.device)).view(b, 1))
        return new

    def _keep_deltas(self, deltas: torch.Tensor) -> None:
        """``rope_deltas`` of this prefill: in its state (what its decode steps use, see :meth:`decode_inputs`) and on
        the model (what the unpatched forward stores, read by ``generate()`` continuing from a cache)."""
        self.base.rope_deltas = deltas
        state = self.current_state()
        if state is not None:
            state.family["rope_deltas"] = deltas

    def decode_inputs(self, kw: dict, past: int, state: PrefillState) -> dict:
        """A decode step without ``position_ids``: the M-RoPE positions built from *this prefill's* ``rope_deltas``
        (not the model attribute, which the last prefill of any request or thread overwrote), as the unpatched model
        does: ``arange(past, past + q) + rope_deltas``, or with a 2D mask ``cumsum(mask) - 1`` at the step's columns
        (the mask of the pruned prompt, see :func:`~tokprune.patches.prefill.decode_kwargs`) + ``rope_deltas``."""
        deltas = state.family.get("rope_deltas")
        if deltas is None or kw.get("position_ids") is not None:
            return kw
        x = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        b, q = x.shape[:2]
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
        else:
            pos = torch.arange(past, past + q, device=x.device).expand(b, q)
        deltas = deltas.repeat_interleave(b // deltas.shape[0], dim=0).to(pos.device)
        return {**kw, "position_ids": (pos + deltas)[None].expand(3, b, q)}

    # ------------------------------------------------------------------ inputs tokprune cannot prune yet
    def visual_modalities(self, kw: dict) -> set[str]:
        """Images, and video (refused by the orchestrator until video pruning lands)."""
        mm = kw.get("mm_encoder_outputs") or {}
        video = kw.get("pixel_values_videos") is not None or mm.get("video") is not None
        return super().visual_modalities(kw) | ({"video"} if video else set())

    def encode_images(self, kw: dict) -> Any:
        if kw.get("image_grid_thw") is None:
            raise ValueError("Qwen image features need image_grid_thw next to pixel_values (the processor returns it)")
        return super().encode_images(kw)
