"""``copy.deepcopy`` of a patched model (issue #29, item 4): the copy carries a patch of its own.

Before the fix a copy failed at once (``cannot pickle '_thread._local'``); before per-prefill state it claimed to be
patched and failed on its first call (its taps and LLaVA-NeXT's wrapper still pointed at the original). Each check
compares with the uncopied model, never with a hard-coded value: the copy gives the original's logits and kept
tokens, runs its own modules (the original's weights changed after the copy do not reach it), leaves the
original's record alone, and ``tokprune.remove(copy)`` gives the unpatched logits while the original stays patched
and working.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import tokprune
from tokprune.pruners.base import UnsupportedError
from tokprune.signals import TAP_ATTR
from tokprune.testing import image_prompt, make_image, tiny_model

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
METHODS = ["fastv", "flowcut", "visionzip"]  # an LLM stage; an encoder cut with an LLM cut on Qwen; vision taps


def inputs(proc, seed: int):
    return proc(images=make_image(seed=seed), text=image_prompt(proc), return_tensors="pt")


def kept(model) -> list:
    return [[[k.tolist() for k in row] for row in st.kept] for st in tokprune.last_record(model).stages]


def hooks(model) -> int:
    """Forward hooks, attention taps and instance-level wrappers on the model's modules."""
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks) + (TAP_ATTR in vars(m))
        n += sum(name in vars(m) for name in ("pack_image_features", "get_image_features", "__deepcopy__"))
    return n


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_of_a_patched_model_has_its_own_patch(family, method):
    model, proc = tiny_model(family)
    a, b = inputs(proc, 0), inputs(proc, 1)
    with torch.no_grad():
        plain = model(**a).logits
        bare = hooks(model)  # after a forward: transformers adds hooks of its own at the first call
        try:
            tokprune.apply(model, method, keep_ratio=0.5)
        except UnsupportedError as e:
            pytest.skip(f"{method} does not run on {family}: {e}")
        want_a, kept_a = model(**a).logits, kept(model)
        want_b, kept_b = model(**b).logits, kept(model)
        assert not torch.equal(want_a, plain)  # the method pruned something
        record = tokprune.last_record(model)

        clone = copy.deepcopy(model)
        assert tokprune.is_patched(clone) and clone.tokprune.pruner is not model.tokprune.pruner
        assert clone.tokprune.pruner == model.tokprune.pruner and clone.tokprune.budget == model.tokprune.budget
        assert kept(clone) == kept_b  # the last record came along
        torch.testing.assert_close(clone(**a).logits, want_a, rtol=0, atol=0)
        assert kept(clone) == kept_a
        assert tokprune.last_record(model) is record  # the copy's prefill wrote its own record
        torch.testing.assert_close(model(**b).logits, want_b, rtol=0, atol=0)  # the original still works
        assert kept(clone) == kept_a and kept(model) == kept_b

        tokprune.remove(clone)
        assert not tokprune.is_patched(clone) and hooks(clone) == bare
        torch.testing.assert_close(clone(**a).logits, plain, rtol=0, atol=0)
        assert tokprune.is_patched(model)  # removing the copy's patch leaves the original's
        torch.testing.assert_close(model(**a).logits, want_a, rtol=0, atol=0)
        assert kept(model) == kept_a

        # a second copy runs its own modules: the original's encoder changed afterwards does not reach it
        second = copy.deepcopy(model)
        for p in model.tokprune._adapter.vision_tower.parameters():
            p.mul_(1.5)
        assert not torch.allclose(model(**a).logits, want_a)
        torch.testing.assert_close(second(**a).logits, want_a, rtol=0, atol=0)
        assert kept(second) == kept_a
        # a copy of a copy, its source and the original gone
        third = copy.deepcopy(second)
        del second, model
        gc.collect()
        torch.testing.assert_close(third(**b).logits, want_b, rtol=0, atol=0)
        assert kept(third) == kept_b


def test_deepcopy_of_a_copy_removed_then_reapplied():
    """A copy's patch can be replaced like any other: remove, apply another method, and copy again."""
    model, proc = tiny_model("llava_next")
    a = inputs(proc, 0)
    with torch.no_grad():
        tokprune.apply(model, "cls", keep_ratio=0.5)
        clone = copy.deepcopy(model)
        tokprune.apply(clone, "fastv", keep_ratio=0.25)
        want = clone(**a).logits
        tokprune.remove(model)
        again = copy.deepcopy(clone)
        assert again.tokprune.pruner.name == "fastv"
        torch.testing.assert_close(again(**a).logits, want, rtol=0, atol=0)
        assert not tokprune.is_patched(model)
