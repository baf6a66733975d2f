"""A budget means the same everywhere: a method that keeps more than its budget (CATP on one image: stage 1 only,
``1 - R/2`` of the tokens) is labelled by what it keeps and grouped there, in eval tables, in ``tokprune show`` and
in ``tokprune flops``'s note; ``tokprune flops`` without a budget runs a method's own schedule, as ``apply`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokprune.cli import main
from tokprune.eval import report, store
from tokprune.reference import names


def _row(method: str, keep: int | None, final: float, special: float = 0.0, keep_ratio: float | None = None,
         task: str = "t") -> dict[str, Any]:
    return {"key": f"{method}-{keep}-{keep_ratio}-{task}", "method": method, "keep": keep, "keep_ratio": keep_ratio,
            "options": {}, "task": task, "status": "ok", "accuracy": 0.5, "visual_tokens_final": final,
            "visual_tokens_mean": final, "visual_tokens_special": special, "tflops": final, "tflops_3ndm": final,
            "relative_accuracy": 0.5, "tflops_ratio": 0.5}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    data = {"spec": {"model": "m"}, "meta": {"visual_tokens_per_image": 64}, "rows": rows}
    return [line for line in report.markdown(data).splitlines() if line.startswith("|")]


def test_a_row_that_keeps_more_than_its_budget_is_grouped_and_labelled_by_what_it_keeps() -> None:
    rows = [_row("unpruned", None, 64), _row("cls", 8, 8), _row("catp", 8, 36), _row("cls", 16, 16)]
    lines = _table(rows)
    titles = [line for line in lines if line.startswith("| ***")]
    assert [t.split("***")[1] for t in titles] == ["Retain 36 tokens (↓43.8%)", "Retain 16 tokens (↓75.0%)",
                                                   "Retain 8 tokens (↓87.5%)"]
    catp = next(i for i, line in enumerate(lines) if line.startswith("| catp |"))
    assert lines[catp].startswith("| catp | 8 (keeps 36 tokens) | 36.0 |")
    assert lines[catp - 1] == titles[0]  # under its own group, not beside the 8-token methods
    assert report.points(rows)["catp"][0][2] == "8 (keeps 36 tokens)"


def test_kept_fractions_and_special_tokens() -> None:
    rows = [_row("unpruned", None, 64), _row("cls", None, 8, keep_ratio=0.125),
            _row("catp", None, 36, keep_ratio=0.125)]
    lines = _table(rows)
    assert "| catp | 0.125 (keeps 56.2%) | 36.0 |" in "\n".join(lines)
    assert any("Retain 56.2% of the tokens" in line for line in lines)
    # LLaVA-NeXT's newlines ride on top of every budget: 64 content tokens + 24 newlines is still "keep 64"
    rows = [_row("unpruned", None, 600, special=24), _row("cls", 64, 88, special=24)]
    assert "| cls | 64 | 88.0 |" in "\n".join(_table(rows))


@pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")
def test_eval_table_of_catp_on_one_image(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["eval", "--model", "llava-shapes", "--methods", "catp,cls", "--keep", "8", "--no-baselines",
                 "--tasks", "shapes", "--limit", "8", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in store.read(out)["rows"]}
    assert rows["catp"]["visual_tokens_final"] == 36  # floor(64 (1 - 0.875 / 2)): stage 1 only
    md = (out / "results.md").read_text()
    assert "| catp | 8 (keeps 36 tokens) | 36.0 |" in md and "***Retain 36 tokens" in md
    assert md.index("| catp |") < md.index("***Retain 8 tokens") < md.index("| cls | 8 | 8.0 |")


@pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")
def test_show_labels_catp_by_what_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from tokprune.reference import load

    compare_module = importlib.import_module("tokprune.viz.compare")
    titles: list[str] = []
    real = compare_module.titled

    def spy(image: Any, text: str, *a: Any, **k: Any) -> Any:
        titles.append(text)
        return real(image, text, *a, **k)

    monkeypatch.setattr(compare_module, "titled", spy)
    model, processor = load("llava-shapes")
    from tokprune.data import ShapesVQA
    from tokprune.reference.text import prompt

    s = ShapesVQA("test", n=1)[0]
    compare_module.compare(model, processor, s.image(64), ["cls", "catp"], [8], text=prompt("llava", s.question))
    assert any(t.startswith("keep 8: 8/64 tokens") for t in titles)
    assert any(t.startswith("keeps 36/64 tokens, more than keep 8") for t in titles)
    assert not any(t.startswith("keep 8: 36/64") for t in titles)
    # catp's row is drawn in a group of its own, below the methods that keep the column's budget
    note = "these keep more than their column's budget (each title says what they keep)"
    assert titles.index("cls") < titles.index("catp") < titles.index(note)


def test_flops_note_of_catp_states_its_real_final_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--config", "llava-1.5-7b", "--method", "catp", "--keep", "64"]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: schedule"))
    assert "576 -> 320 before the LLM" in note
    assert "keep means the final count" not in note and "keeps floor(S (1 - R/2)) = 320 of 576" in note


def test_flops_without_a_budget_runs_the_methods_own_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--config", "llava-1.5-7b", "--method", "pdrop", "--convention", "3ndm"]) == 0
    own = capsys.readouterr().out
    assert main(["flops", "--config", "llava-1.5-7b", "--stages", "8:0.5,16:0.25,24:0.125",
                 "--convention", "3ndm"]) == 0
    paper = capsys.readouterr().out
    total = [line for line in own.splitlines() if line.startswith("total")]
    assert total and total == [line for line in paper.splitlines() if line.startswith("total")]
    assert "576 -> 288 before LLM layer 8, 144 before LLM layer 16, 72 before LLM layer 24" in own
    assert main(["flops", "--config", "llava-1.5-7b", "--method", "fastv"]) == 2
    assert "--method fastv has no default budget" in capsys.readouterr().err
