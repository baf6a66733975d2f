"""Reliability around the core path (issue #29): no silent no-ops on unusual inputs, budgets given as numpy / torch
scalars, ``save_pretrained`` of a patched model, and ``tokprune.apply`` on a ``torch.compile``d model.

Each test failed before its fix: the checks compare with the unpatched (or uncompiled) model, never with a
hard-coded value.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_flowcut import deep_llava, llava_inputs, qwen_inputs, sharpen

import tokprune
from tokprune.testing import image_prompt, make_image, tiny_model

_CACHE: dict = {}


def cached(family: str):
    if family not in _CACHE:
        _CACHE[family] = tiny_model(family)
    return _CACHE[family]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for m, _ in _CACHE.values():
        tokprune.remove(m)


def inputs(proc, seed: int = 0):
    return proc(images=make_image(seed=seed), text=image_prompt(proc), return_tensors="pt")


# ---------------------------------------------------------------------------------------------- budgets and flags
@pytest.mark.parametrize("ratio", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5)],
                         ids=["np.float32", "np.float64", "torch"])
def test_keep_ratio_numpy_and_torch_scalars(ratio):
    model, proc = cached("llava")
    inp = inputs(proc)
    with torch.no_grad():
        tokprune.apply(model, "fastv", keep_ratio=0.5)
        want, want_rec = model(**inp).logits, tokprune.last_record(model)
        tokprune.apply(model, "fastv", keep_ratio=ratio)
        got, rec = model(**inp).logits, tokprune.last_record(model)
    assert model.tokprune.budget.keep_ratio == 0.5 and type(model.tokprune.budget.keep_ratio) is float
    assert rec.n_kept == want_rec.n_kept
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_keep_numpy_int_and_bad_scalars():
    model, _ = cached("llava")
    tokprune.apply(model, "fastv", keep=np.int64(4))
    assert model.tokprune.budget.keep == 4 and type(model.tokprune.budget.keep) is int
    with pytest.raises(ValueError, match="must be in"):
        tokprune.apply(model, "fastv", keep_ratio=np.float32(1.5))
    with pytest.raises(TypeError, match="keep must be an int"):
        tokprune.apply(model, "fastv", keep=np.bool_(True))


@pytest.mark.parametrize("method, option", [("fastv", {"record_scores": "no"}), ("fastv", {"record_scores": 1}),
                                            ("cdpruner", {"negate": "no"}), ("hiprune", {"wrap_rows": 0})])
def test_non_bool_flags_are_errors(method, option):
    """``record_scores`` was silently ``bool()``-ed; the methods' own flags were already checked (kept here)."""
    model, _ = cached("llava")
    with pytest.raises(TypeError, match=r"True .*or False"):
        tokprune.apply(model, method, keep=4, **option)
    assert not tokprune.is_patched(model)


# ---------------------------------------------------------------------------------------------- no silent no-ops
def test_image_tokens_without_pixel_values_name_the_fix():
    model, proc = cached("llava")
    inp = inputs(proc)
    tokprune.apply(model, "fastv", keep=4)
    with pytest.raises(ValueError, match="no pixel_values were passed.*pass the processor's pixel_values"):
        model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_inputs_embeds_without_pixels_warns_once_and_records(family):
    model, proc = cached(family)
    inp = inputs(proc)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inp["input_ids"])
        want = model(inputs_embeds=embeds, attention_mask=inp["attention_mask"]).logits
        tokprune.apply(model, "fastv", keep=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(inputs_embeds=embeds, attention_mask=inp["attention_mask"]).logits
            again = model(inputs_embeds=embeds, attention_mask=inp["attention_mask"]).logits
    mine = [w for w in caught if "tokprune cannot locate the image tokens" in str(w.message)]
    assert len(mine) == 1  # once per patch, not once per call
    rec = tokprune.last_record(model)
    assert rec is not None and rec.stages == [] and rec.seq_len == [inp["input_ids"].shape[1]]
    assert any("pruned nothing" in note for note in rec.notes)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # nothing pruned: the unpatched model's logits
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    with torch.no_grad():  # a normal prefill afterwards prunes and replaces the note-only record
        model(**inp)
    assert tokprune.last_record(model).stages and not tokprune.last_record(model).notes


# ---------------------------------------------------------------------------------------------- flowcut options
def test_flowcut_llm_layer_range_message_and_llava():
    model, _ = cached("qwen2_vl")
    n = model.config.get_text_config().num_hidden_layers
    with pytest.raises(ValueError, match=rf"llm_layer={n - 1} is out of range.*llm_layer in \[0, {n - 2}\]"):
        tokprune.apply(model, "flowcut", keep=4, llm_layer=n - 1)
    tokprune.apply(model, "flowcut", keep=4, llm_layer=n - 2)  # the last valid one
    assert model.tokprune.pruner.llm_layers(model.tokprune._adapter.info) == (n - 1,)
    tokprune.apply(model, "flowcut", keep=4)  # default: the reference's layer 1, cut before layer 2
    assert model.tokprune.pruner.llm_layers(model.tokprune._adapter.info) == (2,)
    llava, _ = cached("llava")
    with pytest.raises(ValueError, match="llm_layer=1 has no effect on llava"):
        tokprune.apply(llava, "flowcut", keep=4, llm_layer=1)
    tokprune.apply(llava, "flowcut", keep=4)


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_flowcut_nan_pixels_name_the_input(family):
    if family == "llava":
        model, proc = deep_llava()
        inp = llava_inputs(proc)
    else:
        model, proc = tiny_model(family)
        sharpen(model, 32.0)
        inp = qwen_inputs(proc)
    inp["pixel_values"] = torch.full_like(inp["pixel_values"], float("nan"))
    tokprune.apply(model, "flowcut", keep=4)
    with pytest.raises(ValueError, match="check pixel_values for NaN or inf"), torch.no_grad():
        model(**inp)


# ---------------------------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("family, method", [("llava_next", "visionzip"), ("qwen2_vl", "flowcut"),
                                            ("llava", "fastv")])
def test_save_pretrained_writes_the_unpatched_model(tmp_path: Path, family, method):
    model, proc = tiny_model(family)
    model.save_pretrained(tmp_path / "plain")
    tokprune.apply(model, method, keep=4)
    model.save_pretrained(tmp_path / "patched")
    assert tokprune.is_patched(model)  # saving leaves the live model patched
    text = (tmp_path / "patched" / "config.json").read_text()
    assert "tokprune" not in text
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    plain.pop("_name_or_path", None)
    saved = json.loads(text)
    saved.pop("_name_or_path", None)
    assert saved == plain
    reloaded = type(model).from_pretrained(tmp_path / "patched")
    assert not tokprune.is_patched(reloaded)
    tokprune.remove(model)
    want, got = model.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    inp = inputs(proc)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inp).logits, model(**inp).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- compile, then apply
@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_apply_on_compiled_model_patches_its_original_module(method):
    model, proc = tiny_model("llava")
    batches = [inputs(proc, seed) for seed in (0, 1, 2)]
    with torch.no_grad():
        plain = [model(**b).logits for b in batches]
        tokprune.apply(model, method, keep=4)
        want = [model(**b).logits for b in batches]
        want_kept = tokprune.last_record(model).stages[0].kept
        tokprune.remove(model)
        compiled = torch.compile(model, backend="eager")
        compiled(**batches[0])  # compiled (and cached) before the patch: the patch must still take effect
        assert tokprune.apply(compiled, method, keep=4) is compiled
        assert tokprune.is_patched(compiled) and tokprune.is_patched(model)
        got = [compiled(**b).logits for b in batches]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        kept = tokprune.last_record(compiled).stages[0].kept
        assert [[k.tolist() for k in row] for row in kept] == [[k.tolist() for k in row] for row in want_kept]
        tokprune.remove(compiled)
        assert not tokprune.is_patched(model)
        for b, p in zip(batches, plain):
            torch.testing.assert_close(compiled(**b).logits, p, rtol=1e-4, atol=1e-4)
