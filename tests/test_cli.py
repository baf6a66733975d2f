"""The CLI entry point and the demo a new user runs first."""

from __future__ import annotations

from tokprune.cli import main


def test_demo_prunes_and_keep_all_agrees(capsys):
    assert main(["demo", "--keep", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 4" in out
    assert "outputs identical to the unpruned model" in out


def test_demo_fastv_with_ratio(capsys):
    assert main(["demo", "--method", "fastv", "--keep-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens 16 -> 8 (stages: llm@2)" in out
