"""Kept-token pictures: the mask is the record's indices laid out row-major on the token grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokprune.viz import kept_mask, kept_picture, kept_text, side_by_side


def test_mask_and_text_on_a_rectangular_grid() -> None:
    mask = kept_mask(torch.tensor([0, 4, 11]), (3, 4))
    assert mask.tolist() == [[True, False, False, False], [True, False, False, False],
                             [False, False, False, True]]
    assert kept_text([0, 4, 11], (3, 4)) == "#...\n#...\n...#"
    objects = np.zeros((3, 4), dtype=bool)
    objects[0, :2] = True
    assert kept_text([0, 4, 11], (3, 4), objects) == "#o..\n+...\n...+"


def test_bad_indices_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        kept_mask([12], (3, 4))
    with pytest.raises(ValueError, match="grid is"):
        kept_text([0], 2, np.zeros((3, 3), dtype=bool))


def test_picture_dims_only_dropped_cells() -> None:
    img = Image.fromarray(np.full((6, 8, 3), 200, dtype=np.uint8))
    pic = np.asarray(kept_picture(img, [1], (3, 4), dim=0.5, size=None, lines=False))
    assert pic.shape == (6, 8, 3)
    assert (pic[0:2, 2:4] == 200).all()  # cell 1 = row 0, column 1
    assert (pic[2:, :] == 100).all() and (pic[:, 4:] == 100).all()
    big = kept_picture(img, [1], (3, 4), size=64)
    assert big.size == (64, 48)
    assert side_by_side([big, big], gap=2).size == (130, 48)
