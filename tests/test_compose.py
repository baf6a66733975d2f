"""Composition: a vision method, then an LLM method on its survivors (``tokprune.Compose``, ``"a+b"``).

References hold no composition code: the vision method run alone, and the LLM method run alone on the model fed
only the vision survivors (``oracles.encode`` features of the kept tokens, the image's other token ids removed).
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokprune
import tokprune.api
from tokprune.commands.args import check_methods
from tokprune.testing import image_prompt, make_image, tiny_model

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
#: (vision, llm) pairs covering plain keep sets, merged tokens (visionzip) and probe / multi-stage LLM methods
PAIRS = [("cls", "fastv"), ("visionzip", "transprune"), ("hiprune", "pdrop")]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llava")


@pytest.fixture(autouse=True)
def _unpatched(tiny):
    yield
    tokprune.remove(tiny[0])


def _inputs(proc, seed: int = 0):
    return proc(images=[make_image(64, 48, seed=seed)], text=image_prompt(proc, 1), return_tensors="pt")


def _record(model, x, method, **budget):
    with torch.no_grad(), tokprune.pruned(model, method, **budget):
        logits = model(**x).logits
        return logits, tokprune.last_record(model)


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_keep_all_is_identical(tiny, vision, llm):
    model, proc = tiny
    x = _inputs(proc)
    with torch.no_grad():
        want = model(**x).logits
    got, rec = _record(model, x, tokprune.Compose(vision=vision, llm=llm), keep_ratio=1.0)
    assert torch.equal(got, want)
    assert [s.kind for s in rec.stages][0] == "vision" and len(rec.stages) >= 2


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_vision_stage_equals_the_vision_method_alone(tiny, vision, llm):
    model, proc = tiny
    x = _inputs(proc, seed=3)
    _, alone = _record(model, x, vision, keep=8)
    _, both = _record(model, x, tokprune.Compose(vision=vision, llm=llm, vision_keep=8), keep=4)
    assert torch.equal(both.stages[0].kept[0][0], alone.stages[0].kept[0][0])
    assert (both.merged is None) == (alone.merged is None)
    assert both.n_kept[0][0] == 4 and [s.kind for s in both.stages[1:]] == ["llm"] * (len(both.stages) - 1)


@pytest.mark.parametrize("vision,llm", [("cls", "fastv"), ("hiprune", "pdrop")])
def test_llm_cut_equals_the_llm_method_on_the_survivors(tiny, vision, llm):
    """The composition's logits and LLM cuts equal the LLM method alone on the model fed the vision survivors (9 of
    them: the LLaVA adapter reads a fed image as a square grid, which these LLM methods do not use)."""
    model, proc = tiny
    x = _inputs(proc, seed=5)
    got, both = _record(model, x, tokprune.Compose(vision=vision, llm=llm, vision_keep=9), keep=4)
    kept = both.stages[0].kept[0][0]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True).pooler_output
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[img] = False
    keep[img[kept]] = True
    fed = {"input_ids": ids[keep][None], "attention_mask": x["attention_mask"][:, keep],
           "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[feats[0][kept]])}}
    # one position mode runs a prefill: the composition's is the vision method's ("compact" on LLaVA)
    want, alone = _record(model, fed, llm, keep=4, positions="compact")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(both.stages) == len(alone.stages) + 1
    for st_both, st_alone in zip(both.stages[1:], alone.stages):
        assert st_both.layer == st_alone.layer
        assert torch.equal(st_both.kept[0][0], kept[st_alone.kept[0][0]])  # survivors' indices -> original


def test_record_scores_flops_and_name(tiny):
    model, proc = tiny
    x = _inputs(proc)
    c = tokprune.Compose(vision="cls", llm="fastv", vision_keep=8)
    with torch.no_grad(), tokprune.pruned(model, c, keep=4, record_scores=True):
        model(**x)
        rec = tokprune.last_record(model)
    assert rec.method == "cls+fastv"
    assert [(s.kind, s.kept[0][0].numel()) for s in rec.stages] == [("vision", 8), ("llm", 4)]
    for st in rec.stages:  # each stage's scores over the image's original tokens, NaN where it scored none
        scores = st.scores[0][0]
        assert scores.shape == (rec.n_visual[0][0],) and bool(torch.isfinite(scores[st.kept[0][0]]).all())
    assert int(torch.isfinite(rec.stages[1].scores[0][0]).sum()) == 8  # FastV scored the 8 survivors
    layers = rec.flops.llm_layers  # the FLOPs counted from the record see both cuts: fewer tokens after FastV's layer
    assert layers[0] > layers[-1]


def test_generate_batch_with_padding_and_static_cache(tiny):
    model, proc = tiny
    imgs = [make_image(64, 48, seed=1), make_image(48, 64, seed=2)]
    texts = [image_prompt(proc, 1, "is there a red square in the picture , yes or no ?"), image_prompt(proc, 1)]
    batch = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad(), tokprune.pruned(model, "cls+fastv", keep=4):
        out = model.generate(**batch, **GEN)[:, -4:]
        static = model.generate(**batch, cache_implementation="static", **GEN)[:, -4:]
        for row, (img, text) in enumerate(zip(imgs, texts)):
            alone = model.generate(**proc(images=[img], text=text, return_tensors="pt"), **GEN)[:, -4:]
            assert torch.equal(out[row], alone[0])
    assert torch.equal(out, static)


def test_names_and_refusals(tiny):
    model, _ = tiny
    check_methods(["visionzip+transprune", "cls"])
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(["visionzip+nothing"])
    with pytest.raises(ValueError, match="LLM stages only"):
        tokprune.apply(model, tokprune.Compose(vision="cls", llm="hiprune"), keep=4)
    with pytest.raises(ValueError, match="vision stage and no LLM stage"):
        tokprune.apply(model, tokprune.Compose(vision="fastv", llm="pdrop"), keep=4)
    with pytest.raises(ValueError, match="cannot be composed"):
        tokprune.Compose(vision="cls", llm="catp")
    with pytest.raises(ValueError, match="vision_keep"):
        tokprune.Compose(vision_keep=0)
    sched = tokprune.api.schedule(model, "visionzip+transprune", keep=4)
    assert sched.stages[0].kind == "vision" and sched.stages[-1].keep == 4


def test_cli_show_takes_a_composition(tmp_path):
    """``tokprune show --methods cls+fastv`` draws the composition's kept tokens (every stage in its record)."""
    from tokprune.cli import main

    out = tmp_path / "kept.png"
    assert main(["show", "--model", "tiny:llava", "--methods", "cls,cls+fastv", "--keep", "4", "--out", str(out)]) in (
        0, None)
    assert out.is_file() and out.stat().st_size > 0


def test_eval_accepts_a_composition():
    """``tokprune eval --methods cls+fastv``: the argument check knows the name; a composition takes no
    ``flops_ratio`` budget (its budget is the final count)."""
    from tokprune.eval.validate import EvalArgumentError, method_names, supports_flops_ratio
    from tokprune.pruners.compose import composed_names

    assert composed_names("cls+fastv", method_names()) and not composed_names("cls+cls+fastv", method_names())
    assert not supports_flops_ratio("visionzip+transprune") and supports_flops_ratio("transprune")
    assert issubclass(EvalArgumentError, ValueError)
