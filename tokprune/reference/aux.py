"""Auxiliary training objectives that make the vision side of a reference model meaningful, as in CLIP.

A question answered from one token gives a weak signal, and a ViT trained only through it never learns (measured:
a LLaVA trained on the QA loss alone stayed at chance). Two dense objectives fix that:

* **scene** (from the [CLS] token for LLaVA, the mean visual token for Qwen2-VL, which has no [CLS]): predict the
  scene's attributes: how many of each shape (0-4), which (shape, colour) pairs are present, which digit is shown
  (or none). To summarise the scene, [CLS] must attend to the objects, which is what [CLS]-attention pruning relies
  on (FasterVLM, VTC-CLS).
* **token** (each visual token the LLM receives): predict what covers its cell: background, one of 12
  (shape, colour) pairs, or one of 10 digits; and the cell's row and column. Without the latter the tokens lose
  their position (measured: a linear probe could not read a token's column, MAE 2 of 8 columns) and "left or
  right" questions stay at chance, whereas real CLIP features keep where they are. Qwen2-VL's ViT has no
  absolute position embedding, only 2D RoPE, yet it learns this too (from where the image borders are), and only
  then did its LLM answer "left or right": with M-RoPE alone that question stayed at chance.

The heads are training-only; the shipped models are plain ``transformers`` classes without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokprune.data.shapes import COLORS, SHAPES, Sample

MAX_COUNT = 4
N_PAIRS = len(SHAPES) * len(COLORS)
N_TOKEN_CLASSES = 1 + N_PAIRS + 10  # background, (shape, colour) pairs, digits
N_DIGIT_CLASSES = 11  # 0-9 or none


def token_class(kind: str, color: str, value: int | None) -> int:
    if kind == "digit":
        return 1 + N_PAIRS + int(value)
    return 1 + SHAPES.index(kind) * len(COLORS) + list(COLORS).index(color)


def token_targets(samples: Sequence[Sample], grid: int) -> torch.Tensor:
    """(B, grid * grid) class of what owns each cell, row-major (the LLM token order of both families)."""
    out = np.zeros((len(samples), grid * grid), dtype=np.int64)
    for i, s in enumerate(samples):
        owners = s.scene.owners(grid).reshape(-1)
        classes = [0] + [token_class(o.kind, o.color, o.value) for o in s.scene.objects]
        out[i] = np.asarray(classes)[owners]
    return torch.from_numpy(out)


def scene_targets(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """``counts`` (B, 3) shapes per kind, capped at 4; ``pairs`` (B, 12) presence; ``digit`` (B,) 0-9 or 10."""
    counts = torch.tensor([[min(len(s.scene.shapes(k)), MAX_COUNT) for k in SHAPES] for s in samples])
    pairs = torch.tensor([[float(bool(s.scene.shapes(k, c))) for k in SHAPES for c in COLORS] for s in samples])
    digit = torch.tensor([s.scene.digit.value if s.scene.digit else 10 for s in samples])
    return {"counts": counts, "pairs": pairs, "digit": digit}


class AuxHeads(nn.Module):
    """Linear read-outs for the two objectives (linear, so the features themselves must carry the information)."""

    def __init__(self, scene_dim: int, token_dim: int, grid: int, where: float = 0.5) -> None:
        super().__init__()
        self.scene = nn.Linear(scene_dim, len(SHAPES) * (MAX_COUNT + 1) + N_PAIRS + N_DIGIT_CLASSES)
        self.token = nn.Linear(token_dim, N_TOKEN_CLASSES)
        self.where = nn.Linear(token_dim, 2 * grid)
        self.grid, self.where_weight = grid, where

    def scene_loss(self, pooled: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Loss and accuracy (mean over count, pair and digit predictions) of the scene head on (B, D) inputs."""
        z = self.scene(pooled)
        n_c = len(SHAPES) * (MAX_COUNT + 1)
        counts = z[:, :n_c].view(-1, len(SHAPES), MAX_COUNT + 1)
        pairs, digit = z[:, n_c:n_c + N_PAIRS], z[:, n_c + N_PAIRS:]
        loss = (F.cross_entropy(counts.flatten(0, 1), t["counts"].flatten())
                + F.binary_cross_entropy_with_logits(pairs, t["pairs"]) * 4
                + F.cross_entropy(digit, t["digit"]))
        with torch.no_grad():
            acc = ((counts.argmax(-1) == t["counts"]).float().mean() + ((pairs > 0) == t["pairs"].bool()).float().mean()
                   + (digit.argmax(-1) == t["digit"]).float().mean()) / 3
        return loss, float(acc)

    def token_loss(self, tokens: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Loss of the token heads on (B, N, D) visual tokens (row-major cells), and the class accuracy on object
        cells."""
        g = self.grid
        where = self.where(tokens).view(-1, 2, g)
        cells = torch.arange(g * g, device=tokens.device).repeat(tokens.shape[0])
        loss_where = F.cross_entropy(where[:, 0], cells // g) + F.cross_entropy(where[:, 1], cells % g)
        z = self.token(tokens).flatten(0, 1)
        t = t.flatten().to(z.device)
        obj = t > 0
        # object cells are a small minority: average their loss separately so background does not dominate
        each = F.cross_entropy(z, t, reduction="none")
        loss = (each[obj].mean() if obj.any() else 0.0) + 0.25 * each[~obj].mean() + self.where_weight * loss_where
        with torch.no_grad():
            acc = (z.argmax(-1)[obj] == t[obj]).float().mean() if obj.any() else torch.tensor(1.0)
        return loss, float(acc)


class Capture:
    """Forward hooks that keep the tensors the auxiliary heads read: the scene vector (B, D) and the visual
    tokens (B, N, D) as the LLM receives them."""

    def __init__(self, model: nn.Module, family: str) -> None:
        self.family = family
        self.scene: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        base = model.model
        if family == "llava":
            self._handles = [
                base.vision_tower.register_forward_hook(self._clip),
                base.multi_modal_projector.register_forward_hook(self._projector),
            ]
        else:
            self._handles = [base.visual.register_forward_hook(self._qwen, with_kwargs=True)]

    def _clip(self, module: nn.Module, args: tuple, out: object) -> None:
        self.scene = out.pooler_output  # post-layernorm [CLS] of the last layer, read before LLaVA replaces it

    def _projector(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.tokens = out

    def _qwen(self, module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        merged = out.pooler_output  # (B * N, D): merged tokens of all images (same size here), raster order
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        tokens = merged.view(grid.shape[0], -1, merged.shape[-1])
        self.tokens = tokens
        self.scene = tokens.mean(1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
