"""``tokprune show``: the comparison picture for every family (tiny models) and the offline default."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tokprune.cli import main
from tokprune.testing import families, tiny_model
from tokprune.viz import compare
from tokprune.viz.draw import OUTLINE


@pytest.mark.parametrize("family", families())
def test_show_draws_every_family(family, tmp_path, capsys) -> None:
    png = tmp_path / "kept.png"
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image)
    assert main(["show", "--model", f"tiny:{family}", "--image", str(image), "--methods", "random,fastv",
                 "--keep", "4,0.5", "--size", "64", "--out", str(png)]) == 0
    assert "wrote" in capsys.readouterr().out
    pic = Image.open(png)
    model, proc = tiny_model(family)
    want = compare(model, proc, Image.open(image).convert("RGB"), ["random", "fastv"], [4, 0.5], size=64)
    assert pic.size == want.size and pic.width > 2 * 64 and pic.height > 2 * 64
    px = np.asarray(pic.convert("RGB"))
    assert (px == OUTLINE).all(-1).sum() > 0  # kept cells are outlined


def test_show_default_is_the_reference_model_offline(tmp_path, capsys, monkeypatch) -> None:
    from tokprune.reference import names

    if "llava-shapes" not in names():
        pytest.skip("llava-shapes weights not shipped")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    png = tmp_path / "kept.png"
    assert main(["show", "--out", str(png), "--methods", "cls,random"]) == 0
    out = capsys.readouterr().out
    w, h = map(int, re.search(r"\((\d+)x(\d+)\)", out).groups())
    pic = Image.open(png)
    assert pic.size == (w, h) and w > 2 * 160 and h > 2 * 160
    assert "cls, random x 0.25, 0.125 on llava-shapes" in out


def test_show_refuses_bad_budgets_and_unsupported_methods(tmp_path, capsys) -> None:
    """Bad input is one line on stderr naming the fix, exit code 2 (the CLI's error contract)."""
    assert main(["show", "--model", "tiny:llava", "--keep", "lots", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "neither a token count" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["show", "--model", "tiny:qwen2_vl", "--methods", "cls", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "methods that run without one here: " in err and "fastv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
