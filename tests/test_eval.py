"""tokprune.eval and ``tokprune eval`` / ``tokprune report`` on the shipped reference models, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eval_helpers import write_jsonl_folder

from tokprune.cli import main
from tokprune.eval import grid, runner, scoring, store, tasks
from tokprune.eval.variants import pooled_grid
from tokprune.reference import names

pytestmark = pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")

ROW_KEYS = {"key", "method", "keep", "keep_ratio", "task", "status", "accuracy", "relative_accuracy",
            "visual_tokens_final", "visual_tokens_mean", "tflops", "tflops_3ndm", "tflops_ratio", "prefill_ms",
            "peak_mem_bytes", "device", "n", "hard_accuracy", "hard_n", "input_tokens"}
META_KEYS = {"prompt_template", "image_resolution", "attn_implementation", "dtype", "batch_size", "seed", "versions",
             "device", "tokprune_git", "date", "max_new_tokens"}


# ----------------------------------------------------------------------------------------------- pieces
def test_scoring() -> None:
    assert scoring.exact_match(" Red. ", "red") and not scoring.exact_match("reddish", "red")
    assert scoring.yes_no("Yes, there is.", "yes") and not scoring.yes_no("maybe", "no")
    assert scoring.choice_index("B", ["red", "blue"]) == 1 and scoring.choice_index("blue", ["red", "blue"]) == 1
    assert scoring.is_correct("multiple_choice", "blue", "B", ["red", "blue"])
    assert scoring.pick_scoring(["yes", "No"], False) == "yes_no"
    assert scoring.pick_scoring(["red"], True) == "multiple_choice"
    with pytest.raises(ValueError, match="none of the choices"):
        scoring.choice_index("green", ["red", "blue"])


def test_pooled_grid_is_2x2_pooling_at_a_quarter() -> None:
    assert pooled_grid(16, 8, 8) == (4, 4)
    assert pooled_grid(8, 8, 8) == (2, 4)
    assert pooled_grid(64, 24, 24) == (8, 8)


def test_shapes_subsets_are_the_whole_tasks_questions_of_one_type() -> None:
    whole = {e.id: e for e in tasks.load_task("shapes", limit=50).examples}
    count = tasks.load_task("shapes_count", limit=10)
    assert len(count) == 10 and all(e.qtype == "count" for e in count.examples)
    assert all(whole[e.id].question == e.question for e in count.examples if e.id in whole)


def test_local_folder_task(tmp_path: Path) -> None:
    task = tasks.load_task(str(write_jsonl_folder(tmp_path / "d", 6)))
    assert len(task) == 6 and task.scoring == "exact_match"
    assert task.examples[0].image().size == (64, 64)
    mc = tasks.load_task(str(write_jsonl_folder(tmp_path / "mc", 3, choices=True)))
    assert mc.scoring == "multiple_choice" and mc.examples[0].choices


def test_the_core_and_the_offline_harness_never_import_lmms_eval() -> None:
    import subprocess
    import sys

    code = ("import sys, tokprune, tokprune.api, tokprune.cli, tokprune.eval.runner, tokprune.eval.report; "
            "tokprune.cli.build_parser(); print('lmms_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "./missing/data.parquet"], "does not exist"),
    (["--tasks", "shapes", "--methods", "nosuch", "--keep", "8"], "unknown method 'nosuch'"),
    (["--tasks", "shapes", "--methods", "cls", "--keep", "65"], "larger than the 64 visual tokens"),
    (["--tasks", "shapes", "--methods", "cls", "--flops-ratio", "0.5"], "no method supports flops_ratio"),
    (["--tasks", "shapes", "--methods", "cls", "--keep-ratio", "1.5"], "fraction of visual tokens KEPT"),
])
def test_bad_input_fails_before_the_model_loads(args: list[str], message: str, tmp_path: Path, capsys: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tokprune.eval import models

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    assert main(["eval", "--model", "llava-shapes", "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokprune eval")]
    assert len(ours) == 1 and ours[0].startswith("tokprune eval: error:") and message in ours[0]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- the grid
@pytest.fixture(scope="module")
def llava_grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline grid of the README (benchmarks/eval_shapes): cls, fastv and the baselines at 25% and 12.5% on 200
    Shapes-VQA test samples."""
    out = tmp_path_factory.mktemp("eval") / "llava"
    assert main(["eval", "--model", "llava-shapes", "--methods", "cls,fastv", "--keep", "16,8", "--tasks", "shapes",
                 "--limit", "200", "--batch-size", "50", "--out", str(out), "--no-progress"]) == 0
    return out


def _rows(out: Path) -> dict[tuple[str, Any], dict[str, Any]]:
    return {(r["method"], r["keep"]): r for r in store.read(out)["rows"]}


def test_grid_json_schema(llava_grid: Path) -> None:
    data = json.loads((llava_grid / "results.json").read_text())
    assert data["schema"] == store.SCHEMA and META_KEYS <= set(data["meta"])
    assert data["meta"]["versions"]["torch"] and data["meta"]["prompt_template"].startswith("user <image>")
    rows = data["rows"]
    assert len(rows) == 1 + 4 * 2  # unpruned + (cls, fastv, random, downsample) x 2 budgets
    for r in rows:
        assert ROW_KEYS <= set(r) and r["status"] == "ok" and r["n"] == 200, r
    assert data["tasks"]["shapes"]["scoring"] == "exact_match"


def test_grid_numbers(llava_grid: Path) -> None:
    rows = _rows(llava_grid)
    base = rows[("unpruned", None)]
    assert base["relative_accuracy"] == 1.0 and base["tflops_ratio"] == 1.0 and base["visual_tokens_final"] == 64
    assert base["accuracy"] > 0.95
    for m in ("cls", "fastv", "random", "downsample"):
        assert rows[(m, 8)]["visual_tokens_final"] == 8 and rows[(m, 16)]["visual_tokens_final"] == 16
        assert base["tflops"] > rows[(m, 16)]["tflops"] > rows[(m, 8)]["tflops"]
        assert base["tflops_3ndm"] > rows[(m, 16)]["tflops_3ndm"] > rows[(m, 8)]["tflops_3ndm"]
        assert rows[(m, 8)]["hard_n"] == rows[("downsample", 8)]["hard_n"]
    # a property of the trained model: [CLS] attention finds the answer's patches, random mostly does not
    assert rows[("cls", 8)]["accuracy"] > rows[("random", 8)]["accuracy"] + 0.1
    assert rows[("downsample", 8)]["hard_accuracy"] == 0.0


def test_grid_table_and_plot(llava_grid: Path, capsys: Any) -> None:
    md = (llava_grid / "results.md").read_text()
    assert "| Method | Budget | Tokens | TFLOPs | shapes | Avg |" in md
    assert "***Retain 8 tokens (↓87.5%)***" in md and "| unpruned | - | 64.0 |" in md and "100.0% |" in md
    assert "Hard subset" in md
    pytest.importorskip("matplotlib")
    for suffix in (".png", ".svg"):
        assert (llava_grid / f"pareto{suffix}").stat().st_size > 1000
    (llava_grid / "results.md").unlink()
    assert main(["report", str(llava_grid)]) == 0
    assert (llava_grid / "results.md").read_text() == md


def test_report_of_a_directory_without_results(tmp_path: Path, capsys: Any) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- resume
def _spec(**kw: Any) -> grid.GridSpec:
    return grid.GridSpec(model="llava-shapes", tasks=["shapes_color"], methods=["cls"], keeps=[8], limit=6,
                         batch_size=6, **kw)


def test_resume_runs_only_the_missing_cells(tmp_path: Path) -> None:
    out = tmp_path / "r"
    first = runner.run(_spec(), out, progress=False, max_cells=1)
    assert first.ran == ["unpruned|shapes_color"]
    with pytest.raises(ValueError, match="pass --resume"):
        runner.run(_spec(), out, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        runner.run(_spec(seed=1), out, resume=True, progress=False)
    second = runner.run(_spec(), out, resume=True, progress=False)
    assert second.skipped == ["unpruned|shapes_color"]
    assert second.ran == ["cls|keep=8|shapes_color", "random|keep=8|shapes_color", "downsample|keep=8|shapes_color"]
    assert not second.failed and len(second.rows) == 4
    assert runner.run(_spec(), out, resume=True, progress=False).ran == []


def test_a_crashed_cell_is_recorded_and_the_grid_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: Any) -> None:
    import tokprune
    from tokprune.eval import predict

    real = predict.generate

    def flaky(bundle: Any, *a: Any, **k: Any) -> Any:
        if tokprune.is_patched(bundle.model) and bundle.model.tokprune.pruner.name == "random":
            raise RuntimeError("simulated crash")
        return real(bundle, *a, **k)

    monkeypatch.setattr(predict, "generate", flaky)
    out = tmp_path / "c"
    args = ["eval", "--model", "llava-shapes", "--methods", "cls", "--keep", "8", "--tasks", "shapes_color",
            "--limit", "6", "--out", str(out), "--no-progress"]
    assert main(args) == 1
    rows = {r["method"]: r for r in store.read(out)["rows"]}
    assert rows["random"]["status"] == "error" and "simulated crash" in rows["random"]["error"]
    assert all(rows[m]["status"] == "ok" for m in ("unpruned", "cls", "downsample"))
    assert "1 cell(s) failed: random|keep=8|shapes_color" in capsys.readouterr().err
    monkeypatch.setattr(predict, "generate", real)
    assert main([*args, "--resume"]) == 0
    assert "1 cell(s) run, 3 already done" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- other models
def test_qwen_reference_and_its_dynamic_resolution_downsample(tmp_path: Path) -> None:
    if "qwen2vl-shapes" not in names():
        pytest.skip("qwen2vl-shapes weights not shipped")
    spec = grid.GridSpec(model="qwen2vl-shapes", tasks=["shapes"], methods=["fastv"], keeps=[16], limit=10,
                         batch_size=10)
    res = runner.run(spec, tmp_path / "q", progress=False, report=False)
    rows = {r["method"]: r for r in res.rows}
    assert not res.failed and rows["unpruned"]["visual_tokens_final"] == 64
    assert rows["downsample"]["visual_tokens_final"] == 16  # 128 px -> 64 px: a 4x4 grid of merged patches
    assert rows["downsample"]["tflops"] < rows["random"]["tflops"]  # its vision encoder sees fewer patches too
    assert rows["fastv"]["visual_tokens_mean"] > 16


def test_a_local_from_pretrained_model_on_a_local_folder(tmp_path: Path) -> None:
    from tokprune.testing import tiny_llava

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    data = write_jsonl_folder(tmp_path / "data", 4, image_size=56)
    spec = grid.GridSpec(model=str(tmp_path / "tiny"), tasks=[str(data)], methods=["cls"], keeps=[4], limit=4,
                         batch_size=2, template="user <image> {question} assistant :", max_new_tokens=2)
    res = runner.run(spec, tmp_path / "o", progress=False, report=False)
    assert not res.failed, [r.get("error") for r in res.rows]
    rows = {r["method"]: r for r in res.rows}
    assert rows["unpruned"]["visual_tokens_final"] == 16 and rows["cls"]["visual_tokens_final"] == 4
    assert rows["downsample"]["visual_tokens_final"] == 4
    with pytest.raises(ValueError, match="no chat template"):
        runner.run(grid.GridSpec(model=str(tmp_path / "tiny"), tasks=[str(data)]), tmp_path / "o2", progress=False)
