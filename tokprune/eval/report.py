"""Rendering a run: derived columns in ``results.json``, ``results.md`` (the papers' layout) and the Pareto plot.

Derived per row: accuracy relative to the unpruned model on the same task, the FLOPs ratio, and the hard-subset
accuracy (VTC-Bench's protocol: accuracy on the samples that the ``downsample`` baseline at the same budget gets
wrong). ``tokprune report DIR`` re-renders all of it from the JSON and the per-sample files.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokprune.eval import store
from tokprune.eval.variants import DOWNSAMPLE, UNPRUNED

MARKDOWN = "results.md"
PLOT = "pareto"


def budget_of(row: dict[str, Any]) -> tuple[str, Any]:
    if row["method"] == UNPRUNED:
        return ("unpruned", None)
    if row.get("keep") is not None:
        return ("keep", row["keep"])
    if row.get("keep_ratio") is not None:
        return ("keep_ratio", row["keep_ratio"])
    return ("flops_ratio", (row.get("options") or {}).get("flops_ratio"))


def derive(out: str | Path, rows: list[dict[str, Any]]) -> None:
    """Fill ``relative_accuracy``, ``tflops_ratio``, ``hard_accuracy`` and ``hard_n`` in place."""
    base = {r["task"]: r for r in rows if r["method"] == UNPRUNED and r["status"] == "ok"}
    down = {(r["task"], budget_of(r)): r for r in rows if r["method"] == DOWNSAMPLE and r["status"] == "ok"}
    for r in rows:
        for k in ("relative_accuracy", "tflops_ratio", "hard_accuracy", "hard_n"):
            r[k] = None
        if r["status"] != "ok":
            continue
        b = base.get(r["task"])
        if b is not None:
            r["relative_accuracy"] = r["accuracy"] / b["accuracy"] if b["accuracy"] else None
            r["tflops_ratio"] = r["tflops"] / b["tflops"] if b["tflops"] else None
        d = down.get((r["task"], budget_of(r)))
        if d is not None and r["method"] != UNPRUNED:
            wrong = {s["id"] for s in store.read_samples(out, d["key"]) or [] if not s["correct"]}
            mine = [s for s in store.read_samples(out, r["key"]) or [] if s["id"] in wrong]
            r["hard_n"] = len(mine)
            r["hard_accuracy"] = sum(s["correct"] for s in mine) / len(mine) if mine else None


def render(out: str | Path, data: dict[str, Any] | None = None, *, plot: bool = True) -> list[Path]:
    """Derive, then write results.json, results.md and (with matplotlib) pareto.png / pareto.svg into ``out``."""
    out = Path(out)
    data = data if data is not None else store.read(out)
    derive(out, data["rows"])
    written = [store.write(out, data)]
    md = out / MARKDOWN
    md.write_text(markdown(data), encoding="utf-8")
    written.append(md)
    if plot:
        try:
            written += pareto(data, out / PLOT)
        except ImportError:
            print("tokprune eval: the Pareto plot needs matplotlib (pip install 'tokprune[eval]'); not written",
                  file=sys.stderr)
    return written


# ----------------------------------------------------------------------------------------------- markdown
def _pct(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(100 * x, spec)


def _content(row: dict[str, Any]) -> float:
    """Visual tokens after the last stage, less the special ones kept on top of any budget (LLaVA-NeXT's newlines)."""
    return row["visual_tokens_final"] - (row.get("visual_tokens_special") or 0)


def kept_budget(rows: list[dict[str, Any]], budget: tuple[str, Any], unpruned: list[dict[str, Any]]
                ) -> tuple[str, Any]:
    """The budget a method's ``rows`` (one budget, every task) really kept: ``budget`` itself, or, when they keep
    more than it asks (CATP on one image: stage 1 only, ``1 - R/2`` of the tokens), the count or kept fraction
    they keep, so the row is grouped and labelled by that. Compared without special tokens, with one token of
    rounding slack for fractions (against the ``unpruned`` rows of the same tasks)."""
    kind, value = budget
    ok = [r for r in rows if r["status"] == "ok"]
    if kind not in ("keep", "keep_ratio") or not ok:
        return budget
    base = {r["task"]: r for r in unpruned if r["status"] == "ok"}
    content = sum(_content(r) for r in ok) / len(ok)
    if kind == "keep":
        return ("keep", round(content)) if content > value + 0.5 else budget
    full = [_content(base[r["task"]]) for r in ok if r["task"] in base]
    if len(full) != len(ok) or not all(full):
        return budget
    n = sum(full) / len(full)
    return ("keep_ratio", round(content / n, 4)) if content > value * n + 1 else budget


def budget_label(budget: tuple[str, Any], kept: tuple[str, Any]) -> str:
    """The Budget cell: what was asked, and what was kept when that differs."""
    if kept == budget:
        return str(budget[1])
    what = f"{kept[1]} tokens" if kept[0] == "keep" else f"{kept[1]:.1%}"
    return f"{budget[1]} (keeps {what})"


def _groups(rows: list[dict[str, Any]], all_rows: list[dict[str, Any]] | None = None
            ) -> list[tuple[tuple[str, Any], list[tuple[str, tuple[str, Any]]]]]:
    """Groups by the budget really kept (:func:`kept_budget`), each with its (method, asked budget) entries in
    grid order; kinds in grid order, larger budgets first. ``all_rows`` (default ``rows``): where the unpruned
    rows are found."""
    all_rows = rows if all_rows is None else all_rows
    unpruned = [r for r in all_rows if r["method"] == UNPRUNED]
    entries: dict[tuple[str, tuple[str, Any]], None] = {}
    for r in rows:
        entries.setdefault((r["method"], budget_of(r)), None)
    order: dict[tuple[str, Any], list[tuple[str, tuple[str, Any]]]] = {}
    for method, budget in entries:
        mine = [r for r in all_rows if r["method"] == method and budget_of(r) == budget]
        order.setdefault(kept_budget(mine, budget, unpruned), []).append((method, budget))
    kinds = list(dict.fromkeys(k for k, _ in order))
    return sorted(order.items(), key=lambda g: (kinds.index(g[0][0]),
                                                -g[0][1] if isinstance(g[0][1], (int, float)) else 0))


def _budget_title(budget: tuple[str, Any], n_visual: int | None) -> str:
    kind, value = budget
    if kind == "keep":
        cut = f" (↓{1 - value / n_visual:.1%})" if n_visual else ""
        return f"Retain {value} tokens{cut}"
    if kind == "keep_ratio":
        return f"Retain {value:.1%} of the tokens (↓{1 - value:.1%})"
    return f"FLOPs ratio {value}"


def markdown(data: dict[str, Any]) -> str:
    """Rows: methods x budgets; columns: tasks (accuracy %), then Avg as % of the unpruned model."""
    meta, rows = data.get("meta", {}), data["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cell = {(r["method"], budget_of(r), r["task"]): r for r in rows}
    n_visual = meta.get("visual_tokens_per_image")
    v = meta.get("versions", {})
    lines = [
        f"## tokprune eval: {meta.get('model', data['spec']['model'])}",
        "",
        f"device: {meta.get('device')} · dtype: {meta.get('dtype')} · attention: {meta.get('attn_implementation')}"
        f" · batch {meta.get('batch_size')} · seed {meta.get('seed')} · limit {meta.get('limit')}"
        f" · torch {v.get('torch')} · transformers {v.get('transformers')} · tokprune {meta.get('tokprune_git')}"
        f" · {meta.get('date')}",
        "",
        "Accuracy % per task; Avg: mean accuracy relative to the unpruned model; TFLOPs: analytic prefill FLOPs "
        "per sample (whole model), with the ratio to the unpruned model; tokens: visual tokens after the last "
        "stage (layer average in brackets).",
        "",
        "| Method | Budget | Tokens | TFLOPs | " + " | ".join(tasks) + " | Avg |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    errors = []
    for group, entries in _groups(rows):
        if group[0] != "unpruned":
            lines.append(f"| ***{_budget_title(group, n_visual)}*** |" + " |" * (len(tasks) + 4))
        for m, budget in entries:
            mine = [cell.get((m, budget, t)) for t in tasks]
            ok = [r for r in mine if r and r["status"] == "ok"]
            accs = ["n/a" if r is None else ("error" if r["status"] != "ok" else _pct(r["accuracy"])) for r in mine]
            errors += [r for r in mine if r and r["status"] != "ok"]
            rel = [r["relative_accuracy"] for r in ok if r.get("relative_accuracy") is not None]
            avg = f"{100 * sum(rel) / len(rel):.1f}%" if rel and len(rel) == len(tasks) else "n/a"
            if ok:
                tok = sum(r["visual_tokens_final"] for r in ok) / len(ok)
                lay = sum(r["visual_tokens_mean"] for r in ok) / len(ok)
                tf = sum(r["tflops"] for r in ok) / len(ok)
                ratios = [r["tflops_ratio"] for r in ok if r.get("tflops_ratio") is not None]
                tokens = f"{tok:.1f}" + (f" ({lay:.1f})" if abs(lay - tok) > 0.05 else "")
                flops = f"{tf:.4g}" + (f" ({sum(ratios) / len(ratios):.0%})" if ratios else "")
            else:
                tokens = flops = "n/a"
            label = "-" if budget[0] == "unpruned" else budget_label(budget, group)
            lines.append(f"| {m} | {label} | {tokens} | {flops} | " + " | ".join(accs) + f" | {avg} |")
    lines += _hard_table(rows, tasks)
    if errors:
        lines += ["", "Failed cells:", ""]
        lines += [f"* `{r['key']}`: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _hard_table(rows: list[dict[str, Any]], tasks: Sequence[str]) -> list[str]:
    hard = [r for r in rows if r.get("hard_n") is not None]
    if not hard:
        return []
    lines = ["", "### Hard subset: accuracy % on the samples the downsample baseline gets wrong (count in brackets)",
             "", "| Method | Budget | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    cell = {(r["method"], budget_of(r), r["task"]): r for r in hard}
    for group, entries in _groups(hard, rows):
        for m, budget in entries:
            vals = []
            for t in tasks:
                r = cell.get((m, budget, t))
                vals.append("n/a" if r is None else f"{_pct(r['hard_accuracy'])} ({r['hard_n']})")
            lines.append(f"| {m} | {budget_label(budget, group)} | " + " | ".join(vals) + " |")
    return lines


# ----------------------------------------------------------------------------------------------- plot
def points(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """Per method: (mean TFLOPs over tasks, mean accuracy % over tasks, budget label), complete budgets only."""
    tasks = set(r["task"] for r in rows)
    out: dict[str, list[tuple[float, float, str]]] = {}
    for group, entries in _groups(rows):
        for m, budget in entries:
            mine = [r for r in rows if r["method"] == m and budget_of(r) == budget and r["status"] == "ok"]
            if len(mine) != len(tasks):
                continue
            tf = sum(r["tflops"] for r in mine) / len(mine)
            acc = 100 * sum(r["accuracy"] for r in mine) / len(mine)
            out.setdefault(m, []).append((tf, acc, budget_label(budget, group)))
    return {m: sorted(p) for m, p in out.items()}


def pareto(data: dict[str, Any], stem: str | Path) -> list[Path]:
    """Accuracy (mean over tasks) against TFLOPs: a line per method, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(data["rows"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, p in pts.items():
        if m == UNPRUNED:
            ax.scatter([x for x, _, _ in p], [y for _, y, _ in p], marker="*", s=220, color="black", zorder=5,
                       label="unpruned")
            continue
        style = "--" if m in ("random", DOWNSAMPLE) else "-"
        ax.plot([x for x, _, _ in p], [y for _, y, _ in p], style, marker="o", label=m)
        for x, y, lab in p:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    meta = data.get("meta", {})
    tasks = ", ".join(dict.fromkeys(r["task"] for r in data["rows"]))
    ax.set_xlabel("prefill TFLOPs per sample (analytic, whole model)")
    ax.set_ylabel(f"accuracy % (mean of {tasks})")
    ax.set_title(f"{meta.get('model', data['spec']['model'])}: accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    stem = Path(stem)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120, metadata={"Date": None} if p.suffix == ".svg" else None)
    plt.close(fig)
    return paths
