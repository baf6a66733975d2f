"""Re-sizing each visual item's placeholder run in a prompt, for a family that lays an item out with a different
number of tokens than the processor wrote for it.

LLaVA-NeXT's ``tile_budget="per_tile_reference"`` packs an image as its references do (every tile's full patch
grid, no unpadding, no newline token), while HF's processor wrote one placeholder per token of HF's unpadded layout
with newlines. Before the vision stage the prompt is rewritten so that each image's run holds one placeholder per
token of the family's layout; the stage then drops the runs' pruned tokens as for any family. Text keeps its order
and attention-mask values; positions continue across a run that grew or shrank (a run's placeholders are numbered
consecutively from its first one's position); rows are left-padded to one width again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Resized:
    """The prompt with resized runs, and per row how many tokens it gained (negative: lost)."""

    ids: torch.Tensor  # (B, N')
    mask2d: torch.Tensor  # (B, N')
    positions: torch.Tensor  # (B, N') or (C, B, N') for multi-axis positions
    added: torch.Tensor  # (B,) long


def resize_runs(ids: torch.Tensor, mask2d: torch.Tensor | None, positions: torch.Tensor,
                spans: list[list[torch.Tensor]], counts: list[int], pad_id: int) -> Resized:
    """Each visual item's placeholder run (``spans``: per row, per item, its token positions, contiguous) resized to
    ``counts`` tokens (row-major over the items). ``positions``: (B, N) position ids (or (C, B, N)); the new
    placeholders of a run continue from its first position. Left padding (``pad_id``, mask 0, position 0) evens
    the rows out."""
    b, n = ids.shape
    mask = mask2d if mask2d is not None else torch.ones_like(ids)
    pos = positions if positions.dim() == 3 else positions[None]
    dev = ids.device
    srcs, offs = [], []
    j = 0
    for bi in range(b):
        src, off, cursor, shift = [], [], 0, 0
        for run in spans[bi]:
            start, old, new = int(run[0]), int(run.numel()), counts[j]  # sync: per item, where its run starts
            j += 1
            src += [torch.arange(cursor, start, device=dev), torch.full((new,), start, device=dev)]
            off += [torch.full((start - cursor,), shift, device=dev), shift + torch.arange(new, device=dev)]
            cursor, shift = start + old, shift + new - old
        src.append(torch.arange(cursor, n, device=dev))
        off.append(torch.full((n - cursor,), shift, device=dev))
        srcs.append(torch.cat(src).long())
        offs.append(torch.cat(off).long())
    width = max(int(s.numel()) for s in srcs)
    out_ids = ids.new_full((b, width), pad_id)
    out_mask = mask.new_zeros((b, width))
    out_pos = pos.new_zeros((pos.shape[0], b, width))
    for bi, (src, off) in enumerate(zip(srcs, offs)):
        lo = width - int(src.numel())
        out_ids[bi, lo:] = ids[bi, src]
        out_mask[bi, lo:] = mask[bi, src]
        out_pos[:, bi, lo:] = pos[:, bi, src] + off
    added = torch.tensor([int(s.numel()) - n for s in srcs], dtype=torch.long, device=dev)
    return Resized(out_ids, out_mask, out_pos if positions.dim() == 3 else out_pos[0], added)
