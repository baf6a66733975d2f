"""Composition: a vision method, then an LLM method on its survivors (``tokprune.Compose``, ``"a+b"``).

References hold no composition code: the vision method run alone, and the LLM method run alone on the model fed
only the vision survivors (``oracles.encode`` features of the kept tokens, the image's other token ids removed).
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import oracles
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

    assert composed_names("cls+fastv", method_names()) and composed_names("visionzip+fastv+dart", method_names())
    assert not composed_names("cls+nothing", method_names()) and not composed_names("cls", method_names())
    assert not supports_flops_ratio("visionzip+transprune") and supports_flops_ratio("transprune")
    assert issubclass(EvalArgumentError, ValueError)


# ---------------------------------------------------------------------------------------------- two LLM methods
# Each LLM stage asks for its own decoder signals: FastV the last token's row of layer K-1 as it ran, DART the keys
# of layer K-1 and the final-norm hidden states, PyramidDrop a probe of layer K itself. The references below run no
# composition code: the unpatched model under the masking oracle of the earlier cuts (oracles.CutMask: the dropped
# tokens hidden as keys from their cut on, which is what feeding only the survivors to later layers means with
# original positions), each method's own rule recomputed from eager attention / SDPA's keys.

def _stack(*methods, **kw):
    return tokprune.Compose(vision=None, llm=methods, **kw)


def _llm(name, **opts):
    from tokprune.registry import get_method

    return get_method(name)(**opts)


def _image_mask(ids, image_id, kept_abs):
    m = ids != image_id
    m[kept_abs] = True
    return m[None]


@pytest.mark.parametrize("methods", [(("fastv", {"layer": 1}), ("dart", {"layer": 2})),
                                     (("pdrop", {"layers": (1, 2)}), ("fastv", {"layer": 3})),
                                     (("dart", {"layer": 1}), ("pdrop", {"layers": (2, 3)})),
                                     (("fastv", {"layer": 1}), ("sparsevlm", {"layers": (2, 3), "counts": (8, 4)}))])
def test_two_llm_methods_keep_all_is_identical(tiny, methods):
    model, proc = tiny
    x = _inputs(proc)
    with torch.no_grad():
        want = model(**x).logits
    c = _stack(*(_llm(n, **o) for n, o in methods))
    got, rec = _record(model, x, c, keep_ratio=1.0)
    assert torch.equal(got, want)
    assert [s.kind for s in rec.stages] == ["llm"] * len(rec.stages) and len(rec.stages) >= 2


@torch.no_grad()
def test_fastv_then_dart_each_cut_equals_the_method_alone_on_the_previous_survivors(tiny):
    """Different signal sources in one prefill: FastV (last-token row of layer 0) cuts 16 -> 14 before layer 1, DART
    (keys of layer 1, final-norm states entering layer 2) 14 -> 12 before layer 2. FastV's cut equals FastV alone;
    DART's equals the authors' rule (tests/test_dart.py) run on the survivors of FastV's cut, and the logits equal the
    unpatched model under both cuts."""
    from test_dart import LayerKeys, authors_rule

    model, proc = tiny
    x = _inputs(proc, seed=4)
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    c = _stack(_llm("fastv", layer=1), _llm("dart", layer=2), llm_keep=14)
    got, rec = _record(model, x, c, keep=12)
    _, alone = _record(model, x, _llm("fastv", layer=1), keep=14)
    assert [(s.layer, s.kept[0][0].numel()) for s in rec.stages] == [(1, 14), (2, 12)]
    first = rec.stages[0].kept[0][0]
    assert torch.equal(first, alone.stages[0].kept[0][0])
    # DART alone on the survivors: layer 1's keys and the hidden states entering layer 2, under FastV's cut
    cut1 = _image_mask(ids, model.config.image_token_id, img[first])
    entering = {}
    lm = model.model.language_model

    def grab(mod, args, kw):
        entering.setdefault("h", (args[0] if args else kw["hidden_states"]).detach())

    handle = lm.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with oracles.CutMask(model, [(1, cut1)]), LayerKeys(model, 1) as spy:
            model(**x)
    finally:
        handle.remove()
    alive = cut1[0].nonzero()[:, 0]  # the sequence DART alone would be fed: FastV's survivors
    keys = spy.keys[0].transpose(0, 1).flatten(1)[alive]
    hidden = lm.norm(entering["h"])[0][alive]
    start = int(img[0])  # the image starts where it did: nothing before it was dropped
    want = sorted(int(alive[j]) for j in authors_rule(hidden, keys, start, 14, 1))
    assert (img[rec.stages[1].kept[0][0]]).tolist() == want
    with oracles.CutMask(model, [(1, cut1), (2, _image_mask(ids, model.config.image_token_id, torch.tensor(want)))]):
        ref = model(**x).logits
    final = _image_mask(ids, model.config.image_token_id, torch.tensor(want))[0]
    assert (got[0] - ref[0, final]).abs().max() <= 1e-5


@torch.no_grad()
def test_probe_then_previous_on_one_attention_module(tiny):
    """PyramidDrop probes layers 1 and 2 (its rows come from layer K's own q/k, kernel skipped), then FastV reads the
    rows of layer 2 as it runs (before layer 3): two stages tap layer 2's attention. Each cut equals the method's
    rule on the eager attention of the unpatched model under the earlier cuts, and the logits equal the masking
    oracle."""
    model, proc = tiny
    x = _inputs(proc, seed=6)
    ids = x["input_ids"][0]
    iid = model.config.image_token_id
    img = (ids == iid).nonzero()[:, 0]
    # the first LLM method's positions run the prefill (PyramidDrop's "compact" on LLaVA); the oracle's are original
    c = _stack(_llm("pdrop", layers=(1, 2)), _llm("fastv", layer=3), llm_keep=8, positions="original")
    got, rec = _record(model, x, c, keep=4)
    assert [s.layer for s in rec.stages] == [1, 2, 3]
    cuts, alive = [], torch.arange(img.numel())
    for st, (layer, row_layer) in zip(rec.stages, [(1, 1), (2, 2), (3, 2)]):  # probe: layer K; FastV: layer K-1
        rows = oracles.eager_rows_under_cuts(model, x, cuts, row_layer)[0, :, -1].mean(0)
        k = st.kept[0][0].numel()
        want = alive[oracles.topk_sorted(rows[img[alive]], k)]
        assert torch.equal(st.kept[0][0], want), layer
        alive = want
        cuts.append((layer, _image_mask(ids, iid, img[want])))
    with oracles.CutMask(model, cuts):
        ref = model(**x).logits
    assert (got[0] - ref[0, cuts[-1][1][0]]).abs().max() <= 1e-5
    _, alone = _record(model, x, _llm("pdrop", layers=(1, 2), positions="original"), keep=8)  # the first part alone
    assert [torch.equal(a.kept[0][0], b.kept[0][0]) for a, b in zip(alone.stages, rec.stages)] == [True, True]


def test_two_llm_methods_record_flops_show_and_names(tiny):
    from tokprune.viz.panels import stage_name, stages_picture

    model, proc = tiny
    x = _inputs(proc)
    c = tokprune.Compose(vision="cls", llm=(_llm("fastv", layer=1), _llm("dart", layer=2)))
    assert c.chain(16, 3) == [16, 12, 6, 3]  # each part keeps twice what the next keeps
    with torch.no_grad(), tokprune.pruned(model, c, keep=3, record_scores=True):
        model(**x)
        rec = tokprune.last_record(model)
    assert rec.method == "cls+fastv+dart"
    _, alone = _record(model, x, "cls", keep=12)
    assert torch.equal(rec.stages[0].kept[0][0], alone.stages[0].kept[0][0])
    assert [(s.kind, s.layer, s.kept[0][0].numel()) for s in rec.stages] == [("vision", None, 12), ("llm", 1, 6),
                                                                             ("llm", 2, 3)]
    assert all(st.scores is not None for st in rec.stages[:2])  # cls and FastV score; DART selects by pivots
    layers = rec.flops.llm_layers
    assert layers[0] > layers[1] > layers[-1]  # both LLM cuts counted
    assert [stage_name(rec, i) for i in range(3)] == ["vision", "LLM layer 1", "LLM layer 2"]
    assert stages_picture(make_image(64, 48), rec).width > 0
    sched = tokprune.api.schedule(model, c, keep=3)
    assert [(s.kind, s.layer, s.keep) for s in sched.stages] == [("vision", None, 12), ("llm", 1, 6), ("llm", 2, 3)]
    named = tokprune.api.make_pruner("fastv+dart", {})
    assert named.vision_method is None and [m.name for m in named.llm_methods] == ["fastv", "dart"]
    named = tokprune.api.make_pruner("visionzip+fastv+pdrop", {"llm_keep": 32})
    assert named.vision_method.name == "visionzip" and named.name == "visionzip+fastv+pdrop"


def test_two_llm_methods_refusals(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="both cut before decoder layer 2; two stages cannot share a layer"):
        tokprune.apply(model, "fastv+dart", keep=4)
    with pytest.raises(ValueError, match="list the methods in layer order"):
        tokprune.apply(model, _stack(_llm("fastv", layer=3), _llm("dart", layer=2)), keep=4)
    with pytest.raises(ValueError, match="needs two or more LLM methods"):
        tokprune.Compose(vision=None, llm="fastv")
    with pytest.raises(ValueError, match="every LLM method but the last"):
        _stack(_llm("fastv", layer=1), _llm("dart", layer=2), llm_keep=(8, 4))
    with pytest.raises(ValueError, match="LLM stages only"):
        tokprune.apply(model, _stack(_llm("fastv", layer=1), "cls"), keep=4)


def test_two_llm_methods_generate_batch_with_padding_and_static_cache(tiny):
    model, proc = tiny
    imgs = [make_image(64, 48, seed=1), make_image(48, 64, seed=2)]
    texts = [image_prompt(proc, 1, "is there a red square in the picture , yes or no ?"), image_prompt(proc, 1)]
    batch = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    c = _stack(_llm("fastv", layer=1), _llm("dart", layer=2), llm_keep=14)
    with torch.no_grad(), tokprune.pruned(model, c, keep=12):
        out = model.generate(**batch, **GEN)[:, -4:]
        static = model.generate(**batch, cache_implementation="static", **GEN)[:, -4:]
        for row, (img, text) in enumerate(zip(imgs, texts)):
            alone = model.generate(**proc(images=[img], text=text, return_tensors="pt"), **GEN)[:, -4:]
            assert torch.equal(out[row], alone[0])
    assert torch.equal(out, static)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl"])
def test_two_llm_methods_on_other_families(family):
    """FastV then DART on the tiled and M-RoPE families: keep-all is the unpatched model; a padded batch generates
    what each row generates alone, the static cache what the dynamic one does."""
    model, proc = tiny_model(family)
    imgs = [make_image(112, 84, seed=1), make_image(84, 112, seed=2)]
    texts = [image_prompt(proc, 1, "is there a red square in the picture , yes or no ?"), image_prompt(proc, 1)]
    batch = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    c = _stack(_llm("fastv", layer=1), _llm("dart", layer=2))
    with torch.no_grad():
        want = model(**batch).logits
        with tokprune.pruned(model, c, keep_ratio=1.0):
            assert torch.equal(model(**batch).logits, want)
        with tokprune.pruned(model, c, keep_ratio=0.5):
            out = model.generate(**batch, **GEN)[:, -4:]
            assert [s.layer for s in tokprune.last_record(model).stages] == [1, 2]
            static = model.generate(**batch, cache_implementation="static", **GEN)[:, -4:]
            for row, (img, text) in enumerate(zip(imgs, texts)):
                alone = model.generate(**proc(images=[img], text=text, return_tensors="pt"), **GEN)[:, -4:]
                assert torch.equal(out[row], alone[0])
    assert torch.equal(out, static)
