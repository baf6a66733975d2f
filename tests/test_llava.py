"""Exactness tests of every method on the LLaVA-1.5 adapter (tiny random model, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import flowcut_ref
import oracles
import tokprune
import tokprune.api
from tokprune.testing import image_prompt, make_image, tiny_model

N_VIS = 16  # 56 px / 14 px patches -> 4 x 4
ALL = tokprune.methods()
# methods whose schedule is a single vision stage, asked from each method (never a list of names)
PRE_LLM = [m for m in ALL if [st.kind for st in tokprune.api.schedule(tiny_model("llava")[0], m, keep=1,
                                                                         n_visual=N_VIS).stages] == ["vision"]]
#: independent references of the methods that add new (merged) tokens: (model, x, keep) -> per image (slots, merge)
MERGE_ORACLES = {"visionzip": oracles.visionzip_reference}
#: these oracles feed the merged tokens in their slots: VisionZip's LLM-token merge (an option); its default merge
#: before the projector, in the reference's token order, is tested in tests/test_visionzip.py
SLOT_MERGE = {"visionzip": {"merge": "llm"}}
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def tiny():
    model, proc = tiny_model("llava")
    return model, proc


@pytest.fixture(autouse=True)
def _unpatched(tiny):
    yield
    tokprune.remove(tiny[0])


def inputs(proc, n_images=1, seed=0, question="what is in the image ?"):
    imgs = [make_image(64, 48, seed=seed + j) for j in range(n_images)]
    return proc(images=imgs, text=image_prompt(proc, n_images, question), return_tensors="pt")


def method_scores(model, x, method, k_layer=2):
    """Scores the method ranks by, computed independently (eager attention, no tokprune code)."""
    if method == "cls":
        return oracles.cls_scores(model, x["pixel_values"], [1])  # feature layer: 3 layers, hidden_states[-2]
    if method == "vtc_cls":
        return oracles.cls_scores(model, x["pixel_values"], [0, 1])  # the last three up to layer 1 -> 0, 1
    if method == "fastv":
        feats = oracles.features(model, x["pixel_values"])
        return oracles.fastv_scores(model, x["input_ids"], feats, k_layer)[None]
    return None


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("method", ALL)
def test_keep_all_is_identical(tiny, method):
    model, proc = tiny
    x = inputs(proc)
    with torch.no_grad():
        ref = model(**x).logits
        ref_gen = model.generate(**x, **GEN)
        tokprune.apply(model, method, keep=N_VIS)
        out = model(**x).logits
        gen = model.generate(**x, **GEN)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert tokprune.last_record(model).n_kept == [[N_VIS]]


# ---------------------------------------------------------------------------------------------- keep k
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_keep_k_equals_model_fed_kept_tokens(tiny, method, positions):
    model, proc = tiny
    x = inputs(proc)
    k = 5
    with torch.no_grad():
        tokprune.apply(model, method, keep=k, positions=positions, **SLOT_MERGE.get(method, {}))
        out = model(**x).logits
        no_cache = model(**x, use_cache=False).logits
        rec = tokprune.last_record(model)
        kept = rec.kept[0]
        tokprune.remove(model)
        feats = oracles.features(model, x["pixel_values"])
        if rec.encoder_cuts:  # dropped inside the encoder: an encoder that hides the same tokens (flowcut_ref)
            feats = list(flowcut_ref.run(model, x, cuts=rec.encoder_cuts)["features"].pooler_output)
        if rec.merged is not None:  # new tokens in their slots, from the method's independent reference
            merged = MERGE_ORACLES[method](model, x, k)
            assert all(torch.equal(slots, kp) for (slots, _), kp in zip(merged, kept))
            feats = [fn(f) for (_, fn), f in zip(merged, feats)]
        ref, _ = oracles.run_kept(model, x["input_ids"], feats, kept, compact=positions == "compact")
    assert kept[0].numel() == k
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5
    assert (no_cache - ref).abs().max() <= 1e-5
    scores = method_scores(model, x, method)
    if scores is not None:
        assert torch.equal(kept[0], oracles.topk_sorted(scores[0], k))


def test_random_is_seeded_and_uniform(tiny):
    model, proc = tiny
    x = inputs(proc)
    with torch.no_grad():
        tokprune.apply(model, "random", keep=4, seed=3)
        model(**x)
        a = tokprune.last_record(model).kept[0][0]
        model(**x)
        b = tokprune.last_record(model).kept[0][0]
        tokprune.apply(model, "random", keep=4, seed=4)
        model(**x)
        c = tokprune.last_record(model).kept[0][0]
        counts = torch.zeros(N_VIS)
        for seed in range(200):
            tokprune.apply(model, "random", keep=4, seed=seed)
            model(**x)
            counts[tokprune.last_record(model).kept[0][0]] += 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert counts.min() > 20 and counts.max() < 80  # expected 50 each


def test_random_seeded_by_content_follows_the_image(tiny):
    """seed_by="content": an image keeps the same tokens wherever it sits in a prompt (the vLLM plugin's mode),
    and a different image draws differently; the key is the rule's own (tokprune.pruners.random.content_key)."""
    from tokprune.pruners.random import content_key

    model, proc = tiny
    imgs = [make_image(64, 48, seed=s) for s in (0, 1)]
    q = "what is in the image ?"
    one = proc(images=[imgs[1]], text=[image_prompt(proc, 1, q)], return_tensors="pt")
    two = proc(images=imgs, text=[image_prompt(proc, 2, q)], return_tensors="pt")
    with torch.no_grad():
        tokprune.apply(model, "random", keep=4, seed_by="content")
        model(**one)
        alone = tokprune.last_record(model).kept[0][0]
        model(**two)
        first, second = tokprune.last_record(model).kept[0]
    assert torch.equal(alone, second) and not torch.equal(first, second)
    px = torch.rand(16, 3, 196)
    assert content_key(px) == content_key(px[torch.randperm(16)]) != content_key(px.flip(0) * 0.5)
    with pytest.raises(ValueError, match="seed_by"):
        tokprune.apply(model, "random", keep=4, seed_by="place")


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_fastv_keep_k_equals_layer_reference(tiny, positions):
    model, proc = tiny
    x = inputs(proc)
    k, layer = 6, 2
    with torch.no_grad():
        tokprune.apply(model, "fastv", keep=k, layer=layer, positions=positions)
        out = model(**x).logits
        rec = tokprune.last_record(model)
        kept = rec.kept[0][0]
        tokprune.remove(model)
        feats = oracles.features(model, x["pixel_values"])
        ids = x["input_ids"]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        keep[img] = False
        keep[img[kept]] = True
        ref = oracles.layer_loop(model, oracles.embed(model, ids, feats), layer, keep, compact=positions == "compact")
    assert [s.kind for s in rec.stages] == ["llm"] and rec.stages[0].layer == layer
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(kept, oracles.topk_sorted(method_scores(model, x, "fastv", layer)[0], k))


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_generate_equals_unpatched_on_kept_tokens(tiny, method, positions):
    model, proc = tiny
    x = inputs(proc)
    with torch.no_grad():
        tokprune.apply(model, method, keep=5, positions=positions, **SLOT_MERGE.get(method, {}))
        gen = model.generate(**x, **GEN)
        rec = tokprune.last_record(model)
        kept = rec.kept[0]
        tokprune.remove(model)
        feats = oracles.features(model, x["pixel_values"])
        if rec.encoder_cuts:  # dropped inside the encoder: an encoder that hides the same tokens (flowcut_ref)
            feats = list(flowcut_ref.run(model, x, cuts=rec.encoder_cuts)["features"].pooler_output)
        if rec.merged is not None:
            feats = [fn(f) for (_, fn), f in zip(MERGE_ORACLES[method](model, x, 5), feats)]
        _, keep = oracles.run_kept(model, x["input_ids"], feats, kept, compact=True)
        mm = {"image": type(model.model.get_image_features(pixel_values=x["pixel_values"]))(
            pooler_output=[f[k] for f, k in zip(feats, kept)])}
        extra = {} if positions == "compact" else {"position_ids": torch.arange(keep.numel())[keep][None]}
        # the mask is passed: without it generate() infers one from the pad id, hiding prompt tokens equal to it
        ref = model.generate(input_ids=x["input_ids"][:, keep], attention_mask=x["attention_mask"][:, keep],
                             mm_encoder_outputs=mm, **extra, **GEN)
    assert torch.equal(gen[:, -8:], ref[:, -8:])


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_fastv_generate_equals_greedy_layer_reference(tiny, positions):
    model, proc = tiny
    x = inputs(proc)
    k, layer = 6, 2
    with torch.no_grad():
        tokprune.apply(model, "fastv", keep=k, layer=layer, positions=positions)
        gen = model.generate(**x, **GEN)
        kept = tokprune.last_record(model).kept[0][0]
        tokprune.remove(model)
        feats = oracles.features(model, x["pixel_values"])
        ids = x["input_ids"]
        img = oracles.image_positions(ids[0], model.config.image_token_id)
        for _ in range(8):  # no cache: recompute the whole sequence with the prefill's pruned set each step
            keep = torch.ones(ids.shape[1], dtype=torch.bool)
            keep[img] = False
            keep[img[kept]] = True
            logits = oracles.layer_loop(model, oracles.embed(model, ids, feats), layer, keep,
                                        compact=positions == "compact")
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, ids)


# ---------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("method", ALL)
def test_batch_with_padding_and_two_images_matches_single_runs(tiny, method):
    model, proc = tiny
    img = [make_image(64, 48, seed=s) for s in range(3)]
    texts = [image_prompt(proc, 2, "compare the first and second picture ?"), image_prompt(proc, 1, "what ?")]
    batch = proc(images=img, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # left padding present
    opts = {"keep_ratio": 0.25} if method != "random" else {"keep": 5}
    with torch.no_grad():
        tokprune.apply(model, method, **opts)
        gen = model.generate(**batch, **GEN)
        out = model(**batch).logits[:, -1]
        rec = tokprune.last_record(model)
        singles, single_gen = [], []
        for t, ims in zip(texts, (img[:2], img[2:])):
            xi = proc(images=ims, text=t, return_tensors="pt")
            singles.append(model(**xi).logits[:, -1])
            single_gen.append(model.generate(**xi, **GEN)[0, -8:])
    assert rec.n_visual == [[N_VIS, N_VIS], [N_VIS]]
    assert [len(r) for r in rec.kept] == [2, 1]
    assert (out - torch.cat(singles)).abs().max() <= 1e-5
    assert torch.equal(gen[:, -8:], torch.stack(single_gen))


@pytest.mark.parametrize("method", ["cls", "vtc_cls", "fastv"])
def test_sdpa_and_eager_select_the_same_tokens(method):
    kept = []
    for attn in ("sdpa", "eager"):
        model, proc = tiny_model("llava", attn=attn)
        x = inputs(proc)
        with torch.no_grad(), tokprune.pruned(model, method, keep=5):
            model(**x)
            kept.append(tokprune.last_record(model).kept[0][0])
    assert torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("method", ["cls", "fastv"])
def test_static_cache_matches_dynamic(tiny, method):
    model, proc = tiny
    x = inputs(proc)
    with torch.no_grad(), tokprune.pruned(model, method, keep=5):
        dyn = model.generate(**x, **GEN)
        sta = model.generate(**x, cache_implementation="static", **GEN)
    assert torch.equal(dyn, sta)


# ---------------------------------------------------------------------------------------------- apply / remove
def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_remove_restores_and_apply_replaces(tiny):
    model, proc = tiny
    x = inputs(proc)
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with torch.no_grad():
        # transformers installs its own output-recording hooks on the first call that asks for hidden states
        # (as the CLS methods' vision stage does) and keeps them: count from there
        model.model.vision_tower(x["pixel_values"], output_hidden_states=True)
        n_hooks = _hooks(model)
        ref = model(**x).logits
        tokprune.apply(model, "cls", keep=4)
        n_cls = _hooks(model)
        tokprune.apply(model, "vtc_cls", keep=4)
        assert _hooks(model) == n_cls  # replaced, not stacked
        assert tokprune.is_patched(model) and model.tokprune.pruner.name == "vtc_cls"
        model(**x)
        assert tokprune.last_record(model).n_kept == [[4]]
        tokprune.apply(model, "fastv", keep=4)
        tokprune.remove(model)
        out = model(**x).logits
    assert torch.equal(out, ref)
    assert _hooks(model) == n_hooks
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == local
    assert not hasattr(model, "tokprune")


def test_pruned_context_manager_removes_on_error(tiny):
    model, proc = tiny
    with pytest.raises(RuntimeError, match="boom"), tokprune.pruned(model, "cls", keep_ratio=0.5):
        assert tokprune.is_patched(model)
        raise RuntimeError("boom")
    assert not tokprune.is_patched(model)


def test_pruned_restores_the_previous_patch_exactly_and_nests(tiny):
    """A scoped trial of another method puts the applied one back (method, options, budget, family options), and
    an inner block restores the outer block's patch, not the bare model (issue #22)."""
    model, proc = tiny
    x = inputs(proc)
    with torch.no_grad():
        tokprune.apply(model, "fastv", keep=4, layer=1)
        outer_handle, outer_pruner = model.tokprune, model.tokprune.pruner
        ref = model(**x).logits
        n_hooks, wrapped = _hooks(model), set(ALL_ATTENTION_FUNCTIONS._local_mapping)
        with tokprune.pruned(model, "cls", keep=8):
            assert model.tokprune.pruner.name == "cls"
            with tokprune.pruned(model, "random", keep_ratio=0.25, seed=3):
                model(**x)
                assert tokprune.last_record(model).n_kept == [[4]]
            assert model.tokprune.pruner.name == "cls" and model.tokprune.budget.keep == 8
            model(**x)
            assert tokprune.last_record(model).n_kept == [[8]]
            with pytest.raises(RuntimeError, match="boom"), tokprune.pruned(model, "vtc_cls", keep=2):
                raise RuntimeError("boom")
            assert model.tokprune.pruner.name == "cls"
        assert model.tokprune is outer_handle and model.tokprune.pruner is outer_pruner
        assert outer_pruner.layer == 1 and model.tokprune.budget.keep == 4
        assert _hooks(model) == n_hooks and set(ALL_ATTENTION_FUNCTIONS._local_mapping) == wrapped
        assert torch.equal(model(**x).logits, ref)
        assert tokprune.last_record(model).n_kept == [[4]]
        tokprune.remove(model)
        plain = model(**x).logits
    assert not torch.equal(plain, ref)  # the restored patch really prunes


def test_keep_ratio_is_the_kept_fraction(tiny):
    model, proc = tiny
    with torch.no_grad(), tokprune.pruned(model, "cls", keep_ratio=0.25):
        model(**inputs(proc))
        assert tokprune.last_record(model).n_kept == [[4]]


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_method_lists_known_ones(tiny):
    with pytest.raises(ValueError, match="known methods: .*cls.*fastv"):
        tokprune.apply(tiny[0], "nonexistent", keep=4)


@pytest.mark.parametrize("budget, match", [
    ({"keep": 0}, "keep must be >= 1"),
    ({"keep": -3}, "keep must be >= 1"),
    ({"keep": 17}, "larger than the 16 visual tokens"),
    ({"keep": 4, "keep_ratio": 0.5}, "exactly one of keep"),
    ({}, "exactly one of keep"),
    ({"keep_ratio": 1.5}, "fraction of visual tokens KEPT"),
    ({"keep_ratio": 0.0}, "fraction of visual tokens KEPT"),
])
def test_bad_budgets(tiny, budget, match):
    with pytest.raises(ValueError, match=match):
        tokprune.apply(tiny[0], "cls", **budget)
    assert not tokprune.is_patched(tiny[0])


def test_bad_options(tiny):
    with pytest.raises(TypeError, match="has no option bogus; its options: .*layer"):
        tokprune.apply(tiny[0], "fastv", keep=4, bogus=1)
    with pytest.raises(ValueError, match="LLM layer 9 is out of range"):
        tokprune.apply(tiny[0], "fastv", keep=4, layer=9)
    with pytest.raises(ValueError, match="positions must be one of"):
        tokprune.apply(tiny[0], "cls", keep=4, positions="shifted")


def test_unsupported_model_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="no support for LlamaForCausalLM; supported model classes: .*Llava"):
        tokprune.apply(model, "cls", keep=4)


def test_record_lists_stages_and_counts(tiny):
    model, proc = tiny
    with torch.no_grad(), tokprune.pruned(model, "cls", keep=3):
        assert tokprune.last_record(model) is None
        model(**inputs(proc))
        rec = tokprune.last_record(model)
        assert model.tokprune.last is rec
    assert rec.method == "cls" and rec.n_visual == [[N_VIS]] and rec.n_kept == [[3]]
    assert [(s.kind, s.layer) for s in rec.stages] == [("vision", None)]
    assert torch.equal(rec.kept[0][0], rec.kept[0][0].sort().values)
    with pytest.raises(ValueError, match="not patched"):
        tokprune.last_record(model)


@pytest.mark.parametrize("method", ALL)
def test_bfloat16_model(method):
    model, proc = tiny_model("llava")
    model.to(torch.bfloat16)
    x = inputs(proc)
    x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = model(**x).logits
        with tokprune.pruned(model, method, keep=N_VIS):
            assert torch.equal(model(**x).logits, ref)
        with tokprune.pruned(model, method, keep=3):
            out = model.generate(**x, **GEN)
            # catp on one image runs its stage 1 only: floor(S (1 - R/2)) with R = 1 - 3/S, the rest of R is its LLM
            # stages' (which need demonstrations)
            # stages' (which need demonstrations); a layer-averaged budget (sparsevlm) ends at its schedule's last count
            expected = (math.floor(N_VIS * (1 - (1 - 3 / N_VIS) / 2)) if method == "catp" else
                        tokprune.api.schedule(model, method, keep=3, n_visual=N_VIS).stages[-1].keep)
            assert tokprune.last_record(model).n_kept == [[expected]]
    assert out.shape[1] == x["input_ids"].shape[1] + 8  # generate() returns the caller's unpruned prompt
