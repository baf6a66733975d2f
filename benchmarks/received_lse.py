"""Received attention at a Qwen2.5-VL-7B full-attention ViT block: the tap's softmax path against the path that
reuses the attention kernel's row log-sum-exps, round-robin in one process.

    python benchmarks/received_lse.py --out benchmarks/results/cpu-xeon-2c     # writes received-lse.{md,json}

One image of ``--patches`` ViT patches (5476 = a 1024 x 1024 image at 14 px), ``--heads`` x ``--head-dim``
(16 x 80: Qwen2.5-VL-7B's ViT), fp32, random q / k / v. Per round, each arm once:

* ``attention``: the block's attention alone, ``F.scaled_dot_product_attention`` (what the unpatched model runs);
* ``softmax tap``: that attention, then :func:`tokprune.attention.received_attention` without log-sum-exps (the
  tap's path where the call is not an unmasked CPU SDPA call: a softmax per query chunk, column sums);
* ``lse tap``: :func:`tokprune.attention.sdpa_with_lse` (the same kernel, returning each row's log-sum-exp), then
  :func:`tokprune.attention.received_from_lse` (per chunk one product of the queries and keys extended by a column,
  ``(scaling * q, -lse)`` and ``(k, 1)``, an exponential in place and column sums);
* ``lse tap, bias form``: the same kernel, then the form ``received_from_lse`` had before 2026-12-07 (kept here to
  compare: per chunk of 256 queries a ``baddbmm`` with ``-lse`` as its bias and ``scaling`` as ``alpha``, against
  the transposed key view, then the exponential and column sums).

The tap's own cost is each tap arm minus ``attention`` of the same round; the table gives medians over rounds and
checks that the taps' received attention agree (max abs difference) and that the outputs are bit for bit SDPA's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokprune.attention import received_attention, received_from_lse, sdpa_with_lse
from tokprune.eval.speed import cpu_model

#: what the default shapes are
QWEN_NOTE = " (Qwen2.5-VL-7B's ViT at 1024 x 1024)"


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def bias_form(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float,
              chunk: int = 256) -> torch.Tensor:
    """Received attention from the row log-sum-exps as ``received_from_lse`` computed it before 2026-12-07: per
    chunk, ``baddbmm(-lse, q, k^T, alpha=scaling)`` into a reused buffer, an exponential in place, column sums."""
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    q3, kt = query.float().reshape(b * h, q_len, d), key.float().reshape(b * h, kv, d).transpose(1, 2)
    bias = lse.float().reshape(b * h, q_len, 1).neg()
    total = torch.zeros(b * h, kv)
    buf = torch.empty(b * h * min(chunk, q_len) * kv)
    for start in range(0, q_len, chunk):
        q = q3[:, start:start + chunk]
        s = buf[:b * h * q.shape[1] * kv].view(b * h, q.shape[1], kv)
        torch.baddbmm(bias[:, start:start + chunk], q, kt, beta=1.0, alpha=scaling, out=s)
        total += s.exp_().sum(1)
    return (total / q_len).view(b, h, kv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patches", type=int, default=5476)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.patches, a.head_dim, generator=g) for _ in range(3))
    scale = a.head_dim ** -0.5
    arms = {
        "attention": lambda: (F.scaled_dot_product_attention(q, k, v, scale=scale), None),
        "softmax tap": lambda: (F.scaled_dot_product_attention(q, k, v, scale=scale),
                                received_attention(q, k, None, scale)),
        "lse tap": lambda: (lambda o, lse: (o, received_from_lse(q, k, lse, scale)))(*sdpa_with_lse(q, k, v, scale)),
        "lse tap, bias form": lambda: (lambda o, lse: (o, bias_form(q, k, lse, scale)))(*sdpa_with_lse(q, k, v, scale)),
    }
    with torch.inference_mode():
        for fn in arms.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in arms}
        outs = {}
        for _ in range(a.rounds):
            for name, fn in arms.items():
                ms, outs[name] = _timed(fn)
                times[name].append(ms)
    same_output = torch.equal(outs["lse tap"][0], outs["attention"][0])
    diff = max((outs[n][1] - outs["softmax tap"][1]).abs().max().item() for n in ("lse tap", "lse tap, bias form"))
    taps = ("softmax tap", "lse tap", "lse tap, bias form")
    tap = {name: [t - base for t, base in zip(times[name], times["attention"])] for name in taps}
    med = {name: statistics.median(ts) for name, ts in {**times, **{f"{n} (own)": t for n, t in tap.items()}}.items()}
    ratio = statistics.median(b / s for s, b in zip(tap["softmax tap"], tap["lse tap"]))
    over_bias = statistics.median(b / s for s, b in zip(tap["lse tap, bias form"], tap["lse tap"]))
    meta = dict(device=platform.processor() or platform.machine(), cpu="CPU " + cpu_model(),
                threads=torch.get_num_threads(), torch=torch.__version__, patches=a.patches, heads=a.heads,
                head_dim=a.head_dim, rounds=a.rounds,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    result = dict(meta=meta, times_ms=times, tap_own_ms=tap, medians_ms=med, lse_over_softmax_tap=ratio,
                  lse_over_bias_form=over_bias, output_bitwise_sdpa=same_output, received_max_abs_diff=diff)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "received-lse.json").write_text(json.dumps(result, indent=1))
    lines = [
        "## Received attention at a full-attention ViT block: softmax tap vs the kernel's log-sum-exps",
        "",
        f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, fp32; one image of {a.patches} patches, "
        f"{a.heads} heads x {a.head_dim}{QWEN_NOTE if (a.patches, a.heads, a.head_dim) == (5476, 16, 80) else ''}; "
        f"{a.rounds} round-robin rounds, "
        f"medians; {meta['date']}. `python benchmarks/received_lse.py`.",
        "",
        "| arm | ms (median) | the tap's own ms (arm - attention, same round) |",
        "|---|---|---|",
        f"| attention (SDPA) | {med['attention']:.0f} | - |",
        f"| attention + softmax tap | {med['softmax tap']:.0f} | {med['softmax tap (own)']:.0f} |",
        f"| attention with log-sum-exps + lse tap | {med['lse tap']:.0f} | {med['lse tap (own)']:.0f} |",
        f"| attention with log-sum-exps + lse tap, bias form (before 2026-12-07) | {med['lse tap, bias form']:.0f} | "
        f"{med['lse tap, bias form (own)']:.0f} |",
        "",
        f"The lse tap's own cost is **{ratio:.2f}x** the softmax tap's and **{over_bias:.2f}x** the bias form's "
        f"(medians of per-round ratios). The output with log-sum-exps is SDPA's bit for bit: {same_output}; the taps' "
        f"received attention differ by at most {diff:.1e} (values ~1/{a.patches}).",
    ]
    (out / "received-lse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
