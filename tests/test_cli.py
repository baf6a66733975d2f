"""The CLI entry point and the demo a new user runs first."""

from __future__ import annotations

from tokprune.cli import main


def test_demo_prunes_and_keep_all_agrees(capsys):
    assert main(["demo", "--family", "llava", "--keep", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 4" in out
    assert "outputs identical to the unpruned model" in out


def test_demo_fastv_with_ratio(capsys):
    assert main(["demo", "--family", "llava", "--method", "fastv", "--keep-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 8 (stages: llm@2)" in out


def test_demo_on_the_reference_model_draws_kept_tokens(capsys, tmp_path):
    import pytest

    from tokprune.reference import names

    if "llava-shapes" not in names():
        pytest.skip("llava-shapes weights not shipped")
    png = tmp_path / "kept.png"
    assert main(["demo", "--samples", "20", "--show", "1", "--save", str(png)]) == 0
    out = capsys.readouterr().out
    assert "cls        : accuracy" in out and "keeping 8 of 64 visual tokens" in out
    assert "random     : accuracy" in out and "logits identical to the unpruned model" in out
    grid = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(grid) == 8 and sum(c in "#+" for line in grid for c in line) == 8
    from PIL import Image

    assert Image.open(png).size == (256, 256)
