"""Where the time of one pruned prefill goes: a ``torch.profiler`` trace and a summary table.

:func:`profile_prefill` applies a method, runs one untimed prefill (warm-up), then profiles one
``model(**inputs, use_cache=True, logits_to_keep=1)``. The summary splits the forward into the vision encoder
(``get_image_features``: vision tower + projector), tokprune's scoring (its attention taps), tokprune's selection
(``last_record(model).timings``) and the rest (embedding, LLM layers, lm_head), and lists the top operators by
self time. The Chrome trace (``chrome://tracing``, Perfetto) is written gzipped when a path is given.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokprune.eval.speed import ENCODER, SCORING, Stopwatch, cpu_model, encoder_clock, time_taps, wrap_taps


@dataclass
class ProfileSummary:
    """One profiled prefill: the stage split (ms) and the top operators."""

    label: str
    device: str
    total_ms: float
    stages: dict[str, float]
    top_ops: list[dict[str, Any]] = field(default_factory=list)
    trace: str | None = None

    def to_markdown(self) -> str:
        lines = [f"### profile: {self.label}", "", f"one prefill on {self.device}, {self.total_ms:.1f} ms "
                 "(under the profiler, which adds overhead per operator)", "",
                 "| stage | ms | share |", "|---|---|---|"]
        for name, ms in self.stages.items():
            lines.append(f"| {name} | {ms:.2f} | {ms / self.total_ms:.1%} |")
        lines += ["", "| operator | calls | self ms | share |", "|---|---|---|---|"]
        for op in self.top_ops:
            share = op["self_ms"] / self.total_ms
            lines.append(f"| `{op['name']}` | {op['calls']} | {op['self_ms']:.2f} | {share:.1%} |")
        if self.trace:
            lines += ["", f"trace: `{self.trace}`"]
        return "\n".join(lines) + "\n"


def profile_prefill(model: torch.nn.Module, inputs: dict[str, Any], method: str | None = None, *,
                    keep: int | None = None, keep_ratio: float | None = None, top: int = 15,
                    trace: str | Path | None = None, **options: Any) -> ProfileSummary:
    """Profile one (pruned, when ``method`` is given) prefill of ``model`` on ``inputs``; see the module docstring."""
    from torch.profiler import ProfilerActivity, profile

    import tokprune
    from tokprune.eval.bench import device_name

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    enc, taps = Stopwatch(device, ENCODER), Stopwatch(device, SCORING)
    label = "unpruned" if method is None else f"{method} " + (f"keep={keep}" if keep is not None
                                                               else f"keep_ratio={keep_ratio}")
    restore = None
    try:
        if method is not None:
            tokprune.apply(model, method=method, keep=keep, keep_ratio=keep_ratio, **options)
            restore = time_taps(taps)
        with torch.inference_mode(), encoder_clock(model, enc):
            model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
            enc.take_ms(), taps.take_ms()
            with profile(activities=activities) as prof:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                if cuda:
                    torch.cuda.synchronize(device)
                total = (time.perf_counter() - t0) * 1e3
        record = tokprune.last_record(model) if method is not None else None
    finally:
        if restore is not None:
            restore()
        if method is not None:
            tokprune.remove(model)
    enc_ms, score_ms = enc.take_ms(), taps.take_ms()
    select_ms = 1e3 * sum(record.timings.values()) if record is not None else 0.0
    # scoring taps of vision methods run inside the encoder: count them once, as scoring
    inside = score_ms if record is not None and any(s.kind == "vision" for s in record.stages) else 0.0
    stages = {"vision encoder + projector (scoring taps excluded)": enc_ms - inside,
              "tokprune scoring (taps)": score_ms, "tokprune selection (record timings)": select_ms}
    stages["rest: embedding, LLM layers, lm_head"] = max(total - sum(stages.values()), 0.0)
    name = f"CPU {cpu_model()}, {torch.get_num_threads()} threads" if device.type == "cpu" else device_name(device)
    summary = ProfileSummary(label, name, total, stages, _top_ops(prof, top, cuda))
    if trace is not None:
        summary.trace = str(_write_trace(prof, Path(trace)))
    return summary


def _top_ops(prof: Any, top: int, cuda: bool) -> list[dict[str, Any]]:
    """The ``top`` operators by self time (device time on CUDA), tokprune's own regions left out."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if not e.key.startswith("tokprune::")]
    ops.sort(key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in ops[:top]]


def _write_trace(prof: Any, path: Path) -> Path:
    """The Chrome trace, gzipped (``path`` gets a .gz suffix when it has none)."""
    path = path if path.suffix == ".gz" else path.with_name(path.name + ".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


@dataclass
class ScoringMemory:
    """The tensors tokprune's attention taps (scoring) created during one prefill: the largest one and the sum."""

    largest_numel: int = 0
    largest_shape: tuple[int, ...] = ()
    total_bytes: int = 0
    calls: int = 0


class _AllocationLog(TorchDispatchMode):
    def __init__(self, log: ScoringMemory) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.log.total_bytes += t.numel() * t.element_size()
                if t.numel() > self.log.largest_numel:
                    self.log.largest_numel, self.log.largest_shape = t.numel(), tuple(t.shape)
        return out


def scoring_memory(model: torch.nn.Module, inputs: dict[str, Any], method: str, **budget: Any) -> ScoringMemory:
    """Every tensor the scoring taps of ``method`` produce in one prefill (a dispatch-level log, any device), to
    check that scoring stays O(tokens x dim): no (heads x) N x N attention matrix is ever materialised."""
    import tokprune

    log = ScoringMemory()

    def around() -> _AllocationLog:
        log.calls += 1
        return _AllocationLog(log)

    with tokprune.pruned(model, method, **budget):
        restore = wrap_taps(around)
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            restore()
    return log
