"""Scoring + selection cost of divprune, cdpruner and vispruner at Qwen2.5-VL-7B proxy shapes, this checkout
against an older source tree (``--before``, e.g. ``git archive main`` unpacked), interleaved round-robin in one
process, and its share of a prefill time taken from a committed speed table (issue #28 item 4).

    python benchmarks/selection_share.py --before /tmp/before --keep-ratio 0.125 --rounds 5 \\
        --prefill-ms divprune=5385.7,cdpruner=5797.9,vispruner=5369.3 --out benchmarks/results/<dir>/x.md

Shapes: 1369 LLM tokens (a 1024x1024 image), LLM width 3584 (DivPrune / CDPruner compare the merger's output),
ViT hidden states of one merge unit (4 x 1280) for VisPruner's duplicates, received attention of the feature layer
over 86 windows of 64 patches, 16 heads of 80 (Qwen2.5-VL's windowed blocks). What is timed is the rule code the
pruners call (:mod:`tokprune.rules`, :mod:`tokprune.attention`), the same calls in both trees.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(tree: Path, rel: str, alias: str):
    spec = importlib.util.spec_from_file_location(alias, tree / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cases(tree: Path, tag: str, n: int, keep: int, new: bool):
    div = load(tree, "tokprune/rules/divprune.py", f"div_{tag}")
    cdp = load(tree, "tokprune/rules/cdpruner.py", f"cdp_{tag}")
    vis = load(tree, "tokprune/rules/vispruner.py", f"vis_{tag}")
    att = load(tree, "tokprune/attention.py", f"att_{tag}")
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, n, 3584, generator=g)
    text = torch.randn(20, 3584, generator=g)
    hidden = torch.randn(1, n, 4 * 1280, generator=g)
    q = torch.randn(86, 16, 64, 80, generator=g)
    k = torch.randn(86, 16, 64, 80, generator=g)

    def divprune():
        d = div.cosine_distance(feats)
        if not new:  # the isolation scores select_vision computed and did not use
            d.topk(2, dim=1, largest=False)
        return div.divprune_select(feats, keep, distance=d).kept

    def cdpruner():
        rel = cdp.relevance(feats[0], text)[None]
        sim = cdp.similarity(feats)
        kern = cdp.conditional_kernel(sim, rel, inplace=True) if new else cdp.conditional_kernel(sim, rel)
        return cdp.dpp_greedy(kern, keep).sort().values

    def vispruner():
        rec = torch.cat([att.received_attention(q[w:w + 1], k[w:w + 1], None, 80 ** -0.5) for w in range(86)], -1)
        imp = rec.mean(1).reshape(1, -1, 4).mean(-1)[:, :n]
        return vis.vispruner_select(imp, hidden, keep).kept

    return {"divprune": divprune, "cdpruner": cdpruner, "vispruner": vispruner}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--keep-ratio", type=float, default=0.125)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill-ms", default="", help="method=ms of the case's prefill, from a committed table")
    p.add_argument("--note", default="")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    n = 1369
    keep = round(n * args.keep_ratio)
    trees = {"before": cases(args.before, "b", n, keep, False),
             "after": cases(Path(__file__).resolve().parents[1], "a", n, keep, True)}
    for m in trees["after"]:  # the same kept set in both trees
        assert torch.equal(trees["before"][m](), trees["after"][m]()), m
    ms: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for tree in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            for m, fn in trees[tree].items():
                t0 = time.perf_counter()
                fn()
                ms.setdefault((tree, m), []).append((time.perf_counter() - t0) * 1e3)
    prefill = dict((kv.split("=")[0], float(kv.split("=")[1])) for kv in args.prefill_ms.split(",") if kv)
    from tokprune.eval.speed import cpu_model

    lines = ["## scoring + selection at Qwen2.5-VL-7B proxy shapes, before / after", "",
             f"CPU {cpu_model()}, {torch.get_num_threads()} threads, fp32; {n} tokens, keep {keep} "
             f"(keep_ratio {args.keep_ratio}); medians of {args.rounds} interleaved rounds; kept sets checked equal "
             f"between the trees; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.note}", "",
             "share: the median over the case's prefill in the committed table named in the note.", "",
             "| method | before ms | after ms | after / before | share before | share after |",
             "|---|---|---|---|---|---|"]
    for m in trees["after"]:
        b, a = statistics.median(ms[("before", m)]), statistics.median(ms[("after", m)])
        pf = prefill.get(m)
        sb = f"{b / pf:.2%}" if pf else "n/a"
        sa = f"{a / pf:.2%}" if pf else "n/a"
        lines.append(f"| {m} | {b:.1f} | {a:.1f} | {a / b:.2f} | {sb} | {sa} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
