"""``tokprune tune``: search a method's hyper-parameters for the pruned model closest to the unpruned one.

    tokprune tune --method hiprune --model llava-shapes --data shapes --samples 30 --target-ratio 0.25 \\
                  --trials 50 --seed 0 --out cfg.json

then ``tokprune.apply(model, config="cfg.json")``. The objective, the layer-averaged budget and the samplers are
described in :mod:`tokprune.eval.tune`. Every argument is checked before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tokprune.commands.args import check_methods, check_writable, kept_fraction, positive_int
from tokprune.commands.bench import DTYPES

DEFAULT_MODEL = "llava-shapes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_QUESTION = "Describe the image in detail."
#: :data:`tokprune.eval.tune.SAMPLERS`, repeated here so that ``tokprune -h`` imports no torch (a test checks both)
SAMPLERS = ("tpe", "gp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="search a method's hyper-parameters (VFlowOpt's visual-information-flow optimiser)",
        description="Bayesian optimisation (Optuna) of a method's declared search space: maximise the mean cosine "
                    "similarity of the last prompt token's final hidden state with and without pruning over "
                    "unlabeled samples, at a layer-averaged kept fraction of the visual tokens; the best "
                    "configuration is written as JSON for tokprune.apply(model, config=...). Needs "
                    "pip install 'tokprune[tune]'.")
    p.add_argument("--method", required=True, help="a method with a search space (e.g. hiprune, visionzip, fastv)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="llava-shapes, qwen2vl-shapes (shipped reference models), a hub id or a local directory "
                        "(default: llava-shapes)")
    p.add_argument("--data", default="shapes",
                   help="shapes (Shapes-VQA training samples), a local data set (as tokprune eval: save_to_disk, "
                        "parquet, a folder with data.jsonl; answers are ignored) or a folder of images "
                        "(default: shapes)")
    p.add_argument("--samples", type=positive_int, default=30, help="samples the objective averages over (30)")
    p.add_argument("--target-ratio", type=kept_fraction, default=0.25,
                   help="layer-averaged fraction of each image's visual tokens kept (default 0.25)")
    p.add_argument("--trials", type=positive_int, default=50, help="evaluated configurations (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe (default) or gp (Gaussian process, the paper's kind; needs scipy)")
    p.add_argument("--out", required=True, help="the tuned configuration, a .json file")
    p.add_argument("--question", default=DEFAULT_QUESTION,
                   help=f"prompt for a folder of images (default: {DEFAULT_QUESTION!r})")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--template", help="prompt with {question} and <image>, for processors without a chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- validation
def check_data(spec: str) -> str:
    """``"shapes"``, ``"dataset"`` or ``"images"``: what ``--data`` names (it must exist)."""
    if spec == "shapes":
        return "shapes"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {spec}: does not exist; pass shapes, a data set or a folder of images")
    if path.is_dir() and not any((path / f).exists() for f in ("data.jsonl", "dataset_dict.json", "state.json")) \
            and not list(path.glob("*.parquet")):
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            raise ValueError(f"--data {spec}: a folder with neither data (data.jsonl, parquet, save_to_disk) nor "
                             f"images ({', '.join(IMAGE_SUFFIXES)})")
        return "images"
    return "dataset"


def check(args: argparse.Namespace) -> Any:
    """Everything that can be checked without the weights; returns the model's config."""
    from tokprune.eval.models import resolve_config
    from tokprune.eval.tune import require_optuna, search_space, tunable_methods

    check_methods([args.method])
    if not search_space(args.method):
        raise ValueError(f"--method {args.method}: declares no search space (nothing numeric to tune); tunable "
                         f"methods: {', '.join(tunable_methods())}")
    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: pass a .json file name, e.g. cfg.json")
    check_writable(args.out, "--out")
    check_data(args.data)
    try:
        config = resolve_config(args.model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {args.model}: {e}") from None
    from tokprune.api import make_pruner, model_info

    try:
        make_pruner(args.method, {}).check(model_info(config))
    except TypeError as e:  # not a supported model class
        raise ValueError(f"--model {args.model}: {e}") from None
    require_optuna(args.sampler)
    return config


# ----------------------------------------------------------------------------------------------- data
def load_samples(spec: str, n: int, bundle: Any, question: str) -> tuple[list[str], list[Any]]:
    """``(prompts, images)`` of the first ``n`` samples of ``--data``."""
    kind = check_data(spec)
    if kind == "shapes":  # training samples, as the paper tunes on training data; test stays for accuracy
        from tokprune.data import ShapesVQA

        samples = list(ShapesVQA("train", n=n))
        return [bundle.prompt(s.question) for s in samples], [s.image(bundle.image_size or 64) for s in samples]
    if kind == "images":
        from tokprune.data.images import open_rgb

        files = sorted(p for p in Path(spec).expanduser().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        return [bundle.prompt(question)] * len(files), [open_rgb(f) for f in files]
    from tokprune.eval.tasks import load_task

    examples = load_task(spec, limit=n).examples
    return [bundle.prompt(e.question) for e in examples], [e.image(bundle.image_size) for e in examples]


def run(args: argparse.Namespace) -> int:
    from tokprune.eval.tune import tune

    try:
        check(args)
    except ImportError as e:
        print(f"tokprune tune: error: {e}", file=sys.stderr)
        return 2
    import torch

    from tokprune.eval.models import load
    from tokprune.eval.predict import encode

    dtype = getattr(torch, args.dtype) if args.dtype else None
    bundle = load(args.model, device=args.device, dtype=dtype, attn=args.attn, template=args.template)
    prompts, images = load_samples(args.data, args.samples, bundle, args.question)
    batches = [encode(bundle, prompts[i:i + args.batch_size], images[i:i + args.batch_size])
               for i in range(0, len(prompts), args.batch_size)]
    result = tune(bundle.model, batches, args.method, args.target_ratio, args.trials, args.seed, args.sampler,
                  progress=not args.no_progress)
    result.model, result.data = args.model, args.data
    result.save(args.out)
    options = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.options.items())
    default = "infeasible" if result.default_objective is None else f"{result.default_objective:.5f}"
    print(f"{args.method}: objective {result.objective:.5f} (default config: {default}) with {options} at "
          f"keep_ratio={result.keep_ratio:.4g} (layer average {result.layer_average_ratio:.4f}, target "
          f"{result.target_ratio}); {result.feasible_trials}/{result.trials} trials feasible, {result.samples} "
          f"samples, {result.seconds:.0f} s")
    print(f"wrote {args.out}: tokprune.apply(model, config={args.out!r})")
    return 0
