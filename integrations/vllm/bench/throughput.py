"""Throughput of vLLM serving LLaVA-1.5 pruned by tokprune against unpruned, offline (``LLM``), as ratios.

CPU (default): a LLaVA-1.5-7B-width model with random weights (vLLM's ``load_format="dummy"``), its LLM cut to
``--llm-layers`` decoder layers as in tokprune's CPU proxies (``tokprune/eval/proxy.py``: every layer keeps its
real shapes, so what pruning saves per layer carries over; the vision tower is the real 24-layer CLIP-L/336).
GPU (``--checkpoint llava-hf/llava-1.5-7b-hf``): the real model with its weights, when a GPU and the weights are
present.

Each configuration runs in its own process (a fresh engine) and reports:

* requests/s: ``--requests`` prompts (each its own random image, so the encoder runs for every one) submitted
  together, ``--max-tokens`` generated each;
* TTFT and decode tokens/s: medians over ``--repeats`` single requests, from vLLM's own per-request timestamps
  (``RequestOutput.metrics``: first-token latency; tokens after the first over the time from first to last);
* prompt tokens: the prompt the LLM ran on (576 visual tokens unpruned, ``keep`` pruned).

``--method`` takes one method or several, comma-separated (``cls,divprune``): the unpruned engine runs once and
each method is compared with it. ``integrations/vllm/bench/gpu.sh`` runs every servable method on the real
checkpoint.

    python integrations/vllm/bench/throughput.py --method cls --keep 64 --out results.md        # CPU proxy
    python integrations/vllm/bench/throughput.py --checkpoint llava-hf/llava-1.5-7b-hf --dtype bfloat16 \\
        --requests 64 --method cls,visionzip --keep 64 --out results-gpu.md                      # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
PROMPT = "user <image> what color is the circle ? assistant :"


def proxy_dir(llm_layers: int, out: Path) -> Path:
    """A loadable LLaVA-1.5-7B-width folder without weights: the real config with ``llm_layers`` decoder layers, a
    word-level tokenizer over the real vocabulary size (``<image>`` at id 32000) and the real processor settings."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    cfg = json.loads((ROOT / "tokprune/configs/llava-1.5-7b.json").read_text())
    cfg.pop("_source", None)
    cfg["text_config"]["num_hidden_layers"] = llm_layers
    cfg["dtype"] = "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    vocab = {f"w{i}": i for i in range(cfg["text_config"]["vocab_size"])}
    for name, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2), ("<image>", 32000), ("<pad>", 32001)):
        vocab.pop(f"w{i}")
        vocab[name] = i
    for i, word in enumerate(PROMPT.replace("<image>", "").split()):
        vocab.pop(f"w{100 + i}")
        vocab[word] = 100 + i
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "extra_special_tokens": ["<image>"], "model_max_length": 4096}))
    ip = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
          "do_normalize": True, "do_rescale": True, "do_resize": True,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
          "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
          "size": {"shortest_edge": 336}}
    (out / "processor_config.json").write_text(json.dumps({
        "image_processor": ip, "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
    return out


def images(n: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]


def measure(args: argparse.Namespace, method: str | None) -> dict[str, Any]:
    """One configuration in this process: a fresh engine, the three measurements."""
    from vllm import LLM, SamplingParams

    kw: dict[str, Any] = {"dtype": args.dtype, "max_model_len": 1024, "limit_mm_per_prompt": {"image": 1},
                          "enable_prefix_caching": False, "seed": 0, "max_num_seqs": args.requests,
                          "disable_log_stats": False}
    if args.checkpoint:
        model = args.checkpoint
    else:
        model = str(proxy_dir(args.llm_layers, Path(args.workdir) / "proxy"))
        kw["load_format"] = "dummy"
    if args.kv_cache_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_bytes
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if method:
        kw["hf_overrides"] = {"tokprune": {"method": method, "keep": args.keep}}
    llm = LLM(model=model, **kw)
    many = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    imgs = iter(images(args.requests + args.repeats + 1, seed=1))

    def req() -> dict[str, Any]:
        return {"prompt": PROMPT, "multi_modal_data": {"image": next(imgs)}}

    out = llm.generate([req()], many, use_tqdm=False)  # warm-up
    prompt_tokens = len(out[0].prompt_token_ids)
    ttft, decode = [], []
    for _ in range(args.repeats):  # one request at a time: vLLM's own per-request timestamps
        m = llm.generate([req()], many, use_tqdm=False)[0].metrics
        ttft.append(m.first_token_latency)
        decode.append((m.num_generation_tokens - 1) / max(1e-9, m.last_token_ts - m.first_token_ts))
    batch = [req() for _ in range(args.requests)]
    t0 = time.perf_counter()
    llm.generate(batch, many, use_tqdm=False)
    wall = time.perf_counter() - t0
    return {"method": method or "unpruned", "prompt_tokens": prompt_tokens, "ttft_s": statistics.median(ttft),
            "decode_tok_s": statistics.median(decode), "requests_s": args.requests / wall}


def table(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> str:
    """The markdown table: the unpruned engine's figures, then per method its figures and their ratio to it."""
    u = rows["unpruned"]
    methods = [m for m in rows if m != "unpruned"]
    what = (f"{args.checkpoint}" if args.checkpoint else
            f"LLaVA-1.5-7B-width proxy (random weights, LLM {args.llm_layers} of 32 layers, vision 24 of 24)")
    head = "".join(f" {m} keep={args.keep} | ratio |" for m in methods)
    lines = [f"vLLM offline, {what}, {args.dtype}, {device_name()}; {args.requests} requests x {args.max_tokens} "
             f"tokens; medians of {args.repeats}{'; ' + args.note if args.note else ''}", "",
             f"| | unpruned |{head}", "|---|---|" + "---|---|" * len(methods)]
    for key, label in (("requests_s", "requests/s"), ("ttft_s", "time to first token (s)"),
                       ("decode_tok_s", "decode tokens/s (one request)"), ("prompt_tokens", "prompt tokens")):
        cells = "".join(f" {rows[m][key]:.3g} | {rows[m][key] / u[key] if u[key] else float('nan'):.2f}x |"
                        for m in methods)
        lines.append(f"| {label} | {u[key]:.3g} |{cells}")
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="cls", help="a servable method, or several comma-separated")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--checkpoint", help="a real LLaVA-1.5 checkpoint (GPU variant); default: the CPU proxy")
    ap.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the CPU proxy (real: 32)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size (CPU: e.g. 1073741824)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--note", default="", help="conditions to print with the results (e.g. 'machine loaded')")
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # one configuration in this process: a method or "unpruned"
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(measure(args, None if args.one == "unpruned" else args.one)), flush=True)
        return 0
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="tokprune-vllm-bench-")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    rows = {}
    for which in ("unpruned", *methods):  # each configuration in its own process: a fresh engine
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", which,
               "--workdir", args.workdir]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(res.stdout[-3000:], res.stderr[-5000:])
            raise SystemExit(f"the {which} run failed")
        rows[which] = json.loads(line[0][7:])
        print(which, rows[which], flush=True)
    text = table(args, rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
