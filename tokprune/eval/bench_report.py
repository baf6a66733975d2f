"""Rendering of a ``tokprune bench`` run: the report object, its JSON and its markdown table (measuring is in
:mod:`tokprune.eval.bench`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokprune.eval.bench import CaseResult


@dataclass
class BenchReport:
    """Everything a run measured, with the conditions (device, dtype, shapes) needed to read it."""

    meta: dict[str, Any]
    results: list[CaseResult]

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "results": [asdict(r) for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        m = self.meta
        lines = [
            f"## tokprune bench: {m['model']}",
            "",
            f"device: {m['device']} · dtype: {m['dtype']} · attention: {m['attn_implementation']} · batch {m['batch']}"
            f" · {m['images']} image(s) of {m['visual_tokens_per_image']} visual tokens + {m['n_text']} text tokens"
            f" · {m['new_tokens']} new tokens · medians of {m['repeats']} runs after {m['warmup']} warm-up"
            f" · random weights · torch {m['torch']} · transformers {m['transformers']} · {m['date']}",
            "",
            "Ratios (in brackets) are against the unpruned model measured in the same run: speed-up for times, "
            "fraction for FLOPs, KV cache and memory. n/a: not measured on this device or not recorded by the method.",
            "",
            *_depth_lines(m),
            *_tiny_cpu_warning(m),
            "| case | visual tokens | TFLOPs | prefill ms | TTFT ms | decode tok/s | KV MiB | peak MiB | select ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            if r.error:
                error = r.error.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {r.label} | error: {error} |" + " |" * 7)
                continue
            q = r.ratios
            lines.append(
                f"| {r.label} | {_fmt(r.visual_tokens, '.0f')} | {_fmt(r.tflops, '.4g', q.get('tflops'), '.1%')} "
                f"| {_fmt(r.prefill_ms, '.2f', q.get('prefill_speedup'), '.2f', 'x')} "
                f"| {_fmt(r.ttft_ms, '.2f', q.get('ttft_speedup'), '.2f', 'x')} "
                f"| {_fmt(r.decode_tok_s, '.1f', q.get('decode_ratio'), '.2f', 'x')} "
                f"| {_fmt(_mib(r.kv_bytes), '.2f', q.get('kv'), '.1%')} "
                f"| {_fmt(_mib(r.peak_mem_bytes), '.0f', q.get('peak_mem'), '.1%')} | {_fmt(r.select_ms, '.3f')} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> list[Path]:
        """Write JSON and markdown: ``out`` ending in .json names the JSON file (markdown beside it), otherwise
        ``out`` is a directory that receives bench.json and bench.md."""
        out = Path(out)
        js = out if out.suffix == ".json" else out / "bench.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        md = js.with_suffix(".md")
        js.write_text(self.to_json() + "\n", encoding="utf-8")
        md.write_text(self.to_markdown(), encoding="utf-8")
        return [js, md]


def _depth_lines(meta: dict[str, Any]) -> list[str]:
    """A line above the table when the model is a depth-reduced proxy (see :mod:`tokprune.eval.proxy`)."""
    depth = meta.get("depth") or {}
    if not depth.get("proxy"):
        return []
    notes = "; ".join(depth.get("notes") or [])
    return [f"**{depth['label']}** (real widths, random weights{'; ' + notes if notes else ''}): times and TFLOPs "
            "are those of the reduced model, whose analytic FLOPs are the bound to compare its speed-ups with.", ""]


#: below this many parameters a CPU run is dominated by per-op overhead, not by the work pruning removes
TINY_PARAMS = 50_000_000


def _tiny_cpu_warning(meta: dict[str, Any]) -> list[str]:
    """A warning line above the table when a tiny model was timed on a CPU (its times are noise, not speed)."""
    n = meta.get("parameters")
    if not str(meta.get("device", "")).startswith("CPU") or n is None or n >= TINY_PARAMS:
        return []
    return [f"**warning:** a tiny model ({n / 1e6:.2f}M parameters) on a CPU: its times are per-op overhead and can "
            "swing 100x between runs and cases, so its speed-ups mean nothing; read the TFLOPs, visual-token and KV "
            "columns, and time a real-size config (bfloat16) or a GPU for speed.", ""]


def _mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20


def _fmt(x: float | None, spec: str, ratio: float | None = None, rspec: str = ".2f", suffix: str = "") -> str:
    if x is None:
        return "n/a"
    text = format(x, spec)
    return f"{text} ({format(ratio, rspec)}{suffix})" if ratio is not None else text
