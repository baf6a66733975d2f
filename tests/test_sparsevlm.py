"""SparseVLM: the rules on hand-made inputs with known answers, the schedule, and the patched tiny LLaVA against an
independent re-implementation of the authors' decoder loop (``tests/sparsevlm_ref.py``): per stage the same kept
tokens, the same adaptive counts and the same recycled tokens (their sources), the same logits, and the same
greedy decode with the reference's per-layer decode positions. The family x method matrix
(tests/test_families.py, tests/test_llava.py) covers the other families, batches with padding and several images."""

from __future__ import annotations

import pytest
import sparsevlm_ref
import torch

import tokprune
import tokprune.api
from tokprune.configs import load
from tokprune.pruners.sparsevlm import SparseVLM
from tokprune.rules import sparsevlm as rules
from tokprune.testing import image_prompt, make_image, tiny_model

TOL = 1e-5
N_NEW = 6
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


def one_row(proc, seed: int = 0, question: str = "what is the colour of the big shape on the left ?"):
    return proc(images=[make_image(84, 84, seed=seed)], text=image_prompt(proc, 1, question), return_tensors="pt")


# ---------------------------------------------------------------------------------------------- rules
def test_rank_count_of_a_rank_deficient_matrix():
    a, b = torch.rand(6), torch.rand(6)
    relation = torch.stack([a, 2 * a, b, a + b])  # 4 raters, 6 tokens, rank 2
    assert rules.rank_count(relation, scale=1.5, bias=1.0) == (int(2 * 1.5 + 1.0), True)
    assert rules.rank_count(relation, scale=10.0, bias=0.0) == (5, True)  # at most n - 1
    full = torch.eye(3)  # rank 3 == n: nothing is cut
    assert rules.rank_count(full, scale=1.0, bias=0.0) == (3, False)


def test_rank_uses_the_default_tolerance_in_float32():
    a = torch.rand(8)
    near = torch.stack([a, a * (1 + 1e-9), torch.rand(8)])  # the second row equals the first in float32
    assert rules.rank_count(near, 1.0, 0.0) == (2, True)


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0], [4.0, 0.0]])
    # softmax over text of V T^T per visual token: [e^5, 1, 1, e^4] / Z -> tokens 0 and 3 are above the mean
    assert rules.raters(visual, text).tolist() == [True, False, False, True]


def test_dpc_knn_merge_known_answers():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    one, assign = rules.dpc_knn_merge(x, 1)  # one cluster: the mean (sum over count + 1e-6)
    assert assign.tolist() == [0, 0, 0, 0] and torch.allclose(one[0], x.sum(0) / (4 + 1e-6))
    each, assign = rules.dpc_knn_merge(x, 4)  # as many clusters as tokens: every token is its own centre
    assert sorted(assign.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(each[assign], x / (1 + 1e-6))


def test_dpc_knn_merge_equals_the_authors_merge():
    torch.manual_seed(0)
    x = torch.randn(23, 16)
    for clusters in (1, 3, 5):
        ours, assign = rules.dpc_knn_merge(x, clusters)
        ref, ref_assign = sparsevlm_ref.cluster_and_merge(x, clusters)
        assert torch.equal(assign, ref_assign)
        assert torch.allclose(ours, ref, atol=1e-6)


def test_recycle_counts_follow_the_reference():
    assert rules.recycle_count(276) == (83, 9)  # int(0.3 * 276) + 1, int(83 / 10) + 1
    assert rules.recycle_count(1) == (1, 1)
    assert rules.recycle_count(0) == (0, 0)


def test_v15_schedule_on_576_tokens_is_the_reference_table_plus_recycled_tokens():
    """keep=192 (RETAIN_TOKN=192): 300 / 200 / 110 kept after layers 2 / 6 / 15, plus 9 / 4 / 3 cluster tokens
    (int(int(0.3 d) + 1) / 10) + 1 for d = 276, 109, 94 dropped): computed by hand from score.py and the loop."""
    sched = tokprune.api.schedule("llava-1.5-7b", "sparsevlm", keep=192)
    assert [(st.kind, st.layer, st.keep, st.at_most) for st in sched.stages] == [
        ("llm", 3, 309, False), ("llm", 7, 204, False), ("llm", 16, 113, False)]
    assert sched.meaning == "layer_average"
    for keep, table in rules.TABLE_V15.items():
        steps = SparseVLM().steps(576, keep, 3)
        assert tuple(st.kept for st in steps) == table


def test_v1_schedule_is_an_upper_bound_and_flops_use_it():
    sched = tokprune.api.schedule("llava-1.5-7b", "sparsevlm", keep=192, version="v1")
    assert [(st.layer, st.keep, st.at_most) for st in sched.stages] == [(3, 576, True), (7, 576, True),
                                                                         (16, 576, True), (20, 576, True)]
    assert "at most" in sched.describe()
    exact = tokprune.api.schedule("llava-1.5-7b", "sparsevlm", keep=192)
    config = load("llava-1.5-7b")
    assert tokprune.flops.for_budget(config, sched) == tokprune.flops.for_budget(config, sched.__class__(
        576, ()))  # the bound keeps every token: the unpruned cost
    assert tokprune.flops.for_budget(config, exact).llm_prefill < tokprune.flops.for_budget(config, sched).llm_prefill
    tera = [tokprune.flops.for_budget(config, tokprune.api.schedule(config, "sparsevlm", keep=k), convention="3ndm")
            .total / 1e12 for k in (192, 128, 64)]
    assert [round(t, 2) for t in tera] == [1.35, 0.95, 0.54]  # docs/flops.md


@pytest.mark.parametrize("kwargs, match", [
    (dict(version="v2"), "version must be one of"),
    (dict(scale=2.0), "pass version='v1'"),
    (dict(version="v1", scale=-1.0), "finite number >= 0"),
    (dict(counts=(3, 2)), "counts for the 3 default layers"),
    (dict(counts=(0, 1, 1)), "positive ints"),
    (dict(version="v1", counts=(3, 2, 1)), "v1 takes scale"),
    (dict(layers=(3, 7)), "one layer per stage"),
    (dict(layers=(3, 7), counts=(5, 4, 3)), "3 counts for 2 layers"),
    (dict(recycle_share=0.0), "recycle_share"),
    (dict(per_cluster=0), "per_cluster"),
])
def test_options_are_validated_with_the_fix(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseVLM(**kwargs)


def test_v1_without_a_preset_names_the_fix(llava):
    model, proc = llava
    with pytest.raises(ValueError, match="pass scale= and bias="):
        tokprune.api.schedule(model, "sparsevlm", keep=5, n_visual=16, version="v1", layers=(1, 2, 3))


# ---------------------------------------------------------------------------------------------- vs the reference
def identities(rec) -> list[dict]:
    """Per LLM stage of a one-row, one-image record: kept identities and merged tokens' source identities, in the
    reference's naming (("v", i) originals, ("m", stage, j) merged)."""
    name = {}
    out = []
    for s, st in enumerate(rec.stages):
        merged = []
        m = st.merged[0][0] if st.merged else None
        if m is not None:
            merged = [{name.get(int(o), ("v", int(o))) for o in src} for src in m.sources]
            for j, slot in enumerate(m.slots.tolist()):
                name[slot] = ("m", s, j)
        out.append({"kept": {name.get(int(o), ("v", int(o))) for o in st.kept[0][0]}, "merged": merged})
    return out


CASES = {
    "v1.5": (dict(counts=(8, 3, 1)), dict(counts=(8, 3, 1))),
    "v1.5-tight": (dict(counts=(2, 1, 1)), dict(counts=(2, 1, 1))),
    "v1": (dict(version="v1", scale=2.0, bias=1.0), dict(scale=2.0, bias=1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_authors_loop(llava, case, seed):
    model, proc = llava
    ours_opts, ref_opts = CASES[case]
    x = one_row(proc, seed)
    with torch.no_grad():
        ref = sparsevlm_ref.run(model, x, cut_after=(0, 1, 2), new_tokens=N_NEW - 1, **ref_opts)
        with tokprune.pruned(model, "sparsevlm", keep=4, layers=(1, 2, 3), **ours_opts):
            logits = model(**x).logits[0, -1]
            rec = tokprune.last_record(model)
            gen = model.generate(**x, **GEN)
    got = identities(rec)
    assert [len(s["kept"]) for s in got] == [len(s["kept"]) for s in ref["stages"]]  # the adaptive counts
    assert got == ref["stages"]  # kept tokens and recycled tokens' sources, per stage
    assert any(s["merged"] for s in got)
    assert (logits - ref["logits"]).abs().max() <= TOL
    steps = [ref["logits"], *ref["step_logits"]]
    assert gen.sequences[0, -N_NEW:].tolist() == [int(s.argmax()) for s in steps]
    assert max((a[0] - b).abs().max().item() for a, b in zip(gen.logits, steps)) <= TOL


def test_v1_counts_depend_on_the_rank(llava):
    """The v1 count is rank * scale + bias: with scale 0 and bias b the stage keeps b tokens whatever the image,
    with scale 1 it keeps the rank (at most the number of raters)."""
    model, proc = llava
    x = one_row(proc)
    with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep=4, version="v1", scale=0.0, bias=5.0,
                                          layers=(1,), recycle=False):
        model(**x)
        assert tokprune.last_record(model).n_kept == [[5]]
    ref = sparsevlm_ref.run(model, x, cut_after=(0,), scale=1.0, bias=0.0)
    with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep=4, version="v1", scale=1.0, bias=0.0,
                                          layers=(1,)):
        model(**x)
        rec = tokprune.last_record(model)
    assert identities(rec) == ref["stages"]


def test_keep_all_is_identical_and_recycle_off_only_drops(llava):
    model, proc = llava
    x = one_row(proc)
    with torch.no_grad():
        ref = model(**x).logits
        with tokprune.pruned(model, "sparsevlm", keep=16):
            assert torch.equal(model(**x).logits, ref)
        with tokprune.pruned(model, "sparsevlm", keep=4, recycle=False):
            model(**x)
            rec = tokprune.last_record(model)
    assert all(st.merged is None for st in rec.stages)


def test_static_cache_and_eager_match(llava):
    model, proc = llava
    x = one_row(proc)
    with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep=4):
        dyn = model.generate(**x, **GEN)
        sta = model.generate(**x, cache_implementation="static", **GEN)
        kept = [st.kept for st in tokprune.last_record(model).stages]
    assert torch.equal(dyn.sequences, sta.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, sta.logits)) <= TOL
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep=4):
            eag = model.generate(**x, **GEN)
            kept_eager = [st.kept for st in tokprune.last_record(model).stages]
    finally:
        model.set_attn_implementation("sdpa")
    assert all(torch.equal(a, b) for sa, sb in zip(kept, kept_eager) for a, b in zip(sa[0], sb[0]))
    assert torch.equal(dyn.sequences, eag.sequences)


def test_batch_with_padding_and_two_images_matches_single_runs(llava):
    model, proc = llava
    images = [make_image(84, 84, seed=s) for s in range(3)]
    texts = [image_prompt(proc, 2, "compare the two pictures please"), image_prompt(proc, 1, "what ?")]
    batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep=4):
        gen = model.generate(**batch, **GEN)
        rec = tokprune.last_record(model)
        singles = [model.generate(**proc(images=ims, text=t, return_tensors="pt"), **GEN)
                   for t, ims in zip(texts, (images[:2], images[2:]))]
    assert any(m is not None for st in rec.stages for row in st.merged for m in row)
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_static_cache_matches_dynamic_on_other_families(family):
    model, proc = tiny_model(family)
    x = proc(images=[make_image(112, 84)], text=image_prompt(proc), return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "sparsevlm", keep_ratio=0.3):
        dyn = model.generate(**x, **GEN)
        sta = model.generate(**x, cache_implementation="static", **GEN)
    assert torch.equal(dyn.sequences, sta.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, sta.logits)) <= TOL


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen3_vl"])
def test_v1_rank_counts_on_other_families_equal_the_masking_oracle(family):
    """v1's data-dependent counts (an ``at_most`` schedule) with recycled tokens at dropped slots and original
    positions: the unpatched model under the multi-cut masking oracle that rebuilds each recycled token from the
    record (``tests/test_families.py: schedule_reference``); logits and greedy decode."""
    from test_families import GEN as FGEN
    from test_families import ZOO, assert_same_generation, inputs, schedule_reference

    fam = ZOO[family]
    x = inputs(fam)
    opts = dict(version="v1", scale=1.0, bias=2.0, layers=(1, 2, 3))
    with torch.no_grad():
        tokprune.apply(fam.model, "sparsevlm", keep_ratio=0.5, positions="original", **opts)
        try:
            out = fam.model(**x).logits
            rec = tokprune.last_record(fam.model)
            gen = fam.model.generate(**x, **FGEN)
            gen_rec = tokprune.last_record(fam.model)
        finally:
            tokprune.remove(fam.model)
        ref, final = schedule_reference(fam, x, rec)
        ref_gen, _ = schedule_reference(fam, x, gen_rec, generate=True)
    sched = [tokprune.api.schedule(fam.model, "sparsevlm", keep_ratio=0.5, n_visual=n, **opts) for n in
             rec.n_visual[0]]
    assert all(st.at_most for s in sched for st in s.stages)
    assert any(m is not None for st in rec.stages if st.merged for m in st.merged[0])
    assert 0 < sum(rec.n_kept[0]) < sum(rec.n_visual[0])
    assert (out[0] - ref[0, final]).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)
