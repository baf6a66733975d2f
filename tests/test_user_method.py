"""A researcher's own method, benchmarked without editing tokprune: ``package.module:ClassName`` names a Pruner
class in ``tokprune.apply``, ``tokprune eval --methods`` and lmms-eval's ``method=`` (the README's example module
examples/norm_prune.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tokprune
from tokprune.cli import main
from tokprune.eval import store
from tokprune.reference import names
from tokprune.testing import image_prompt, make_image, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples.norm_prune:FeatureNorm"


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository root


@pytest.mark.parametrize("largest", [True, False])
def test_apply_imports_the_class_and_its_option_selects_what_it_says(largest: Any) -> None:
    model, proc = tiny_model("llava")
    inputs = proc(images=make_image(seed=0), text=image_prompt(proc), return_tensors="pt")
    seen: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(o[0].detach()))
    try:
        with torch.no_grad(), tokprune.pruned(model, EXAMPLE, keep=4, largest=largest):
            model(**inputs)
            record = tokprune.last_record(model)
    finally:
        hook.remove()
    norms = seen[0].float().norm(dim=-1)  # independent: the projector's output, ranked by hand
    want = norms.topk(4, largest=largest).indices.sort().values
    assert record.method == EXAMPLE and torch.equal(record.kept[0][0].cpu(), want)


@pytest.mark.parametrize("method, message", [
    ("nosuchpkg.mod:Thing", "no module 'nosuchpkg'"),
    ("examples.norm_prune:Nope", "examples.norm_prune has no attribute Nope"),
    ("json:JSONDecoder", "is not a tokprune.Pruner subclass"),
])
def test_a_bad_import_path_is_one_line(method: str, message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", "llava-shapes", "--methods", method, "--keep", "8", "--tasks", "shapes",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")
def test_tokprune_eval_runs_a_users_method(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    assert main(["eval", "--model", "llava-shapes", "--methods", f"{EXAMPLE},cls", "--keep", "8", "--tasks", "shapes",
                 "--limit", "16", "--batch-size", "16", "--no-baselines", "--out", str(out), "--no-progress"]) == 0
    rows = {r["method"]: r for r in store.read(out)["rows"]}
    assert rows[EXAMPLE]["status"] == "ok" and rows[EXAMPLE]["visual_tokens_final"] == 8
    assert f"| {EXAMPLE} | 8 | 8.0 |" in (out / "results.md").read_text()
    # its options, as for a built-in method
    out = tmp_path / "smallest"
    assert main(["eval", "--model", "llava-shapes", "--methods", EXAMPLE, "--option", "largest=False", "--keep", "8",
                 "--tasks", "shapes", "--limit", "16", "--batch-size", "16", "--no-baselines", "--out", str(out),
                 "--no-progress"]) == 0
    (row,) = [r for r in store.read(out)["rows"] if r["method"] == EXAMPLE]
    assert row["options"] == {"largest": False} and row["status"] == "ok"


@pytest.mark.skipif("llava-shapes" not in names(), reason="llava-shapes weights not shipped")
def test_lmms_eval_model_args_name_a_users_method(tmp_path: Path) -> None:
    pytest.importorskip("lmms_eval")
    pytest.importorskip("datasets")
    from eval_helpers import write_parquet
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokprune.eval.lmms_tasks import write_task

    write_task("tp_mine", write_parquet(tmp_path / "d.parquet", 8), tmp_path / "tasks", "exact_match")
    tm = TaskManager("WARNING", include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = simple_evaluate(model="tokprune", model_args=f"pretrained=llava-shapes,method={EXAMPLE},keep=8,largest=false",
                          tasks=["tp_mine"], task_manager=tm, log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    (sample, *_) = res["samples"]["tp_mine"]
    assert sample["token_counts"][0]["input_tokens"] < 64  # pruned to 8 visual tokens by the user's method
