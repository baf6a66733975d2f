"""Two threads calling one patched model at once get what each gets alone (#29: concurrency).

Every family and every method it runs: two threads, started together by a barrier, each run their own prompt
(one a single image, the other a left-padded batch of two rows with three images) several times through the same
patched model: a forward (logits), the record ``tokprune.last_record`` gives that thread, and ``generate()``. Each
output is compared with the single-threaded result of the same prompt. The unpatched model passes the same test
(the control: the harness itself does not mix the threads' outputs).
"""

from __future__ import annotations

import threading

import pytest
import torch

import tokprune
import tokprune.api
from tokprune.testing import families, image_prompt, make_image, tiny_model

ROUNDS = 2
GEN = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
MODELS: dict[str, tuple] = {}


def _model(family: str) -> tuple:
    if family not in MODELS:
        MODELS[family] = tiny_model(family)
    return MODELS[family]


def _runs(family: str, method: str) -> bool:
    try:
        tokprune.api.schedule(_model(family)[0], method, keep=1, n_visual=16)
    except tokprune.UnsupportedError:
        return False
    return True


CASES = [(f, m) for f in families() for m in [None, *tokprune.methods()] if m is None or _runs(f, m)]


def _prompts(proc) -> list[dict]:
    a = proc(images=[make_image(112, 84, seed=0)], text=image_prompt(proc, 1, "what is in the image ?"),
             return_tensors="pt")
    imgs = [make_image(112, 84, seed=7), make_image(84, 112, seed=8), make_image(112, 112, seed=9)]
    texts = [image_prompt(proc, 2, "is there a red square in the picture , yes or no ?"),
             image_prompt(proc, 1, "what ?")]
    return [a, proc(images=imgs, text=texts, return_tensors="pt", padding=True)]


def _once(model, x: dict) -> tuple:
    """(logits, this thread's record's kept indices, generated ids) of one prompt."""
    with torch.no_grad():
        logits = model(**x).logits
        rec = tokprune.last_record(model) if tokprune.is_patched(model) else None
        kept = None if rec is None else [[k.tolist() for k in row] for row in rec.kept]
        tokens = model.generate(**x, **GEN)
    return logits, kept, tokens


def _stacked():
    """A vision method and two LLM methods with different signal sources (see tests/test_compose.py)."""
    from tokprune.registry import get_method

    return tokprune.Compose(vision="visionzip", llm=(get_method("fastv")(layer=1), get_method("pdrop")(layers=(2, 3))))


CASES += [("llava", "stacked"), ("qwen2_vl", "stacked")]


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_two_threads_get_what_each_gets_alone(family, method):
    model, proc = _model(family)
    method = _stacked() if method == "stacked" else method
    prompts = _prompts(proc)
    if method is not None:
        tokprune.apply(model, method, keep_ratio=0.5)
    try:
        want = [_once(model, x) for x in prompts]
        barrier = threading.Barrier(len(prompts))
        got: list[list[tuple]] = [[] for _ in prompts]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(ROUNDS):
                    got[i].append(_once(model, prompts[i]))
            except BaseException as e:  # re-raised below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tokprune.remove(model)
    if errors:
        raise errors[0]
    for i, (logits, kept, tokens) in enumerate(want):
        for g_logits, g_kept, g_tokens in got[i]:
            torch.testing.assert_close(g_logits, logits, rtol=0, atol=1e-6)
            assert g_kept == kept, f"prompt {i}: the record of another call"
            assert torch.equal(g_tokens, tokens), f"prompt {i}: generated tokens differ"
