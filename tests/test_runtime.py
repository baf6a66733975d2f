"""The runtime's state: one object per prefill, nothing global that keeps a model alive.

* two prompts' prefills interleaved by hand on one patched model (prefill A, prefill B, decode A, decode B, ...)
  give the tokens each gives alone (a serving engine interleaves requests this way);
* a patched model dropped without ``tokprune.remove`` is garbage-collected.
"""

from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch

import tokprune
import tokprune.api
from tokprune.testing import image_prompt, make_image, tiny_model

STEPS = 5


def _prompt(proc, seed: int, question: str, n_images: int = 1) -> dict:
    imgs = [make_image(64, 48, seed=seed + j) for j in range(n_images)]
    return proc(images=imgs, text=image_prompt(proc, n_images, question), return_tensors="pt")


def _cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _batch(proc) -> dict:
    """Two prompts of different lengths, left-padded, one with two images."""
    imgs = [make_image(64, 48, seed=7), make_image(48, 64, seed=8), make_image(64, 64, seed=9)]
    texts = [image_prompt(proc, 2, "is there a red square in the picture , yes or no ?"),
             image_prompt(proc, 1, "what ?")]
    return proc(images=imgs, text=texts, return_tensors="pt", padding=True)


class Request:
    """One greedy generation (any batch) stepped by hand: :meth:`prefill`, then :meth:`step` per new token."""

    def __init__(self, model, x: dict) -> None:
        self.model, self.x = model, dict(x)
        self.tokens: list[list[int]] = []

    def prefill(self) -> None:
        out = self.model(**self.x, use_cache=True)
        self._take(out)
        self.mask = self.x["attention_mask"]

    def step(self) -> None:
        """One token, without ``position_ids`` (the model finds them: Qwen from its prefill's ``rope_deltas``), and
        without a mask when the prompt has no padding (Qwen then counts positions from the cache length)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        token = torch.tensor(self.tokens[-1])[:, None]
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        mask = None if bool(self.mask.all()) else self.mask
        out = self.model(input_ids=token, attention_mask=mask, use_cache=True, **{name: self.cache})
        self._take(out)

    def _take(self, out) -> None:
        self.cache = _cache(out)
        self.tokens.append(out.logits[:, -1].argmax(-1).tolist())


def _alone(model, x: dict) -> list[list[int]]:
    r = Request(model, x)
    r.prefill()
    for _ in range(STEPS):
        r.step()
    return r.tokens


@pytest.mark.parametrize("method,budget", [("fastv", {"keep": 4}), ("cls", {"keep": 5}),
                                           ("pdrop", {"keep_ratio": 0.5}), ("visionzip", {"keep": 6})])
def test_interleaved_prefills_match_each_alone(method, budget):
    model, proc = tiny_model("llava")
    a, b = _prompt(proc, 0, "what is in the image ?"), _batch(proc)
    assert not bool(b["attention_mask"].all())  # B is padded: its masks and dead slots differ from A's
    with torch.no_grad(), tokprune.pruned(model, method, **budget):
        want_a, want_b = _alone(model, a), _alone(model, b)
        ra, rb = Request(model, a), Request(model, b)
        ra.prefill()
        rb.prefill()
        for _ in range(STEPS):
            ra.step()
            rb.step()
        rec_b = tokprune.last_record(model)
    assert ra.tokens == want_a and rb.tokens == want_b
    assert [len(row) for row in rec_b.n_visual] == [2, 1]  # the last record is the last prefill's (B's)


FAMILY_METHODS = [(f, m) for f in ("llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
                  for m in ("fastv", "visionzip", "flowcut", "vflowopt")]
FAMILY_METHODS += [("llava", "flowcut"), ("llava", "vflowopt")]


def _family_prompts(family: str) -> tuple:
    model, proc = tiny_model(family)
    a = proc(images=[make_image(112, 84, seed=0)], text=image_prompt(proc, 1, "what is in the image ?"),
             return_tensors="pt")
    imgs = [make_image(112, 84, seed=7), make_image(84, 112, seed=8), make_image(112, 112, seed=9)]
    texts = [image_prompt(proc, 2, "is there a red square in the picture , yes or no ?"),
             image_prompt(proc, 1, "what ?")]
    return model, a, proc(images=imgs, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family,method", FAMILY_METHODS)
def test_interleaved_prefills_match_each_alone_on_every_family(family, method):
    """The interleaving on every family and with the in-encoder cut (FlowCut) and VFlowOpt: A's decode steps read
    A's state (its LLM run, Qwen's ``rope_deltas`` of A's prefill, not B's), and the hand loop's tokens are
    ``generate()``'s (which passes explicit positions), so the positions the patch finds are the right ones."""
    model, a, b = _family_prompts(family)
    assert bool(a["attention_mask"].all()) and not bool(b["attention_mask"].all())  # no-mask and mask decode paths
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5):
        want_a, want_b = _alone(model, a), _alone(model, b)
        gen = model.generate(**a, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1, do_sample=False)
        ra, rb = Request(model, a), Request(model, b)
        ra.prefill()
        rb.prefill()
        for _ in range(STEPS):
            ra.step()
            rb.step()
    assert ra.tokens == want_a and rb.tokens == want_b
    assert [t[0] for t in want_a] == gen[0, a["input_ids"].shape[1]:].tolist()


def test_interleaved_prefills_differ_from_each_other():
    """The two prompts of the interleaving test really generate differently (else it could not fail)."""
    model, proc = tiny_model("llava")
    a, b = _prompt(proc, 0, "what is in the image ?"), _batch(proc)
    with torch.no_grad(), tokprune.pruned(model, "fastv", keep=4):
        assert [row[0] for row in _alone(model, a)] != [row[0] for row in _alone(model, b)]


@pytest.mark.parametrize("method", ["fastv", "hiprune", "pdrop"])
def test_a_dropped_patched_model_is_collected(method):
    """Nothing global holds a patched model: dropped without ``remove()`` and after a forward, it is freed."""
    model, proc = tiny_model("llava")
    with torch.no_grad():
        tokprune.apply(model, method, keep_ratio=0.5)
        model(**_prompt(proc, 0, "what is in the image ?"))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("method", tokprune.api.methods())
def test_record_scores_for_every_method(method):
    """``record_scores=True`` works for every method: a stage whose method scores tokens (defines
    ``vision_scores`` / ``llm_scores``, whether it selects by the default top-k or its own ``select_*``) records those
    scores over each image's original tokens, finite at every kept token; a stage that selects without a per-token
    score (CATP's facility location, FlowCut's in-encoder survivors) records None."""
    from tokprune.registry import get_method

    model, proc = tiny_model("llava")
    cls = get_method(method)
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5, record_scores=True):
        model(**_prompt(proc, 0, "what is in the image ?"))
        rec = tokprune.last_record(model)
    assert rec.stages
    for st in rec.stages:
        scorer = "vision_scores" if st.kind == "vision" else "llm_scores"
        scores_tokens = vars(cls).get(scorer) is not None or any(
            scorer in vars(k) for k in cls.__mro__[1:] if k is not tokprune.Pruner and k is not object)
        assert (st.scores is not None) == scores_tokens, (st.kind, st.layer)
        if st.scores is not None:
            s = st.scores[0][0]
            assert s.shape == (rec.n_visual[0][0],) and bool(torch.isfinite(s[st.kept[0][0]]).all())


@pytest.mark.parametrize("method", ["fastv", "cls"])
def test_two_threads_share_one_patched_model(method):
    """Two threads generating on one patched model at once (a per-thread forward state, per-thread encoder
    signals) get what each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    model, proc = tiny_model("llava")
    a, b = _prompt(proc, 0, "what is in the image ?"), _batch(proc)
    with torch.no_grad(), tokprune.pruned(model, method, keep=4):
        want = [_alone(model, a), _alone(model, b)]

        def run(x):
            with torch.no_grad():
                return [_alone(model, x) for _ in range(3)]

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(run, [a, b]))
    assert all(g == want[0] for g in got[0]) and all(g == want[1] for g in got[1])


@pytest.mark.parametrize("base", ["fastv", "hiprune", "pdrop"])
def test_the_schedule_runs_once_per_image_size_and_prefill(base):
    """Budgets are computed once per prefill (one schedule per distinct image size), not again by each stage."""
    from dataclasses import dataclass

    from tokprune.registry import get_method

    calls = []

    @dataclass
    class Counting(get_method(base)):
        def schedule(self, info, n_visual, keep, keep_ratio=None):
            calls.append(n_visual)
            return super().schedule(info, n_visual, keep, keep_ratio)

    model, proc = tiny_model("llava")  # every LLaVA-1.5 image has the same tokens: one size
    with torch.no_grad(), tokprune.pruned(model, Counting(), keep=4):
        calls.clear()
        model(**_batch(proc))  # three images in two rows
    assert calls == [16]
