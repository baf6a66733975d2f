"""Numeric options are checked from one declaration (``Pruner.numbers``), whose bounds hold the tuner's search space;
encoder layers resolve in one place (``ModelInfo.encoder_layer``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import tokprune.api
from tokprune.pruners.base import ModelInfo, Pruner
from tokprune.registry import get_method
from tokprune.tuned import search_space


@dataclass
class Weighted(Pruner):
    """Test-only: one declared numeric option."""

    name = "weighted"
    numbers = {"w": (0, 2, "a weight")}
    search_space = {"w": ("float", 0.0, 1.0)}
    w: float | None = 1


def test_declared_numbers_are_checked_and_become_floats():
    assert Weighted(w=2).w == 2.0 and isinstance(Weighted().w, float) and Weighted(w=None).w is None
    for bad in (3, -0.5, True, "1", float("nan")):
        with pytest.raises(ValueError, match=r"weighted: w must be a number in \[0, 2\] \(a weight\), got"):
            Weighted(w=bad)


def test_a_search_space_outside_the_declared_bounds_is_refused():
    @dataclass
    class Wide(Weighted):
        search_space = {"w": ("float", 0.0, 3.0)}

    assert search_space(Weighted) == {"w": ("float", 0.0, 1.0)}
    with pytest.raises(ValueError, match=r"leaves the option's valid range \[0, 2\]"):
        search_space(Wide)


@pytest.mark.parametrize("method", tokprune.api.methods())
def test_every_search_space_lies_inside_its_declared_bounds(method):
    cls = get_method(method)
    for key, (_, lo, hi) in search_space(method).items():
        if key in cls.numbers:
            low, high, _ = cls.numbers[key]
            assert low <= lo <= hi <= high


def test_encoder_layer_resolution():
    info = ModelInfo("x", vision_layers=4, feature_layer=3, has_cls=True, llm_layers=4, supports_compact=True)
    assert [info.encoder_layer(v) for v in (0, 3, -1, -4)] == [0, 3, 3, 0]
    with pytest.raises(ValueError, match=r"opt=4 is out of range for an encoder with 4 layers; pass a layer in \[0"):
        info.encoder_layer(4, "opt")
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        info.encoder_layer(-5)
    with pytest.raises(TypeError, match="must be an int"):
        info.encoder_layer(1.0)
