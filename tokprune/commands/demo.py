"""``tokprune demo``: prune a tiny built-in model end to end, no downloads, in seconds."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a tiny built-in model with and without pruning (no downloads)")
    p.add_argument("--family", default="llava", help="tiny model family (default: llava)")
    p.add_argument("--method", default="cls", help="pruning method (default: cls)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="visual tokens kept per image (default: 4)")
    budget.add_argument("--keep-ratio", type=float, default=None, help="fraction of visual tokens kept")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import tokprune
    from tokprune.testing import image_prompt, make_image, tiny_model

    model, proc = tiny_model(args.family)
    inputs = proc(images=make_image(seed=0), text=image_prompt(proc), return_tensors="pt")
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    keep, ratio = args.keep, args.keep_ratio
    if keep is None and ratio is None:
        keep = 4
    n_prompt = inputs["input_ids"].shape[1]
    print(f"tokprune {tokprune.__version__} demo: tiny {args.family} ({sum(p.numel() for p in model.parameters())} "
          f"parameters, random weights), methods available: {', '.join(tokprune.methods())}")
    with torch.no_grad():
        base = model.generate(**inputs, **gen)[0, n_prompt:]
        print(f"unpruned   : generated {base.tolist()}")

        with tokprune.pruned(model, args.method, keep=keep, keep_ratio=ratio):
            out = model.generate(**inputs, **gen)[0, n_prompt:]
            rec = tokprune.last_record(model)
        n_vis, n_kept = rec.n_visual[0][0], rec.n_kept[0][0]
        print(f"{args.method:<11}: visual tokens {n_vis} -> {n_kept} "
              f"(stages: {', '.join(s.kind + ('' if s.layer is None else f'@{s.layer}') for s in rec.stages)})")
        print(f"             kept indices {rec.kept[0][0].tolist()}")
        print(f"             generated {out.tolist()} ({'same as' if torch.equal(out, base) else 'differs from'} "
              "unpruned)")

        with tokprune.pruned(model, args.method, keep=n_vis):
            full = model.generate(**inputs, **gen)[0, n_prompt:]
        agree = torch.equal(full, base)
        print(f"keep-all   : {n_vis} -> {n_vis}, outputs {'identical to' if agree else 'DIFFER from'} the unpruned "
              "model")
    return 0 if agree else 1
