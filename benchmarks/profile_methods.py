"""Where the time of one pruned prefill goes, for chosen methods on a depth-reduced real-width proxy
(``torch.profiler`` per method, one warm-up prefill each; the operator table and the stage split of
:func:`tokprune.eval.profile.profile_prefill`), written as one markdown file: the evidence behind the speed work
of issue #28 (what is the method's own work, what was not).

    python benchmarks/profile_methods.py --config llava-1.5-7b --llm-layers 4 --keep 64 \\
        --methods pdrop,transprune,hiprune,visionzip,vtc_cls --out benchmarks/results/<dir>/profile-gaps.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokprune import configs  # noqa: E402
from tokprune.eval.profile import profile_prefill  # noqa: E402
from tokprune.eval.proxy import reduce_depth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--llm-layers", type=int)
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--methods", required=True, help="comma-separated; 'unpruned' profiles the unpatched model")
    p.add_argument("--keep", type=int)
    p.add_argument("--keep-ratio", type=float)
    p.add_argument("--n-text", type=int, default=95)
    p.add_argument("--image-size", help="HxW (Qwen, LLaVA-NeXT)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--note", default="", help="a line written under the title (conditions, load)")
    p.add_argument("--out", required=True, help="markdown file")
    args = p.parse_args(argv)
    config, depth = reduce_depth(configs.load(args.config), args.llm_layers, args.vision_layers)
    model = configs.build_model(config, "cpu", torch.float32)
    size = tuple(int(x) for x in args.image_size.lower().split("x")) if args.image_size else None
    inputs = configs.example_inputs(model.config, n_text=args.n_text, image_size=size, dtype=torch.float32)
    parts = [f"## profiles: {args.config}, {depth.label()}", "", args.note, ""]
    for m in args.methods.split(","):
        print(f"[profile] {m}", file=sys.stderr, flush=True)
        if m == "unpruned":
            s = profile_prefill(model, inputs, top=args.top)
        else:
            s = profile_prefill(model, inputs, m, keep=args.keep, keep_ratio=args.keep_ratio, top=args.top)
        parts.append(s.to_markdown())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    print(f"[profile] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
