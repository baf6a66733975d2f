"""lmms-eval tasks inside ``tokprune eval``, and task files for local data sets.

* :func:`check_task` tells whether lmms-eval knows a task (before any model loads);
* :func:`run_cell` evaluates one task with the already loaded (and patched) model through ``simple_evaluate``
  and returns per-sample results with tokprune's cost of each prefill;
* :func:`write_task` writes an lmms-eval YAML task over a local parquet / save_to_disk data set that scores with
  :mod:`tokprune.eval.scoring`, so ``lmms-eval --model tokprune`` and ``tokprune eval`` on the same data agree.

Only this module and :mod:`tokprune.eval.lmms_model` import lmms_eval, and only when called.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tokprune.eval.offline import SampleResult


def _require() -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("lmms-eval is not installed; install it the lean way (README, 'Evaluation'): pip install "
                          "'tokprune[eval]' accelerate evaluate loguru pytablewriter pytz sacrebleu tenacity "
                          "'filelock<4', then pip install --no-deps lmms-eval==0.7.3") from e


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, defaults: bool) -> Any:
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=include_path, include_defaults=defaults)


def _manager_for(name: str, include_path: str | None) -> Any:
    """The cheapest TaskManager that knows ``name``: the include path alone (0.01 s), else with the built-in
    tasks (indexing them takes seconds)."""
    _require()
    if include_path:
        tm = task_manager(str(include_path), False)
        if name in tm.all_tasks:
            return tm
    tm = task_manager(str(include_path) if include_path else None, True)
    if name not in tm.all_tasks:
        raise ValueError("lmms-eval knows no such task" + ("" if include_path else "; pass --include-path for local "
                                                               "task YAMLs"))
    return tm


def check_task(name: str, include_path: str | None) -> None:
    if include_path and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path!r} is not a directory")
    _manager_for(name, include_path)


def _score(results: dict[str, Any]) -> tuple[str, float]:
    """The task's first metric (lmms-eval keys look like ``"exact_match,none"``)."""
    for key, value in results.items():
        if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        return key.split(",")[0], float(value)
    raise ValueError(f"no metric in the lmms-eval results {sorted(results)}")


def run_cell(bundle: Any, name: str, options: dict[str, Any], spec: Any) -> tuple[list[SampleResult], str, float]:
    """Evaluate lmms-eval task ``name`` with ``bundle`` (already patched by the cell's variant)."""
    from lmms_eval.evaluator import simple_evaluate

    from tokprune.eval.lmms_model import TokPruneLMM

    lm = TokPruneLMM(bundle=bundle, options=options, batch_size=spec.batch_size)
    res = simple_evaluate(model=lm, tasks=[name], task_manager=_manager_for(name, spec.include_path),
                          limit=spec.limit, log_samples=True, bootstrap_iters=0, batch_size=spec.batch_size,
                          verbosity="WARNING")
    if not res or name not in res.get("results", {}):
        raise RuntimeError(f"lmms-eval returned no results for {name}")
    metric, score = _score(res["results"][name])
    first_cost = {}
    for task, doc_id, cost in lm.costs:
        first_cost.setdefault((task, doc_id), cost)
    samples = []
    for s in res["samples"][name]:
        value = s.get(metric)
        samples.append(SampleResult(str(s["doc_id"]), str(s.get("filtered_resps", s.get("resps"))),
                                    str(s.get("target")), bool(value is not None and float(value) >= 0.5),
                                    first_cost[(name, s["doc_id"])]))
    return samples, metric, score


# ----------------------------------------------------------------------------------------------- local tasks
_UTILS = '''"""Written by tokprune.eval.lmms_tasks.write_task: scoring shared with ``tokprune eval``."""

from tokprune.eval.scoring import choice_index, is_correct

SCORING = {scoring!r}


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target_idx(doc):
    return choice_index(doc["answer"], doc["choices"])


def process_results(doc, results):
    return {{"accuracy": float(is_correct(SCORING, results[0], doc["answer"], doc.get("choices")))}}
'''


def write_task(name: str, data: str | Path, out_dir: str | Path, scoring: str, max_new_tokens: int | None = None,
               split: str = "test") -> Path:
    """Write ``<out_dir>/<name>.yaml`` (+ ``<name>_utils.py``): an lmms-eval task over local ``data`` (a
    ``.parquet`` file or a ``save_to_disk`` directory) with tokprune's scoring. Returns the YAML path.

    Generation is what ``tokprune eval`` does on the same data, so both score the same answers: greedy, no stop
    string (lmms-eval would otherwise cut at a blank line), and by default no ``max_new_tokens`` of the task's own
    (the model's answer length applies: one token for the reference models, 16 for others, or the model's
    explicit ``max_new_tokens``). ``max_new_tokens`` writes one into the task (a reference model still answers in
    its one token)."""
    from tokprune.eval.scoring import SCORINGS

    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; scorings: {', '.join(SCORINGS)}")
    data = Path(data).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    utils = f"{name}_utils"
    (out / f"{utils}.py").write_text(_UTILS.format(scoring=scoring), encoding="utf-8")
    if data.suffix == ".parquet":
        source = f"dataset_path: parquet\ndataset_kwargs:\n  data_files:\n    {split}: {data}\n"
    else:
        source = f"dataset_path: {data}\ndataset_kwargs:\n  load_from_disk: true\n"
    if scoring == "multiple_choice":
        body = (f"output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: !function "
                f"{utils}.doc_to_target_idx\nmetric_list:\n  - {{metric: acc, aggregation: mean, "
                "higher_is_better: true}\n")
    else:
        length = "" if max_new_tokens is None else f"max_new_tokens: {int(max_new_tokens)}, "
        body = (f"output_type: generate_until\ndoc_to_target: answer\ngeneration_kwargs: {{{length}until: [], "
                f"do_sample: false}}\nprocess_results: !function {utils}.process_results\n"
                "metric_list:\n  - {metric: accuracy, aggregation: mean, higher_is_better: true}\n")
    yaml = (f"task: {name}\n{source}test_split: {split}\ndoc_to_visual: !function {utils}.doc_to_visual\n"
            f"doc_to_text: !function {utils}.doc_to_text\n{body}metadata: {{version: 0.0}}\n")
    path = out / f"{name}.yaml"
    path.write_text(yaml, encoding="utf-8")
    return path
