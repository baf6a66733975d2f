"""``torch.compile`` and tokprune (issue #29, item 3).

* **Apply, then compile**, every method on tiny LLaVA-1.5 and Qwen2-VL with ``aot_eager`` (TorchDynamo and
  AOTAutograd; the ``eager`` backend runs a subset of that path), and ``inductor`` on the combinations that failed
  before plus two others: the compiled model's logits and kept tokens equal the uncompiled patched model's over
  three different images. Before the fix, 7 combinations raised "the vision encoder ran without tokprune's taps"
  and dart returned wrong logits: TorchDynamo traced tokprune's hooks and lost their side effects.
* **Compile, then apply** (``apply`` on an ``OptimizedModule`` patches ``_orig_mod``), on every backend, and a
  method switched on a model already compiled: before the fix the compiled code kept running the previous patch
  (TorchDynamo does not guard on nn-module hooks), giving wrong shapes or a missing-rows error.

Every check runs with ``fail_on_recompile_limit_hit`` and counts the frames compiled, so a case cannot pass by
silently falling back to eager execution. The full matrix, the ``inductor`` cases and the compile-then-apply test
are marked ``compile_matrix``: CI runs them on the newest transformers release only (minutes on a 2-core CPU); the
other cases run on every release (tests/test_reliability.py also compiles, then applies, on every release).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tokprune
from tokprune.pruners.base import UnsupportedError
from tokprune.testing import image_prompt, make_image, tiny_model

SEEDS = (0, 1, 2)
TOL = 1e-4
_CACHE: dict = {}

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="inductor on CPU needs a C++ compiler (apt-get install g++)")


def cached(family: str):
    if family not in _CACHE:
        model, proc = tiny_model(family)
        batches = [proc(images=make_image(seed=s), text=image_prompt(proc), return_tensors="pt") for s in SEEDS]
        _CACHE[family] = model, batches
    return _CACHE[family]


@pytest.fixture(autouse=True)
def _clean():
    yield
    for model, _ in _CACHE.values():
        tokprune.remove(model)
    torch.compiler.reset()


def strict():
    """Compile with a recompile limit no test reaches, failing rather than falling back to eager past it."""
    return torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096,
                                      fail_on_recompile_limit_hit=True)


def kept(model) -> list:
    rec = tokprune.last_record(model)
    return [[[k.tolist() for k in row] for row in st.kept] for st in rec.stages]


def patched_runs(model, batches) -> tuple[list[torch.Tensor], list]:
    """Logits and kept tokens of the uncompiled patched model, one image prompt at a time."""
    logits, kepts = [], []
    for b in batches:
        logits.append(model(**b).logits)
        kepts.append(kept(model))
    return logits, kepts


def assert_same_runs(compiled, model, batches, want: list[torch.Tensor], want_kept: list) -> None:
    for b, w, wk in zip(batches, want, want_kept):
        got = compiled(**b).logits
        assert got.shape == w.shape
        torch.testing.assert_close(got, w, rtol=TOL, atol=TOL)
        assert kept(model) == wk


def apply_then_compile(family: str, method: str, backend: str) -> None:
    model, batches = cached(family)
    try:
        tokprune.apply(model, method, keep_ratio=0.5)
    except UnsupportedError:
        pytest.skip(f"{method} does not run on {family} (refused by apply, compiled or not)")
    with torch.no_grad(), strict():
        want, want_kept = patched_runs(model, batches)
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter)
        assert_same_runs(compiled, model, batches, want, want_kept)
    assert counter.frame_count > 0  # something was compiled and ran compiled


METHODS = tokprune.methods()


@pytest.mark.compile_matrix
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_apply_then_compile_aot_eager_every_method(family, method):
    apply_then_compile(family, method, "aot_eager")


@pytest.mark.parametrize("family, method", [("llava", "flowcut"), ("llava", "vflowopt"), ("qwen2_vl", "hiprune"),
                                            ("qwen2_vl", "visionzip")])
def test_apply_then_compile_aot_eager_failed_before(family, method):
    """Combinations that raised before the hooks ran outside the compiler (every release; the full matrix above
    holds them too)."""
    apply_then_compile(family, method, "aot_eager")


@pytest.mark.compile_matrix
@needs_cxx
@pytest.mark.parametrize("family, method", [("llava", "flowcut"), ("qwen2_vl", "vflowopt"), ("llava", "fastv"),
                                            ("qwen2_vl", "visionzip")])
def test_apply_then_compile_inductor(family, method):
    apply_then_compile(family, method, "inductor")


@pytest.mark.parametrize("family, method", [("llava", "cls"),
                                            pytest.param("qwen2_vl", "pdrop", marks=pytest.mark.compile_matrix)])
def test_apply_then_compile_eager_backend(family, method):
    apply_then_compile(family, method, "eager")


@pytest.mark.compile_matrix
@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=needs_cxx)])
def test_compile_then_apply_and_switch_methods(backend):
    """``apply`` on the compiled wrapper patches its original module, after the wrapper has already compiled and
    run unpatched; then another method (with LLM taps and stages) replaces the first on the compiled model, and
    ``remove`` gives the unpatched logits again. Each step must run the current hooks, not the code compiled under
    the previous ones."""
    model, batches = cached("llava")
    with torch.no_grad():
        plain = [model(**b).logits for b in batches]
        wants = {}
        for method in ("visionzip", "sparsevlm"):
            tokprune.apply(model, method, keep_ratio=0.5)
            wants[method] = patched_runs(model, batches)
            tokprune.remove(model)
        with strict():
            counter = CompileCounterWithBackend(backend)
            compiled = torch.compile(model, backend=counter)
            compiled(**batches[0])  # compiled unpatched
            for method in ("visionzip", "sparsevlm"):
                assert tokprune.apply(compiled, method, keep_ratio=0.5) is compiled
                assert tokprune.is_patched(compiled) and tokprune.is_patched(model)
                assert_same_runs(compiled, model, batches, *wants[method])
            tokprune.remove(compiled)
            assert not tokprune.is_patched(model)
            for b, p in zip(batches, plain):
                torch.testing.assert_close(compiled(**b).logits, p, rtol=TOL, atol=TOL)
    assert counter.frame_count > 0
