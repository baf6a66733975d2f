"""The lmms-eval bridge, offline: a local YAML task over a local data set, answered by ``--model tokprune``
through ``simple_evaluate`` and through the ``lmms-eval`` CLI, with a tokprune method applied; its accuracy equals
``tokprune eval`` on the same data. Skipped when lmms-eval is not installed (CI installs it in .ci/eval.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from eval_helpers import write_parquet

from tokprune.cli import main
from tokprune.eval import store
from tokprune.reference import names

pytest.importorskip("lmms_eval")
pytest.importorskip("datasets")
pytestmark = pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")

N = 40
ARGS = "pretrained=llava-shapes,method=cls,keep=8"


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two parquet files (open answers, and the same questions with choices) and lmms-eval tasks over them."""
    from tokprune.eval.lmms_tasks import write_task

    root = tmp_path_factory.mktemp("lmms")
    gen, mc = write_parquet(root / "shapes.parquet", N), write_parquet(root / "shapes_mc.parquet", N, choices=True)
    write_task("tp_shapes", gen, root / "tasks", "exact_match")  # the docs' recipe, default settings
    write_task("tp_shapes_16", gen, root / "tasks", "exact_match", max_new_tokens=16)
    write_task("tp_shapes_mc", mc, root / "tasks", "multiple_choice")
    return {"root": root, "gen": gen, "mc": mc, "include": root / "tasks"}


@pytest.fixture(scope="module")
def tokprune_eval(local_tasks: dict[str, Any]) -> dict[str, float]:
    """``tokprune eval`` (offline tasks) on the same two files: accuracy of cls at keep=8 per file."""
    out = local_tasks["root"] / "offline"
    assert main(["eval", "--model", "llava-shapes", "--methods", "cls", "--keep", "8", "--no-baselines", "--tasks",
                 f"{local_tasks['gen']},{local_tasks['mc']}", "--batch-size", "20", "--out", str(out),
                 "--no-progress"]) == 0
    rows = {(r["method"], Path(r["task"]).name): r for r in store.read(out)["rows"]}
    return {"tp_shapes": rows[("cls", "shapes.parquet")]["accuracy"],
            "tp_shapes_mc": rows[("cls", "shapes_mc.parquet")]["accuracy"]}


def test_manifest_module_imports_no_torch() -> None:
    code = "import sys, tokprune.eval.lmms_manifest as m; m.manifest(); print(sorted(k for k in sys.modules " \
           "if k == 'torch' or k.startswith('tokprune.eval.lmms_model')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entry_point_registers_the_tokprune_model() -> None:
    from lmms_eval.models import get_model

    from tokprune.eval.lmms_model import TokPruneLMM

    assert get_model("tokprune") is TokPruneLMM


def test_default_task_settings_agree_with_tokprune_eval(local_tasks: dict[str, Any],
                                                       tokprune_eval: dict[str, float]) -> None:
    """write_task's defaults through lmms-eval score what ``tokprune eval`` scores (before: 0% against 80%: the
    task asked 16 new tokens of a model that answers in one and never stops, and lmms-eval cut at blank lines)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokprune.eval.lmms_model import answer_length

    tm = TaskManager("WARNING", include_path=str(local_tasks["include"]), include_defaults=False)
    res = simple_evaluate(model="tokprune", model_args=ARGS + ",batch_size=20", tasks=["tp_shapes", "tp_shapes_16"],
                          task_manager=tm, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    assert res["results"]["tp_shapes"]["accuracy,none"] == tokprune_eval["tp_shapes"] > 0.5
    # a task's own max_new_tokens does not make a one-token model ramble on: the same answers
    assert res["results"]["tp_shapes_16"]["accuracy,none"] == tokprune_eval["tp_shapes"]
    assert all(len(s["filtered_resps"][0].split()) == 1 for s in res["samples"]["tp_shapes_16"])
    yaml = (local_tasks["include"] / "tp_shapes.yaml").read_text()
    assert "max_new_tokens" not in yaml and "until: []" in yaml
    # the precedence: explicit max_new_tokens, else the model's fixed answer, else the task's, else the default
    bundle = type("B", (), {"answer_tokens": None, "max_new_tokens": 16})()
    assert answer_length(bundle, {"max_new_tokens": 32}) == 32 and answer_length(bundle, {}) == 16
    bundle.answer_tokens = 3
    assert answer_length(bundle, {"max_new_tokens": 32}) == 3


def test_simple_evaluate_equals_tokprune_eval(local_tasks: dict[str, Any], tokprune_eval: dict[str, float]) -> None:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=str(local_tasks["include"]), include_defaults=False)
    res = simple_evaluate(model="tokprune", model_args=ARGS + ",batch_size=20", tasks=["tp_shapes", "tp_shapes_mc"],
                          task_manager=tm, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    assert res["results"]["tp_shapes"]["accuracy,none"] == tokprune_eval["tp_shapes"]
    assert res["results"]["tp_shapes_mc"]["acc,none"] == tokprune_eval["tp_shapes_mc"]
    assert 0.5 < tokprune_eval["tp_shapes"] < 1.0  # pruned to 8 of 64 tokens: good, not perfect
    # post-pruning LLM input: 8 visual tokens + the prompt's text tokens, never the 64 unpruned ones
    from transformers import PreTrainedTokenizerFast

    from tokprune.reference import path_of
    from tokprune.reference.text import prompt

    tok = PreTrainedTokenizerFast.from_pretrained(path_of("llava-shapes"))
    for s in res["samples"]["tp_shapes"]:
        n_text = len(tok(prompt("llava", s["arguments"][0]))["input_ids"]) - 1  # all but the one <image> tag
        (counts,) = s["token_counts"]
        assert counts["input_tokens"] == n_text + 8


def test_lmms_eval_cli(local_tasks: dict[str, Any], tokprune_eval: dict[str, float], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tokprune", "--model_args", ARGS, "--tasks", "tp_shapes",
           "--include_path", str(local_tasks["include"]), "--output_path", str(tmp_path), "--batch_size", "20",
           "--verbosity", "DEBUG"]  # lmms-eval 0.7.3 exits 0 on errors unless DEBUG
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = tmp_path.rglob("*_results.json")
    acc = json.loads(results.read_text())["results"]["tp_shapes"]["accuracy,none"]
    assert acc == tokprune_eval["tp_shapes"]
    bad = [c if c != ARGS else "pretrained=llava-shapes,method=nosuch,keep=8" for c in cmd]
    run = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode != 0 and "unknown method 'nosuch'" in run.stderr + run.stdout


def test_tokprune_eval_on_an_lmms_eval_task(local_tasks: dict[str, Any], tokprune_eval: dict[str, float],
                                            tmp_path: Path) -> None:
    out = tmp_path / "lm"
    assert main(["eval", "--model", "llava-shapes", "--methods", "cls", "--keep", "8", "--no-baselines", "--tasks",
                 "tp_shapes", "--include-path", str(local_tasks["include"]), "--batch-size", "20", "--out", str(out),
                 "--no-progress"]) == 0
    rows = {r["method"]: r for r in store.read(out)["rows"]}
    assert rows["cls"]["accuracy"] == tokprune_eval["tp_shapes"] and rows["cls"]["metric"] == "accuracy"
    assert rows["cls"]["visual_tokens_final"] == 8 and rows["unpruned"]["visual_tokens_final"] == 64
    assert store.read(out)["tasks"]["tp_shapes"]["kind"] == "lmms"


def test_two_process_data_parallel_on_cpu(local_tasks: dict[str, Any], tokprune_eval: dict[str, float],
                                          tmp_path: Path) -> None:
    """lmms-eval shards the requests over two CPU processes (torchrun, gloo) and gathers every sample back."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmms_eval", "--model",
           "tokprune", "--model_args", ARGS, "--tasks", "tp_shapes", "--include_path", str(local_tasks["include"]),
           "--output_path", str(tmp_path), "--log_samples", "--batch_size", "8", "--verbosity", "DEBUG"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "Building contexts for tp_shapes on rank 1" in log and "Building contexts for tp_shapes on rank 0" in log
    (results,) = tmp_path.rglob("*_results.json")
    assert json.loads(results.read_text())["results"]["tp_shapes"]["accuracy,none"] == tokprune_eval["tp_shapes"]
    (samples,) = tmp_path.rglob("*_samples_tp_shapes.jsonl")
    doc_ids = [json.loads(line)["doc_id"] for line in samples.read_text().splitlines()]
    assert sorted(doc_ids) == list(range(N))


def test_the_process_group_lmms_eval_opened_is_closed_at_exit(tmp_path: Path) -> None:
    """lmms-eval never destroys its gloo group; tokprune's model does at exit, so no rank aborts during teardown."""
    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('closed' if not dist.is_initialized() else 'open'))  # runs last\n"
            "from tokprune.eval import lmms_model\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
            "assert dist.is_initialized()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "closed"
