"""``tokprune eval``'s engine: run every cell of a grid, save after each one, resume, report.

A cell is a variant (unpruned, a method at a budget, a baseline) on one task. Each finished cell is written to
``results.json`` at once, so an interrupted run resumes where it stopped (``resume=True``: finished cells are
skipped, failed ones run again). A cell that raises is recorded with its error and the grid goes on;
:attr:`RunResult.failed` tells the caller (``tokprune eval`` exits 1).
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokprune.eval import store
from tokprune.eval.grid import Cell, GridSpec, cells
from tokprune.eval.validate import EvalArgumentError, check

#: prefill latency: warm-up forwards, then the median of this many timed ones (batch 1, the first example)
LATENCY_WARMUP, LATENCY_REPEATS = 1, 3


@dataclass
class RunResult:
    out: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)  # keys of the cells this call ran
    skipped: list[str] = field(default_factory=list)  # keys already finished (resume)

    @property
    def failed(self) -> list[str]:
        return [r["key"] for r in self.rows if r["status"] != "ok"]


def run(spec: GridSpec, out: str | Path, *, resume: bool = False, progress: bool = True,
        max_cells: int | None = None, report: bool = True) -> RunResult:
    """Run the grid of ``spec`` into directory ``out`` (see the module docstring). ``max_cells`` stops after
    that many cells have run (an interrupted run, for tests). Raises :class:`EvalArgumentError` before loading
    the model when an argument is bad."""
    out = Path(out)
    learnt = check(spec)
    _check_out(out)
    previous = _previous(out, spec, resume)
    done = {r["key"]: r for r in previous.get("rows", []) if r.get("status") == "ok"}
    grid = cells(spec)
    todo = [c for c in grid if c.key not in done]
    result = RunResult(out, [], skipped=[c.key for c in grid if c.key in done])
    rows = {r["key"]: r for r in previous.get("rows", [])}
    data = {"schema": store.SCHEMA, "spec": spec.as_dict(), "meta": previous.get("meta", {}),
            "tasks": previous.get("tasks", {}), "rows": [rows[c.key] for c in grid if c.key in rows]}
    if todo:
        _run_cells(spec, out, todo, learnt, data, rows, result, progress, max_cells)
    data["rows"] = [rows[c.key] for c in grid if c.key in rows]
    result.rows = data["rows"]
    if report:
        from tokprune.eval import report as rep

        rep.render(out, data)
    else:
        store.write(out, data)
    return result


def _check_out(out: Path) -> None:
    """``out`` can hold the run (a folder, or creatable under a writable one): checked before the model loads, not
    when the first cell is saved."""
    from tokprune.commands.args import check_writable

    if out.exists() and not out.is_dir():
        raise EvalArgumentError(f"--out {out}: is a file; pass a directory for the run")
    try:
        check_writable(str(out), "--out", make_folders=True)
    except OSError as e:
        raise EvalArgumentError(str(e)) from None


def _previous(out: Path, spec: GridSpec, resume: bool) -> dict[str, Any]:
    path = store.results_path(out)
    if not path.exists():
        return {}
    if not resume:
        raise EvalArgumentError(f"{out} already holds results; pass --resume to continue that run, or another --out")
    old = store.read(out)
    mine, theirs = spec.identity(), {k: old.get("spec", {}).get(k) for k in spec.identity()}
    if mine != theirs:
        diff = ", ".join(f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise EvalArgumentError(f"cannot resume {out}: it was run with other settings ({diff})")
    return old


def _run_cells(spec: GridSpec, out: Path, todo: list[Cell], learnt: dict[str, Any], data: dict[str, Any],
               rows: dict[str, dict[str, Any]], result: RunResult, progress: bool, max_cells: int | None) -> None:
    import torch
    from tqdm.auto import tqdm

    from tokprune.eval import meta, models
    from tokprune.eval.bench import device_name
    from tokprune.eval.tasks import load_task

    dtype = getattr(torch, spec.dtype)
    bundle = models.load(spec.model, device=spec.device, dtype=dtype, attn=spec.attn, template=spec.template,
                         max_new_tokens=spec.max_new_tokens)
    kinds = learnt["task_kinds"]
    offline_tasks = {t: load_task(t, spec.limit) for t in spec.tasks if kinds[t] == "offline"}
    data["tasks"].update({t: task.describe() for t, task in offline_tasks.items()})
    data["tasks"].update({t: {"name": t, "kind": "lmms"} for t in spec.tasks if kinds[t] == "lmms"})
    device = torch.device(spec.device)
    data["meta"] = meta.collect(bundle, spec, device_name(device), {
        "visual_tokens_per_image": learnt["visual_tokens_per_image"],
        "downsample": "Qwen: fewer pixels (dynamic resolution); LLaVA: projected token grid average-pooled to the "
                      "closest grid within the budget (2x2 pooling at 25%)",
        "flops": "analytic (tokprune.flops), per sample, prefill with logits for the last token; 3ndm: the papers' "
                 "LLM visual-token MACs",
        "resumed_cells": len(result.skipped),
    })
    grid_bar = tqdm(total=len(todo), desc="grid", unit="cell", disable=not progress, file=sys.stderr)
    try:
        by_variant: dict[Any, list[Cell]] = {}
        for c in todo:
            by_variant.setdefault(c.variant, []).append(c)
        n_run = 0
        for variant, group in by_variant.items():
            for cell, row in _run_variant(bundle, variant, group, spec, offline_tasks, learnt, device, out, progress):
                rows[cell.key] = row
                data["rows"] = list(rows.values())
                store.write(out, data)
                result.ran.append(cell.key)
                grid_bar.set_postfix_str(cell.key)
                grid_bar.update(1)
                n_run += 1
                if max_cells is not None and n_run >= max_cells:
                    return
    finally:
        grid_bar.close()


def _run_variant(bundle: Any, variant: Any, group: list[Cell], spec: GridSpec, offline_tasks: dict[str, Any],
                 learnt: dict[str, Any], device: Any, out: Path, progress: bool):
    """Yield ``(cell, row)`` for each cell of one variant (the model patched once for all its tasks)."""
    import torch

    n_visual = learnt["visual_tokens_per_image"]
    try:
        options, undo = variant.start(bundle, n_visual)
    except Exception as e:  # e.g. a method the family does not support: every cell of it fails the same way
        for cell in group:
            yield cell, _error_row(cell, e, device)
        return
    try:
        for cell in group:
            torch.manual_seed(spec.seed)
            t0 = time.perf_counter()
            try:
                row = _run_cell(bundle, cell, options, spec, offline_tasks, device, out, progress)
            except Exception as e:
                row = _error_row(cell, e, device)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            yield cell, row
    finally:
        undo()


def _base_row(cell: Cell, device: Any) -> dict[str, Any]:
    v = cell.variant
    return {"key": cell.key, "method": v.name, "keep": v.keep, "keep_ratio": v.keep_ratio,
            "options": dict(v.options), "task": cell.task, "device": str(device)}


def _error_row(cell: Cell, error: BaseException, device: Any) -> dict[str, Any]:
    tb = traceback.format_exception(type(error), error, error.__traceback__)
    return {**_base_row(cell, device), "status": "error", "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(tb[-3:])}


def _run_cell(bundle: Any, cell: Cell, options: dict[str, Any], spec: GridSpec, offline_tasks: dict[str, Any],
              device: Any, out: Path, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if cell.task in offline_tasks:
        from tokprune.eval.offline import run_task

        task = offline_tasks[cell.task]
        bar = tqdm(total=len(task), desc=cell.key, unit="sample", leave=False, disable=not progress, file=sys.stderr)
        try:
            res = run_task(bundle, task, options, spec.batch_size, bar.update)
        finally:
            bar.close()
        samples, metric, score = res.samples, "accuracy", None
        latency = prefill_ms(bundle, task.examples[0], options)
    else:
        from tokprune.eval import lmms_tasks

        samples, metric, score = lmms_tasks.run_cell(bundle, cell.task, options, spec)
        latency = None
    store.write_samples(out, cell.key, [{"id": s.id, "prediction": s.prediction, "answer": s.answer,
                                        "correct": bool(s.correct)} for s in samples])
    n = len(samples)
    if not n:
        raise RuntimeError(f"task {cell.task} produced no samples")
    mean = lambda f: sum(f(s.cost) for s in samples) / n  # noqa: E731
    return {**_base_row(cell, device), "status": "ok", "metric": metric, "n": n,
            "accuracy": score if score is not None else sum(bool(s.correct) for s in samples) / n,
            "visual_tokens_final": mean(lambda c: c.visual_final), "visual_tokens_mean": mean(lambda c: c.visual_mean),
            "visual_tokens_special": mean(lambda c: c.visual_special),
            "input_tokens": mean(lambda c: c.input_tokens), "tflops": mean(lambda c: c.tflops),
            "tflops_3ndm": mean(lambda c: c.tflops_3ndm), "prefill_ms": latency,
            "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None}


def prefill_ms(bundle: Any, example: Any, options: dict[str, Any]) -> float:
    """Median wall time (ms) of one prefill forward (batch 1, logits for the last token) of ``example``."""
    import torch

    from tokprune.eval.bench import _timer
    from tokprune.eval.predict import encode

    enc = encode(bundle, [bundle.prompt(example.question)], [example.image(bundle.image_size)], options)
    timer: Callable = _timer(bundle.model.device)
    times = []
    with torch.inference_mode():
        for i in range(LATENCY_WARMUP + LATENCY_REPEATS):
            t, _ = timer(lambda: bundle.model(**enc, logits_to_keep=1))
            if i >= LATENCY_WARMUP:
                times.append(t)
    return statistics.median(times)
