"""Sequence surgery shared by every adapter: locating image spans, dropping tokens, re-padding, masks."""

from __future__ import annotations

import torch

from tokprune.kernels import gather_tokens


def image_spans(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> list[list[torch.Tensor]]:
    """Positions of each image's placeholder tokens, per row, found from token ids (never fixed offsets).

    Images are matched to placeholders in row-major order, ``counts[j]`` tokens for image ``j`` (this is how the
    models scatter features), so adjacent images in one row are split correctly.
    """
    is_img = input_ids == image_token_id
    per_row = is_img.sum(1).tolist()  # sync: once per prefill, image tokens per row (spans are host lists)
    if sum(counts) != sum(per_row):
        raise ValueError(
            f"the prompt has {sum(per_row)} image tokens but the images give {sum(counts)} visual tokens; "
            "build the prompt with the model's processor"
        )
    # the count is known on the host now, so the positions need no second sync (row-major, as nonzero)
    cols = torch.nonzero_static(is_img, size=sum(per_row))[:, 1]
    spans: list[list[torch.Tensor]] = []
    pieces = iter(torch.split(cols, counts))
    consumed = 0
    for n_row in per_row:
        row: list[torch.Tensor] = []
        taken = 0
        while taken < n_row:
            piece = next(pieces)
            row.append(piece)
            taken += piece.numel()
        if taken != n_row:
            raise ValueError("an image's placeholder tokens span two rows; build the prompt with the processor")
        consumed += len(row)
        spans.append(row)
    return spans


def left_repad(keep: torch.Tensor, width: int | None = None,
               right: torch.Tensor | bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that move each row's kept tokens to the right end of a (B, L) block, L = most kept.

    Returns ``idx`` (B, L) and ``valid`` (B, L); invalid slots are left padding (they point at index 0).
    ``width``: L when the caller knows it on the host (no sync at all then); otherwise it is read from ``keep``.
    ``right`` (a bool or a 0-dim bool tensor, so no host read): put the new padding at the right end instead.
    """
    lens = keep.sum(1)
    if width is None:
        width = int(lens.max())  # sync: once per pruning stage, the new sequence length (an output shape)
    shift = torch.where(torch.as_tensor(right, device=keep.device), 0, width - lens)
    slot = keep.long().cumsum(1) - 1 + shift[:, None]
    return _scatter_slots(keep, slot, width)


def padded_right(mask2d: torch.Tensor | None) -> torch.Tensor | bool:
    """Whether a batch is right-padded (every row starts with a real token, some row ends with padding), as a
    0-dim bool tensor (no host read); False without a mask. Re-packed rows keep the batch's padding side."""
    if mask2d is None:
        return False
    real = mask2d.bool()
    return real[:, 0].all() & ~real[:, -1].all()


def first_of(spare: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the first ``n[b]`` True entries of each row of ``spare`` (all of them where it has fewer)."""
    return spare & (spare.long().cumsum(1) <= n[:, None])


def repack(keep: torch.Tensor, pad: torch.Tensor, right: torch.Tensor | bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-pack a batch after a cut: ``keep`` (B, N) the real tokens that stay, ``pad`` (B, N) the padding slots.

    The width becomes the longest row's kept count (padding the cut freed is dropped with the cut tokens). A
    shorter row is filled with its own padding slots first (so a row the cut left whole keeps its padding, bit for
    bit), then with new padding slots on the batch's padding side (``right``, see :func:`padded_right`). Returns
    :func:`left_repad`'s ``(idx, valid)``.
    """
    lens = keep.sum(1)
    width = int(lens.max())  # sync: once per pruning stage, the new sequence length (an output shape)
    return left_repad(keep | first_of(pad, width - lens), width, right)


def repack_slots(keep: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Re-pack a batch at an LLM stage, where slots cannot be invented (the hidden states exist only for tokens):
    ``keep`` (B, n) the current slots that survive (padding included), ``pad`` (B, n) the padding slots.

    The width becomes the longest row's surviving real tokens. A shorter row is filled with its own padding slots
    first (left as they are, masked by the prompt's mask), then with *dead* slots: dropped tokens kept in the tensor
    and masked as keys. Returns the sorted ``slots`` (B, width) into the current sequence, ``dead`` (B, n) over the
    current slots, and whether any row has a dead slot.
    """
    real = keep & ~pad
    counts = real.sum(1)
    fill = counts.max() - counts
    pads = first_of(pad, fill)
    dead = first_of(~keep, fill - pads.sum(1))
    # sync: once per LLM stage, the new sequence length (an output shape) and whether a row has dead slots
    width, any_dead = torch.stack([counts.max(), dead.any().long()]).tolist()
    return kept_slots(real | pads | dead, width), dead, bool(any_dead)


def kept_slots(keep: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) positions of the True entries of each row of ``keep`` (B, N), ascending; every row must hold
    exactly ``width`` of them. ``keep.nonzero()[:, 1].view(B, width)`` without the host sync."""
    slot = keep.long().cumsum(1) - 1
    return _scatter_slots(keep, slot, width)[0]


def _scatter_slots(keep: torch.Tensor, slot: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each kept column index into its ``slot`` of a (B, width) block (no nonzero, so no host sync).
    Entries not kept go to a spare column ``width`` that is cut off; kept entries have distinct slots."""
    b, n = keep.shape
    slot = slot.masked_fill(~keep, width)
    cols = torch.arange(n, device=keep.device).expand(b, n)
    idx = torch.zeros(b, width + 1, dtype=torch.long, device=keep.device).scatter_(1, slot, cols)
    valid = torch.zeros(b, width + 1, dtype=torch.bool, device=keep.device).scatter_(1, slot, keep)
    return idx[:, :width], valid[:, :width]


def take(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None = None, fill: float | int = 0) -> torch.Tensor:
    """Gather the last (sequence) dimension of ``x`` (…, B|1, N) with ``idx`` (B, L); fill invalid slots."""
    lead = x.shape[:-2]
    x = x.expand(*lead, idx.shape[0], x.shape[-1])
    out = torch.gather(x, -1, idx.expand(*lead, *idx.shape))
    if valid is not None:
        out = out.masked_fill(~valid.expand_as(out), fill)
    return out


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of ``x`` (B|1, N, D) with ``idx`` (B, L) -> (B, L, D), through the shared gather kernel."""
    return gather_tokens(x.expand(idx.shape[0], *x.shape[1:]), idx)


def mask_to_2d(mask: torch.Tensor | dict | None, n: int) -> torch.Tensor | None:
    """The 2D padding mask of a prefill; ``generate`` pre-builds 4D masks for static caches (a dict of them per
    attention type for models with several): read the last row of the full-attention one."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None or mask.dim() == 2:
        return mask
    row = mask[:, 0, -1, :n]
    return (row if row.dtype == torch.bool else row == 0).long()


def last_real_index(mask2d: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """Index of each row's last non-padding token (N-1 everywhere under left padding)."""
    if mask2d is None:
        return torch.full((b,), n - 1, dtype=torch.long, device=device)
    ar = torch.arange(n, device=device)
    return torch.where(mask2d.bool(), ar, -1).max(1).values


def paired_text_positions(input_ids: torch.Tensor, mask2d: torch.Tensor | None, spans: list[list[torch.Tensor]],
                          special_ids: set[int]) -> list[list[torch.Tensor]]:
    """Per row and image, the positions of the image's *paired text*, found from token ids: the real tokens after
    its span up to the next image's span (the last image: up to the row's last real token) whose ids are not in
    ``special_ids``. Images with no such text between them share the text after the later one; a row whose last
    image has no text after it raises (nothing to pair it with)."""
    b, n = input_ids.shape
    real = mask2d.bool() if mask2d is not None else torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
    ok = real & ~torch.isin(input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype,
                                                    device=input_ids.device))
    out: list[list[torch.Tensor]] = []
    for bi, row in enumerate(spans):
        # sync: once per image per prefill, the span ends (host bounds of the text between images)
        bounds = [(int(sp[-1]) + 1, int(row[i + 1][0]) if i + 1 < len(row) else n) for i, sp in enumerate(row)]
        texts: list[torch.Tensor] = []
        following = None
        for lo, hi in reversed(bounds):
            pos = torch.arange(lo, hi, device=input_ids.device)
            pos = pos[ok[bi, lo:hi]]
            if pos.numel() == 0:
                if following is None:
                    raise ValueError(f"row {bi}'s last image has no text after it to pair it with; put the "
                                     "question (or the demonstration's answer) after the image")
                pos = following
            texts.append(pos)
            following = pos
        out.append(texts[::-1])
    return out
