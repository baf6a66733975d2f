"""``tokprune demo``: prune a small built-in model end to end, offline, in seconds.

By default it uses the trained reference model ``llava-shapes`` shipped with the package (docs/reference.md):
accuracy with and without pruning on Shapes-VQA, and a picture of which tokens the method kept. ``--family``
switches to a tiny randomly initialised model of any supported family (exactness checks only: random weights
answer nothing).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="prune a built-in model with and without pruning (offline)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="trained reference model: llava-shapes (default) or qwen2vl-shapes")
    src.add_argument("--family", default=None, help="use a tiny random-weight model of this family instead")
    p.add_argument("--method", default=None, help="pruning method (default: cls; fastv on qwen2vl-shapes)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="visual tokens kept per image")
    budget.add_argument("--keep-ratio", type=float, default=None,
                        help="fraction of visual tokens kept (default: 0.125 on reference models)")
    p.add_argument("--samples", type=int, default=100, help="test samples for the accuracy line (reference models)")
    p.add_argument("--show", type=int, default=2, help="samples whose kept tokens are drawn (reference models)")
    p.add_argument("--save", default=None, help="also write the kept-token pictures to this PNG file")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (tiny models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.family is not None:
        return run_tiny(args)
    return run_reference(args)


def run_reference(args: argparse.Namespace) -> int:
    import torch

    import tokprune
    from tokprune.data import ShapesVQA
    from tokprune.reference import load, read_meta
    from tokprune.reference.arch import GRID, image_size
    from tokprune.reference.evaluate import encode, family_of, predict
    from tokprune.viz import kept_picture, kept_text, side_by_side

    name = args.model or "llava-shapes"
    model, processor = load(name)
    family = family_of(model)
    method = args.method or ("cls" if family == "llava" else "fastv")
    keep, ratio = args.keep, args.keep_ratio
    if keep is None and ratio is None:
        ratio = 0.125
    budget = dict(keep=keep, keep_ratio=ratio)
    meta = read_meta(name)
    samples = list(ShapesVQA("test", n=args.samples, types=tuple(meta["question_types"])))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokprune {tokprune.__version__} demo: {name} (trained reference model, {n_params / 1e6:.2f}M "
          f"parameters), {args.samples} Shapes-VQA test samples")
    def score(answers: list[str]) -> float:
        return 100 * sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)

    base = predict(model, processor, samples)
    print(f"unpruned   : accuracy {score(base):5.1f}%")
    runs = {}  # method -> (answers, kept indices per sample)
    for label in [method] + (["random"] if method != "random" else []):
        kept: list[torch.Tensor] = []
        with tokprune.pruned(model, label, **budget):
            runs[label] = (predict(model, processor, samples, kept=kept), kept)
        print(f"{label:<11}: accuracy {score(runs[label][0]):5.1f}% keeping {kept[0].numel()} of {GRID * GRID} "
              "visual tokens" + ("  (the floor: any method should beat it)" if label == "random" else ""))

    answers, kept = runs[method]
    pictures = []
    print(f"kept tokens of {method} (# kept object, + kept background, o dropped object, . dropped background):")
    for s, k, a, b in zip(samples[: args.show], kept, answers, base):
        objects = s.scene.owners(GRID) > 0
        print(f"  {s.question} -> answer {s.answer}; unpruned {b}, {method} {a}")
        print("\n".join("    " + line for line in kept_text(k, GRID, objects).split("\n")))
        pictures.append(kept_picture(s.image(image_size(family)), k, GRID))
    if args.save:
        side_by_side(pictures).save(args.save)
        print(f"wrote {args.save}")

    with torch.no_grad():
        enc = encode(processor, family, samples[:8])
        ref = model(**enc).logits
        with tokprune.pruned(model, method, keep=GRID * GRID):
            full = model(**enc).logits
    agree = torch.equal(ref, full)
    print(f"keep-all   : {GRID * GRID} -> {GRID * GRID}, logits {'identical to' if agree else 'DIFFER from'} the "
          "unpruned model")
    return 0 if agree else 1


def run_tiny(args: argparse.Namespace) -> int:
    import torch

    import tokprune
    from tokprune.testing import image_prompt, make_image, tiny_model

    model, proc = tiny_model(args.family)
    method = args.method or "cls"
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

        with tokprune.pruned(model, method, keep=keep, keep_ratio=ratio):
            out = model.generate(**inputs, **gen)[0, n_prompt:]
            rec = tokprune.last_record(model)
        n_vis, n_kept = rec.n_visual[0][0], rec.n_kept[0][0]
        print(f"{method:<11}: visual tokens {n_vis} -> {n_kept} "
              f"(stages: {', '.join(s.kind + ('' if s.layer is None else f'@{s.layer}') for s in rec.stages)})")
        print(f"             kept indices {rec.kept[0][0].tolist()}")
        print(f"             generated {out.tolist()} ({'same as' if torch.equal(out, base) else 'differs from'} "
              "unpruned)")

        with tokprune.pruned(model, method, keep=n_vis):
            full = model.generate(**inputs, **gen)[0, n_prompt:]
        agree = torch.equal(full, base)
        print(f"keep-all   : {n_vis} -> {n_vis}, outputs {'identical to' if agree else 'DIFFER from'} the unpruned "
              "model")
    return 0 if agree else 1
