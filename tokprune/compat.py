"""``python -m tokprune.compat --check``: is the installed transformers safe for tokprune?

The test suite proves exactness on the releases in :data:`tokprune.patches.compat.TESTED`. A user on a newer
release needs the same verdict without the repository's tests, so this module runs an exactness matrix of its
own on every family's tiny random model x every method: invariants that need no oracle, each of which one of
the breakages seen so far (transformers 5.24's ``cache`` rename among them) violates:

* ``keep_all``: keeping every token gives the unpatched model's logits, prefill and every generated step;
* ``cache``: a pruned ``generate()`` with the KV cache equals one that re-runs the whole prompt at each step
  (``use_cache=False``), so decode-time positions and masks are right;
* ``static``: a static cache gives the same steps as the dynamic one;
* ``batch``: two prompts with different images, left-padded into one batch, equal their single runs;
* ``eager``: eager attention selects the same tokens as SDPA;
* ``remove``: after ``tokprune.remove`` the model gives its original logits again.

It prints one line per family x method and a verdict; the exit code is 0 only when every check passed.
Untested releases are let through here (the point is to test them), without the warning ``apply`` gives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CHECKS = ("keep_all", "cache", "static", "batch", "eager", "remove")
TOL = 1e-5
N_NEW = 4


def _gen_kwargs(**extra: Any) -> dict[str, Any]:
    return dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True, **extra)


def _steps(out: Any) -> torch.Tensor:
    return torch.stack(list(out.logits), 1)  # (B, steps, vocab)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= TOL


def _inputs(proc: Any, sizes: list[tuple[int, int]], seed: int = 0) -> Any:
    from tokprune.testing import image_prompt, make_image

    images = [make_image(w, h, seed=seed + j) for j, (w, h) in enumerate(sizes)]
    return proc(images=images, text=image_prompt(proc, len(images)), return_tensors="pt")


QUESTIONS = ("what ?", "what is in the image ?")  # different lengths, so the batch needs padding


def _batch(proc: Any, rows: list[list[tuple[int, int]]], first: int = 0) -> Any:
    """Rows ``first, first+1, ...`` of the batch check, each with its own images and question, left-padded."""
    from tokprune.testing import image_prompt, make_image

    images = [make_image(w, h, seed=10 * (first + i) + j) for i, row in enumerate(rows) for j, (w, h) in enumerate(row)]
    texts = [image_prompt(proc, len(row), question=QUESTIONS[(first + i) % 2]) for i, row in enumerate(rows)]
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def _matches_recompute(model: Any, x: Any, cached: torch.Tensor, kept: list[list[torch.Tensor]]) -> bool:
    """Each cached decode step equals a full re-run (no cache) of the prompt plus the tokens generated so far.

    Steps where the re-run kept other tokens (a text-dependent method such as FastV sees a longer prompt) are not
    comparable and are skipped, and so is everything from a generated image / video placeholder id on (a re-run
    would count it as an image token); at least the first step always is (its re-run is the prefill itself).
    """
    import tokprune

    n = x["input_ids"].shape[1]
    per_token = {k: v for k, v in x.items() if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == n}
    media = {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")} - {None}
    compared = 0
    for t in range(cached.shape[1]):
        nxt = cached[:, :t].argmax(-1)
        if any(int(i) in media for i in nxt.flatten()):
            break  # a random tiny model generated an image / video id: a re-run would read it as a new placeholder
        fill = {"input_ids": nxt, "attention_mask": torch.ones_like(nxt)}  # text tokens: type 0 elsewhere
        grown = {k: torch.cat([v, fill.get(k, torch.zeros_like(nxt)).to(v.dtype)], 1) for k, v in per_token.items()}
        step = model(**{**x, **grown}, use_cache=False).logits[:, -1]
        again = tokprune.last_record(model).kept
        if any(not torch.equal(a, b) for ra, rb in zip(kept, again) for a, b in zip(ra, rb)):
            continue
        compared += 1
        if not _close(step, cached[:, t]):
            return False
    return compared > 0


def _budget(model: Any, proc: Any, method: str, x: Any) -> dict[str, Any]:
    """A budget that prunes about half of the smallest image's tokens."""
    import tokprune

    with tokprune.pruned(model, method, keep_ratio=1.0):
        model(**x)
        n = min(min(row) for row in tokprune.last_record(model).n_visual)
    return {"keep": max(1, n // 2)}


def _check_pair(family: str, method: str, model: Any, proc: Any, eager: Any) -> dict[str, bool]:
    import tokprune
    from tokprune.patches.compat import output_cache

    sizes = [(112, 84), (84, 112)] if family != "llava" else [(56, 56), (56, 56)]
    x = _inputs(proc, sizes)
    res: dict[str, bool] = {}
    with torch.no_grad():
        ref_logits = model(**x).logits
        ref_gen = _steps(model.generate(**x, **_gen_kwargs()))
        with tokprune.pruned(model, method, keep_ratio=1.0):
            same = _close(model(**x).logits, ref_logits)
            res["keep_all"] = same and _close(_steps(model.generate(**x, **_gen_kwargs())), ref_gen)
        budget = _budget(model, proc, method, x)
        with tokprune.pruned(model, method, **budget):
            cached = _steps(model.generate(**x, **_gen_kwargs()))
            kept = tokprune.last_record(model).kept
            res["cache"] = _matches_recompute(model, x, cached, kept)
            res["static"] = _close(cached, _steps(model.generate(**x, **_gen_kwargs(cache_implementation="static"))))
            rows = [[sizes[0]], sizes]
            both = _steps(model.generate(**_batch(proc, rows), **_gen_kwargs()))
            singles = [_steps(model.generate(**_batch(proc, [row], first=i), **_gen_kwargs()))[0]
                       for i, row in enumerate(rows)]
            res["batch"] = all(_close(both[i], s) for i, s in enumerate(singles))
        with tokprune.pruned(eager, method, **budget):
            eager(**x)
            kept_eager = tokprune.last_record(eager).kept
        res["eager"] = all(torch.equal(a, b) for ra, rb in zip(kept, kept_eager) for a, b in zip(ra, rb))
        out = model(**x, use_cache=True)
        res["remove"] = _close(out.logits, ref_logits) and output_cache(out) is not None
    return res


def check(families: list[str] | None = None, methods: list[str] | None = None,
          log: Callable[[str], None] = print) -> bool:
    """Run the matrix; log one line per family x method; return True when every check passed."""
    import transformers

    import tokprune
    from tokprune.patches.compat import TESTED
    from tokprune.testing import families as all_families
    from tokprune.testing import tiny_model

    log(f"transformers {transformers.__version__} (tested: {', '.join(TESTED)}), torch {torch.__version__}")
    ok = True
    for family in families or all_families():
        model, proc = tiny_model(family)
        eager, _ = tiny_model(family, attn="eager")
        for method in methods or tokprune.methods():
            t0 = time.perf_counter()
            try:
                tokprune.apply(model, method, keep_ratio=1.0)
            except tokprune.UnsupportedError:
                log(f"  {family:11s} {method:10s} n/a (the method cannot run on this family)")
                continue
            finally:
                tokprune.remove(model)
            try:
                res = _check_pair(family, method, model, proc, eager)
            except Exception as exc:  # a crash is a failed check, reported with its cause
                ok = False
                log(f"  {family:11s} {method:10s} FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            failed = [c for c in CHECKS if not res.get(c, False)]
            ok &= not failed
            verdict = "ok" if not failed else "FAIL: " + ", ".join(failed)
            log(f"  {family:11s} {method:10s} {verdict} ({time.perf_counter() - t0:.1f} s)")
    log("verdict: " + ("every check passed: tokprune is exact on this transformers" if ok else
                       "some checks FAILED: do not trust pruned results on this transformers; please report it"))
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokprune.compat", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="run the exactness matrix on the installed transformers")
    p.add_argument("--families", default=None, help="comma-separated families (default: all)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    args = p.parse_args(argv)
    if not args.check:
        p.print_help()
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.environ.setdefault("TOKPRUNE_ALLOW_UNTESTED_TRANSFORMERS", "1")
    import warnings

    warnings.filterwarnings("ignore", message="tokprune runs on transformers")
    fams = args.families.split(",") if args.families else None
    meths = args.methods.split(",") if args.methods else None
    return 0 if check(fams, meths) else 1


if __name__ == "__main__":
    sys.exit(main())
