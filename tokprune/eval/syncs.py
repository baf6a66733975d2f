"""Count host-device synchronisation points, and say where they happen (file:line), on any device.

On CUDA a sync is an operation whose result the host needs before it can go on: reading a value (``.item()``,
``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor, a tensor used as a Python index), or an operation whose
output *shape* depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` with tensor repeats and no ``output_size``, ``torch.equal``). The same calls happen on the CPU,
so they can be counted there: :class:`SyncCounter` is a ``TorchFunctionMode`` that sees every torch call, and for
the ones above records the innermost stack frame outside torch (the *origin*) and the innermost frame inside the
tokprune package (*via*, when the origin is model code that tokprune called).

``python -m tokprune.eval.syncs [--config tiny-llava] [--batch 2]`` prints, per registered method, the syncs of one
prefill and of the decode steps of a short ``generate`` that tokprune causes beyond what the unpatched model does.
"""

from __future__ import annotations

import argparse
import linecache
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_PKG = Path(__file__).resolve().parents[1]  # .../tokprune
_SELF = Path(__file__).resolve()
_TORCH = Path(torch.__file__).resolve().parent

#: calls whose result the host must wait for (names as torch function overrides see them)
READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "numpy",
                   "equal", "allclose", "is_nonzero"})
#: calls whose output shape depends on the data
DATA_SHAPED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"})


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def sync_kind(name: str, args: tuple, kwargs: dict) -> str | None:
    """The kind of sync a torch call is (None when it is none): its name, or ``bool-mask <name>``."""
    if name in READS or name in DATA_SHAPED:
        return name
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1 and _has_bool_index(args[1]):
        return f"bool-mask {name}"
    if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
            and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if name == "where" and len(args) == 1 and not kwargs:
        return "where(cond)"
    return None


@dataclass(frozen=True)
class Site:
    kind: str
    origin: str  # "path:line (function)" of the innermost frame outside torch
    via: str | None  # innermost tokprune frame when the origin is outside tokprune
    note: str | None = None  # the justification: a ``# sync: ...`` comment on the origin line or just above it

    @property
    def in_tokprune(self) -> bool:
        return self.origin.startswith("tokprune/")


def _where(frame: Any) -> str:
    path = Path(frame.f_code.co_filename).resolve()
    try:
        rel = "tokprune/" + str(path.relative_to(_PKG))
    except ValueError:
        parts = path.parts
        rel = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else str(path)
    return f"{rel}:{frame.f_lineno} ({frame.f_code.co_name})"


def justification(filename: str, lineno: int) -> str | None:
    """The text of a ``# sync: <why>`` comment at the end of line ``lineno`` or in the comment lines right above."""
    start = lineno
    while lineno >= 1:
        m = _MARK.search(linecache.getline(filename, lineno))
        if m:  # the marker and the comment lines that continue it, up to the code line
            more = [linecache.getline(filename, i).strip() for i in range(lineno + 1, start)]
            return " ".join([m.group(1).strip(), *(x.lstrip("#").strip() for x in more if x.startswith("#"))])
        lineno -= 1
        if not linecache.getline(filename, lineno).strip().startswith("#"):
            return None
    return None


_MARK = re.compile(r"#\s*sync:\s*(.+)$")


def _site(kind: str) -> Site:
    frame = sys._getframe(2)
    origin = via = note = None
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        inside_torch = path.is_relative_to(_TORCH)
        if path != _SELF and not inside_torch:
            if origin is None:
                origin = _where(frame)
                note = justification(frame.f_code.co_filename, frame.f_lineno)
            if path.is_relative_to(_PKG):
                via = _where(frame)
                break
        frame = frame.f_back
    origin = origin or "?"
    return Site(kind, origin, None if via == origin else via, note)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as c: ...`` counts the sync points of everything run inside, by :class:`Site`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[Site] = Counter()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = sync_kind(getattr(func, "__name__", ""), args, kwargs)
        if kind is not None:
            self.counts[_site(kind)] += 1
        return func(*args, **kwargs)

    def tokprune(self) -> Counter[Site]:
        """Only the syncs whose code is tokprune's (origin inside the package)."""
        return Counter({s: n for s, n in self.counts.items() if s.in_tokprune})


def count(fn: Callable[[], Any]) -> SyncCounter:
    """Run ``fn`` under a :class:`SyncCounter` and return it."""
    with SyncCounter() as c:
        fn()
    return c


@dataclass
class MethodSyncs:
    """Syncs one method adds: per site, in one prefill and per decode step (``generate`` minus its prefill)."""

    method: str
    prefill: Counter = field(default_factory=Counter)
    decode_per_step: dict[Site, float] = field(default_factory=dict)
    model_extra: int = 0  # syncs in model code beyond the unpatched model's (e.g. shapes the pruning changed)
    error: str | None = None


def method_syncs(model: torch.nn.Module, inputs: dict[str, Any], method: str, *, keep: int | None = None,
                 keep_ratio: float | None = None, new_tokens: int = 4) -> MethodSyncs:
    """The sync points tokprune's code runs for ``method``: in a prefill forward, and per steady-state decode step
    (the syncs of ``generate(max_new_tokens=new_tokens + 2)`` minus those of ``generate(max_new_tokens=2)``, over
    ``new_tokens`` steps: what is read once at the first decode step and cached does not count)."""
    import tokprune

    out = MethodSyncs(method)

    def generate(n: int) -> Any:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        base_prefill = count(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
        try:
            with tokprune.pruned(model, method, keep=keep, keep_ratio=keep_ratio):
                model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up: first-call paths are not the hot ones
                pre = count(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
                short = count(lambda: generate(2)).tokprune()
                long = count(lambda: generate(new_tokens + 2)).tokprune()
        except Exception as e:  # a method the family cannot run
            out.error = f"{type(e).__name__}: {e}"
            return out
    out.prefill = pre.tokprune()
    out.decode_per_step = {s: (long[s] - short.get(s, 0)) / new_tokens for s in long if long[s] > short.get(s, 0)}
    base_model = sum(n for s, n in base_prefill.counts.items() if not s.in_tokprune)
    out.model_extra = sum(n for s, n in pre.counts.items() if not s.in_tokprune) - base_model
    return out


def report_markdown(results: list[MethodSyncs], title: str) -> str:
    """One table per method: site, kind, count in one prefill, count per decode step."""
    lines = [f"## host syncs in tokprune's code: {title}", "",
             "Counted on CPU with a TorchFunctionMode (`tokprune.eval.syncs`); each would block the host on CUDA. "
             "`via`: the tokprune frame that called model code where the sync is. Model code's own syncs (the "
             "unpatched model has them too) are not listed; `model +` is how many more of them the pruned "
             "prefill ran.", ""]
    for r in results:
        if r.error:
            lines += [f"### {r.method}: not run ({r.error})", ""]
            continue
        total_pre = sum(r.prefill.values())
        total_dec = sum(r.decode_per_step.values())
        lines += [f"### {r.method}: {total_pre} per prefill, {total_dec:g} per decode step "
                  f"(model + {r.model_extra})", "", "| site | kind | per prefill | per decode step | justification |",
                  "|---|---|---|---|---|"]
        sites = sorted(set(r.prefill) | set(r.decode_per_step), key=lambda s: (s.origin, s.kind))
        for s in sites:
            via = f" via {s.via}" if s.via else ""
            lines.append(f"| `{s.origin}`{via} | {s.kind} | {r.prefill.get(s, 0)} | {r.decode_per_step.get(s, 0):g} "
                         f"| {s.note or '**none**'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tokprune
    from tokprune import configs

    p = argparse.ArgumentParser(prog="python -m tokprune.eval.syncs", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="config(s) to build (default: tiny-llava and tiny-qwen2.5-vl)")
    p.add_argument("--methods", help="comma-separated (default: every registered method)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--n-text", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the CPU-only checks do not run)")
    p.add_argument("--out", help="write the markdown here")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else tokprune.methods()
    parts = []
    for name in args.config or ["tiny-llava", "tiny-qwen2.5-vl"]:
        model = configs.build_model(name, args.device)
        inputs = configs.example_inputs(model.config, n_text=args.n_text, n_images=args.images, batch=args.batch,
                                        device=args.device)
        results = [method_syncs(model, inputs, m, keep_ratio=args.keep_ratio) for m in methods]
        parts.append(report_markdown(results, f"{name} on {args.device}, batch {args.batch}, {args.images} image(s) "
                                              f"per sample, keep_ratio {args.keep_ratio}"))
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
