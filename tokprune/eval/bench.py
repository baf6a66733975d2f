"""Latency / memory benchmark of pruning methods x budgets on one model, against the unpruned model in the same run.

For each case the model is patched with ``tokprune.apply``, then measured after warm-up over several repeats
(medians): prefill latency (one forward over the prompt, ``logits_to_keep=1``), and from one
``generate(max_new_tokens=N)`` the time to first token (vision encoder + prefill + first token) and the decode
throughput (tokens after the first), both read from a streamer that marks each token as it reaches the host; also
peak accelerator memory, KV-cache bytes after prefill, and the time the method spends scoring/selecting
(``last_record(model).timings``, when the core records it).
CUDA events time GPU runs; ``time.perf_counter`` times CPU runs. Weights are random: only speed is meaningful.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from tokprune import flops
from tokprune.eval.bench_report import BenchReport
from tokprune.eval.progress import Progress
from tokprune.patches.compat import output_cache


@dataclass(frozen=True)
class Case:
    """One benchmark cell: a method at a budget; ``method=None`` is the unpruned model."""

    method: str | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the method's keyword options (``tokprune bench --option``)

    @property
    def label(self) -> str:
        if self.method is None:
            return "unpruned"
        budget = f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio}"
        return " ".join([self.method, budget, *(f"{k}={v}" for k, v in self.options)])


def grid(methods: Iterable[str], keeps: Iterable[int] = (), keep_ratios: Iterable[float] = (),
         options: dict[str, Any] | None = None) -> list[Case]:
    """The unpruned case followed by every method x budget, each method with ``options``."""
    budgets = [Case(keep=k) for k in keeps] + [Case(keep_ratio=r) for r in keep_ratios]
    opts = tuple(sorted((options or {}).items()))
    return [Case()] + [Case(m, b.keep, b.keep_ratio, opts) for m in methods for b in budgets]


@dataclass(frozen=True)
class Prompt:
    """The synthetic prompt of a run: per sample ``n_images`` images and ``n_text`` other tokens, ``batch`` samples.
    ``image_size`` (H, W) matters for LLaVA-NeXT and Qwen (see :func:`tokprune.flops.image_work`)."""

    n_text: int = flops.DEFAULT_N_TEXT
    n_images: int = 1
    batch: int = 1
    image_size: tuple[int, int] | None = None


@dataclass
class CaseResult:
    """Medians of one case (times in ms, sizes in bytes; None = not measured / not available), plus ratios."""

    label: str
    method: str | None
    keep: int | None
    keep_ratio: float | None
    visual_tokens: float | None = None  # visual tokens per sample entering the last LLM layer
    tflops: float | None = None  # analytic whole-model prefill FLOPs (logits for the last token only)
    prefill_ms: float | None = None
    ttft_ms: float | None = None
    decode_tok_s: float | None = None  # tokens per second over the whole batch, after the first token
    kv_bytes: int | None = None
    peak_mem_bytes: int | None = None
    select_ms: float | None = None
    error: str | None = None
    ratios: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------


Timer = Callable[[Callable[[], Any]], tuple[float, Any]]


def _timer(device: torch.device) -> Timer:
    """A function that runs a callable and returns (duration in ms, its result); CUDA events on GPU."""
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], Any]) -> tuple[float, Any]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            value = fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end), value

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> tuple[float, Any]:
        t0 = time.perf_counter()
        value = fn()
        return (time.perf_counter() - t0) * 1e3, value

    return cpu_time


def kv_cache_bytes(cache: Any) -> int | None:
    """Bytes held by the keys and values of a transformers cache (None when its layout is unknown)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _selection_ms(record: Any) -> float | None:
    """Scoring/selection time of the last prefill from the core's record (values in seconds), else None."""
    timings = getattr(record, "timings", None)
    if not isinstance(timings, dict) or not timings:
        return None
    return 1e3 * sum(float(v) for v in timings.values())


def _pad_id(config: Any) -> int:
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (tc, config):
        for key in ("pad_token_id", "eos_token_id"):
            v = getattr(source, key, None)
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int):
                return v
    return 0


@dataclass
class _Context:
    """What every case of a run shares."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    base: flops.TokenSchedule
    timer: Timer
    device: torch.device
    new_tokens: int
    warmup: int
    repeats: int
    api: Any
    bar: Progress


def run(model: torch.nn.Module, cases: Sequence[Case], prompt: Prompt = Prompt(), *, new_tokens: int = 16,
        warmup: int = 1, repeats: int = 5, progress: bool = True, api: ModuleType | Any = None,
        meta: dict[str, Any] | None = None) -> BenchReport:
    """Measure every case on ``model`` with a random ``prompt`` (see the module docstring).

    The first case must be the unpruned model (``Case()``); ratios are against it. ``api`` provides
    apply/remove/last_record (default: the tokprune package). A case that fails to apply or run is reported
    with its error and the run goes on.
    """
    from tokprune.configs import example_inputs

    if not cases or cases[0].method is not None:
        raise ValueError("the first case must be the unpruned model, Case()")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to measure decoding")
    if warmup < 0 or repeats < 1:
        raise ValueError("need warmup >= 0 and repeats >= 1")
    if api is None:
        import tokprune as api
    config = model.config
    param = next(model.parameters())
    inputs = example_inputs(config, n_text=prompt.n_text, n_images=prompt.n_images, batch=prompt.batch,
                            image_size=prompt.image_size, device=param.device, dtype=param.dtype)
    base = flops.TokenSchedule.unpruned(config, n_text=prompt.n_text, n_images=prompt.n_images,
                                        image_size=prompt.image_size)
    ctx = _Context(model, inputs, base, _timer(param.device), param.device, new_tokens, warmup, repeats, api,
                   Progress(len(cases) * (warmup + repeats), progress, "bench", "run"))
    results = []
    try:
        for case in cases:
            res = CaseResult(case.label, case.method, case.keep, case.keep_ratio)
            try:
                if case.method is not None:
                    api.apply(model, method=case.method, keep=case.keep, keep_ratio=case.keep_ratio,
                              **dict(case.options))
                _measure(ctx, res)
            except Exception as e:  # one bad case (e.g. a method the family does not support) must not end the run
                res.error = f"{type(e).__name__}: {e}"
            finally:
                if case.method is not None:
                    api.remove(model)
            results.append(res)
    finally:
        ctx.bar.close()
    _add_ratios(results)
    return BenchReport(_meta(model, prompt, base, new_tokens, warmup, repeats, meta), results)


class _TokenClock(BaseStreamer):
    """A generate() streamer that marks when the prompt and then each new token reach the host (generate moves
    every token to the CPU before calling ``put``, so the marks follow the device); CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
        self.start = self._mark()
        self.marks: list[Any] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def put(self, value: Any) -> None:
        self.marks.append(self._mark())

    def end(self) -> None:
        pass

    def _ms(self, a: Any, b: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def ttft_ms(self) -> float:
        """From calling generate to the first new token (marks[0] is the prompt, put before prefill)."""
        return self._ms(self.start, self.marks[1])

    def decode_ms(self) -> float:
        """From the first to the last new token."""
        return self._ms(self.marks[1], self.marks[-1])


def _measure(ctx: _Context, res: CaseResult) -> None:
    """Warm up, then time the prefill forward and one generate ``repeats`` times; fill ``res`` with medians."""
    model, inputs = ctx.model, ctx.inputs
    gen_kw = dict(do_sample=False, pad_token_id=_pad_id(model.config), max_new_tokens=ctx.new_tokens,
                  min_new_tokens=ctx.new_tokens)
    prefill, ttft, decode, select = [], [], [], []
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    out, record = None, None
    with torch.inference_mode():
        for i in range(ctx.warmup + ctx.repeats):
            t, forward_out = ctx.timer(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
            record = ctx.api.last_record(model) if res.method is not None else None  # the forward's, not generate's
            clock = _TokenClock(ctx.device)
            model.generate(**inputs, streamer=clock, **gen_kw)
            if i >= ctx.warmup:
                prefill.append(t)
                ttft.append(clock.ttft_ms())
                decode.append(clock.decode_ms())
                sel = _selection_ms(record)
                if sel is not None:
                    select.append(sel)
                out = forward_out
            ctx.bar.step(res.label)
    res.prefill_ms, res.ttft_ms, res.select_ms = _median(prefill), _median(ttft), _median(select)
    batch = int(inputs["input_ids"].shape[0])
    decode_ms = _median(decode)
    res.decode_tok_s = batch * (ctx.new_tokens - 1) / (decode_ms / 1e3) if decode_ms else None
    res.kv_bytes = kv_cache_bytes(output_cache(out)) if out is not None else None
    res.peak_mem_bytes = int(torch.cuda.max_memory_allocated(ctx.device)) if cuda else None
    # analytic FLOPs of the measured prefill: from the core's record when pruned
    if record is None:
        schedules = [ctx.base] * batch
    else:
        schedules = flops.from_record(model.config, record, **flops.geometry_from_inputs(inputs))
    res.visual_tokens = sum(s.visual[-1] for s in schedules) / len(schedules)
    res.tflops = flops.estimate(model.config, schedules, logits_to_keep=1).tflops


def _add_ratios(results: list[CaseResult]) -> None:
    """Ratios against the first (unpruned) result: speed-ups for times, fractions for the rest."""
    base = results[0]
    if base.error:
        return
    pairs = {"tflops": ("tflops", False), "prefill_speedup": ("prefill_ms", True), "ttft_speedup": ("ttft_ms", True),
             "decode_ratio": ("decode_tok_s", False), "kv": ("kv_bytes", False), "peak_mem": ("peak_mem_bytes", False)}
    for r in results:
        if r.error:
            continue
        for name, (attr, inverse) in pairs.items():
            a, b = getattr(r, attr), getattr(base, attr)
            if a and b:
                r.ratios[name] = b / a if inverse else a / b


def _meta(model: torch.nn.Module, prompt: Prompt, base: flops.TokenSchedule, new_tokens: int, warmup: int,
          repeats: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    import transformers

    param = next(model.parameters())
    meta = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_class": type(model).__name__,
        "device": device_name(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": prompt.batch,
        "images": prompt.n_images,
        "image_size": list(prompt.image_size) if prompt.image_size else None,
        "visual_tokens_per_image": base.images[0].llm_tokens,
        "n_text": prompt.n_text,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "timer": "cuda events" if param.device.type == "cuda" else "time.perf_counter",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "weights": "random",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    meta.update(extra or {})
    return meta
