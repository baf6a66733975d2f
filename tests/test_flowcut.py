"""FlowCut: tokens dropped inside the vision encoder (tokprune/patches/encoder_cut.py + tokprune/pruners/flowcut.py).

References are independent of tokprune's code path: ``tests/flowcut_ref.py`` runs the unpatched encoder under an
attention function of its own that hides dropped keys (equal to really dropping them) and applies FlowCut's rule,
written from the reference code, to its eager maps; the LLM is the unpatched model fed those features at the kept
tokens; the Qwen LLM layer-1 cut is recomputed from eager attention maps and hooked value projections. The tiny
models' attention is sharpened (q/k scaled) so that the entropy-adaptive counts drop tokens at several layers and
differently per image.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import flowcut_ref
import tokprune
from tokprune.pruners.base import EncoderStep, ModelInfo
from tokprune.pruners.flowcut import FlowCut
from tokprune.testing import QWEN_IMAGE_TAG, make_image, tiny_model

N_NEW = 6
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)
TOL = 1e-5
K = 8  # LLaVA budget (of 64 patches)


def sharpen(model, factor: float) -> None:
    """Scale every encoder layer's q and k projections (attention logits x factor^2)."""
    base = model.model
    if hasattr(base, "visual"):
        for blk in base.visual.blocks:
            d = blk.attn.qkv.weight.shape[0] // 3
            blk.attn.qkv.weight.data[: 2 * d] *= factor
            if blk.attn.qkv.bias is not None:
                blk.attn.qkv.bias.data[: 2 * d] *= factor
    else:
        for layer in base.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.data *= factor
            layer.self_attn.k_proj.weight.data *= factor


def deep_llava(attn: str = "sdpa"):
    """A 7-layer CLIP (feature layer 5: cuts after layers 0, 2 and 4) at 112 px: 64 patches per image."""
    model, proc = tiny_model("llava", attn=attn, image_size=112, vision_layers=7)
    sharpen(model, 4.0)
    return model, proc


_CACHE: dict = {}


def cached(name: str):
    if name not in _CACHE:
        if name == "llava":
            _CACHE[name] = deep_llava()
        else:
            m, p = tiny_model(name)
            sharpen(m, 32.0)
            _CACHE[name] = (m, p)
    return _CACHE[name]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for m, _ in _CACHE.values():
        tokprune.remove(m)


def llava_inputs(proc, seeds=(0,), question="what is in the image ?"):
    images = [make_image(112, 112, seed=s) for s in seeds]
    text = "user " + " ".join(["<image>"] * len(images)) + f" {question} assistant :"
    return proc(images=images, text=text, return_tensors="pt")


def qwen_inputs(proc, sizes=((224, 112), (112, 168))):
    images = [make_image(w, h, seed=j) for j, (w, h) in enumerate(sizes)]
    text = "user " + " ".join([QWEN_IMAGE_TAG] * len(images)) + " what is in the image ? assistant :"
    return proc(images=images, text=text, return_tensors="pt")


# ---------------------------------------------------------------------------------------------- hand-made inputs
def clip_info(feature_layer: int = 6) -> ModelInfo:
    return ModelInfo("llava", feature_layer + 2, feature_layer, True, 4, True)


def test_entropy_of_the_cls_row_gives_the_known_prune_count():
    """16 patches, keep 4, layer 1 of feature layer 6: rpl = 4. The [CLS] row has 4 heavy and 12 light entries
    (distinct), values are equal (so the semantic term and the L1 norms are flat): the count comes from the
    entropy, the survivors are the heaviest by the row."""
    n, keep = 16, 4
    gen = torch.Generator().manual_seed(0)
    heavy = torch.randperm(n, generator=gen)[:4]
    a = torch.linspace(0.01, 0.02, n)
    a[heavy] = torch.tensor([0.3, 0.25, 0.2, 0.15])
    row = torch.cat([torch.tensor([0.05]), a])  # [CLS] column first (dropped by the rule)
    values = torch.ones(2, 1 + n, 3)
    step = EncoderStep(1, clip_info(), 1, 1, [keep], [n], {"cls_row": [row], "values": [values],
                                                            "value_mean": [values.mean(0)]},
                       [torch.arange(1 + n)], [{}])
    p = a / a.sum()
    r = float(-(p * p.log()).sum() / math.log(n))
    count = round((n - keep) / math.sqrt(4) * (1 - r * r))
    assert 0 < count < n - keep  # a count of the entropy, neither nothing nor the forced cut
    kept = FlowCut().cut_encoder(step)[0]
    assert kept.numel() == n - count
    assert torch.equal(kept, torch.sort(-a, stable=True).indices[: n - count].sort().values)
    # an odd number of remaining prune layers only accumulates; the layer before the feature layer forces keep
    assert FlowCut().cut_encoder(EncoderStep(0, *step_args(step)))[0] is None
    assert FlowCut().cut_encoder(EncoderStep(5, *step_args(step)))[0].numel() == keep


def step_args(step: EncoderStep) -> tuple:
    return (step.info, step.prefix, step.unit, step.keep, step.n_tokens, step.signals, step.origin, [{}])


def test_qwen_form_counts_whole_merge_units_with_the_global_query():
    """Qwen2-VL form: 8 merge units of 4 patches, keep 1 -> target 2 units; block 1 of 4: rpl = 2; unit attention
    = sum of its patches', epsilon 1e-7 in the entropy; survivors are whole units (the best by mean patch score)."""
    info = ModelInfo("qwen2_vl", 4, 3, False, 4, False)
    unit, n = 4, 8
    a_unit = torch.tensor([0.3, 0.02, 0.25, 0.03, 0.2, 0.05, 0.1, 0.05])
    a = (a_unit[:, None] / unit).expand(n, unit).flatten()
    vm = torch.ones(n * unit, 5)
    step = EncoderStep(1, info, 0, unit, [1], [n], {"mean_query_row": [a], "value_mean": [vm]},
                       [torch.arange(n * unit)], [{}])
    p = a_unit / a_unit.sum()
    r = float(-(p * (p + 1e-7).log()).sum() / math.log(n))
    count = round((n - 2) / math.sqrt(2) * (1 - r * r))
    assert 0 < count < n - 2
    kept = FlowCut().cut_encoder(step)[0]
    assert torch.equal(kept, torch.sort(-a_unit, stable=True).indices[: n - count].sort().values)


def test_options_are_validated():
    with pytest.raises(ValueError, match="semantic must be 'dot'"):
        FlowCut(semantic="cos")
    with pytest.raises(ValueError, match="history must be a number in"):
        FlowCut(history=2)
    with pytest.raises(ValueError, match="llm_layer must be"):
        FlowCut(llm_layer=-1)
    with pytest.raises(ValueError, match="newlines must be True"):
        FlowCut(newlines="no")


# ---------------------------------------------------------------------------------------------- LLaVA-1.5
@torch.no_grad()
def llava_reference(model, x, ref: dict, kept: list[torch.Tensor], generate: bool = False):
    """The unpatched LLaVA fed the reference encoder's features at the kept patches, re-indexed contiguously."""
    ids = x["input_ids"]
    image = model.config.image_token_id
    pos = (ids[0] == image).nonzero()[:, 0]
    n = model.config.image_seq_length
    keep = ids[0] != image
    for j, k in enumerate(kept):
        keep[pos[j * n:(j + 1) * n][k]] = True
    fed = BaseModelOutputWithPooling(pooler_output=[f[k] for f, k in zip(ref["features"].pooler_output, kept)])
    kw = dict(input_ids=ids[:, keep], mm_encoder_outputs={"image": fed})
    return model.generate(**kw, **GEN) if generate else model(**kw).logits


def test_llava_kept_set_layer_counts_logits_and_generation_match_the_reference():
    model, proc = cached("llava")
    x = llava_inputs(proc, seeds=(0,))
    seen = []
    # what each layer computes on: the output of its first norm, inside the layer
    hooks = [layer.layer_norm1.register_forward_hook(lambda m, a, o, s=seen: s.append(o.shape[1]))
             for layer in model.model.vision_tower.encoder.layers]
    try:
        with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=K):
            out = model(**x).logits
            rec = tokprune.last_record(model)
            layer_tokens = list(seen)
            gen = model.generate(**x, **GEN)
    finally:
        for h in hooks:
            h.remove()
    ref = flowcut_ref.run(model, x, keep=[K])
    # the kept set after every cut layer, and what each encoder layer saw
    assert [(layer, [k.tolist() for k in kk]) for layer, kk in rec.encoder_cuts] == \
        [(layer, [k.tolist() for k in kk]) for layer, kk in ref["history"]]
    assert len(rec.encoder_cuts) >= 2  # the entropy-adaptive counts drop before the forced cut
    assert layer_tokens == [s[0] for s in ref["seen"]]
    assert layer_tokens[0] == 65 and layer_tokens[-2:] == [K + 1, K + 1]  # layers 5 and 6 run on keep + [CLS]
    kept = flowcut_ref.llm_tokens_alive(model, x, ref["alive"])
    assert [k.tolist() for k in rec.kept[0]] == [k.tolist() for k in kept]
    assert rec.n_kept == [[K]]
    expect = llava_reference(model, x, ref, kept)
    assert out.shape == expect.shape and (out - expect).abs().max() <= TOL
    expect_gen = llava_reference(model, x, ref, kept, generate=True)
    assert torch.equal(gen.sequences[:, -N_NEW:], expect_gen.sequences[:, -N_NEW:])
    assert max((a - b).abs().max().item() for a, b in zip(gen.logits, expect_gen.logits)) <= TOL


def test_llava_keep_all_is_identical():
    model, proc = cached("llava")
    x = llava_inputs(proc, seeds=(0, 1))
    with torch.no_grad():
        ref = model(**x).logits
        with tokprune.pruned(model, "flowcut", keep_ratio=1.0):
            out = model(**x).logits
            rec = tokprune.last_record(model)
    assert torch.equal(out, ref) and rec.n_kept == rec.n_visual and not rec.encoder_cuts


def test_llava_batch_with_padding_two_images_differing_counts_match_single_runs():
    """Row 0 has two images, row 1 one; the images keep different counts inside the encoder (padded rows with a
    key mask), each image's count and every output equal its single run."""
    model, proc = cached("llava")
    texts = ["user <image> <image> compare the first and second picture ? assistant :",
             "user <image> what ? assistant :"]
    images = [make_image(112, 112, seed=s) for s in (0, 5, 2)]
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=K):
        batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
        assert (batch["attention_mask"] == 0).any()
        gen = model.generate(**batch, **GEN)
        rec = tokprune.last_record(model)
        singles, single_cuts = [], []
        for t, ims in zip(texts, (images[:2], images[2:])):
            singles.append(model.generate(**proc(images=ims, text=t, return_tensors="pt"), **GEN))
            single_cuts.append(tokprune.last_record(model).encoder_cuts)
    counts = [[int(k.numel()) for k in kk] for _, kk in rec.encoder_cuts]
    assert any(len(set(c)) > 1 for c in counts)  # rows of different lengths inside the encoder
    joined = [(layer, [k.tolist() for k in kk]) for layer, kk in rec.encoder_cuts]
    per_single = {}
    for cuts in single_cuts:
        for layer, kk in cuts:
            per_single.setdefault(layer, []).extend(k.tolist() for k in kk)
    assert joined == sorted(per_single.items())
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


def test_llava_static_cache_and_eager_select_the_same():
    model, proc = cached("llava")
    x = llava_inputs(proc, seeds=(3,))
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=K):
        dyn = model.generate(**x, **GEN)
        kept = tokprune.last_record(model).kept[0]
        sta = model.generate(**x, cache_implementation="static", **GEN)
    assert torch.equal(dyn.sequences, sta.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, sta.logits)) <= TOL
    eager, _ = deep_llava(attn="eager")
    with torch.no_grad(), tokprune.pruned(eager, "flowcut", keep=K):
        eager(**x)
        assert all(torch.equal(a, b) for a, b in zip(tokprune.last_record(eager).kept[0], kept))


# ---------------------------------------------------------------------------------------------- Qwen family
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@torch.no_grad()
def llm_cut_reference(model, x, ref: dict, vision_kept: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """FlowCut's LLM layer-1 rule on the unpatched model fed the vision-kept tokens: rel from layer 1's eager map
    (the last row renormalised over the visual keys = a softmax over visual keys), sem from its hooked value
    projection, per image top-``keep`` (indices into the vision-kept tokens)."""
    ids = x["input_ids"]
    image = model.config.image_token_id
    counts = [int(f.shape[0]) for f in ref["features"].pooler_output]
    pos = (ids[0] == image).nonzero()[:, 0]
    keep_mask = ids[0] != image
    runs = torch.split(pos, counts)
    for run, k in zip(runs, vision_kept):
        keep_mask[run[k]] = True
    fed = ref["features"].__class__(**dict(ref["features"].items()))
    fed.pooler_output = [f[k] for f, k in zip(ref["features"].pooler_output, vision_kept)]
    if getattr(fed, "deepstack_features", None) is not None:
        fed.deepstack_features = [[f[k] for f, k in zip(lv, vision_kept)] for lv in fed.deepstack_features]
    if "image_grid_thw" in x:
        mrope, _ = model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                              image_grid_thw=x["image_grid_thw"])
        position_ids = torch.cat([torch.arange(ids.shape[1])[None, None], mrope])[..., keep_mask]
        extra = dict(mm_token_type_ids=x["mm_token_type_ids"][:, keep_mask])
    else:  # LLaVA-NeXT at original positions
        position_ids, extra = torch.arange(ids.shape[1])[None, keep_mask], {}
    layer = model.model.language_model.layers[1]
    got = {}
    h = layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: got.setdefault("v", o))
    model.set_attn_implementation("eager")
    try:
        att = model(input_ids=ids[:, keep_mask], mm_encoder_outputs={"image": fed}, position_ids=position_ids,
                    output_attentions=True, **extra).attentions[1]
    finally:
        model.set_attn_implementation("sdpa")
        h.remove()
    vis = (ids[:, keep_mask][0] == image).nonzero()[:, 0]
    cfg = model.config.get_text_config()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    v = got["v"][0].view(-1, cfg.num_key_value_heads, hd).transpose(0, 1).float()  # (Hkv, n, d)
    row = att[0, :, -1, vis].float()
    rel_all = (row / row.sum(-1, keepdim=True)).mean(0)
    sem_all = ((v[:, vis] @ v[:, -1, :, None]).squeeze(-1) / math.sqrt(hd)).softmax(-1).mean(0)
    out, start = [], 0
    for k in vision_kept:
        sl = slice(start, start + k.numel())
        start += k.numel()
        rel, sem = rel_all[sl], sem_all[sl]
        score = (rel / rel.sum() + sem / sem.sum()) * v[:, vis[sl]].mean(0).abs().sum(-1)
        out.append(torch.sort(-score, stable=True).indices[:keep].sort().values)
    return out


@pytest.mark.parametrize("family", QWEN)
def test_qwen_kept_sets_block_counts_and_logits_match_the_reference(family):
    """Two images of different sizes: the ViT cuts (whole merge units; Qwen2.5-VL windows rebuilt) equal the
    key-mask reference's rule, every block saw the reference's token count, the LLM layer-1 cut equals the rule on
    eager maps, and the logits equal the unpatched model fed the reference features with the LLM cut hidden from
    layer 2 on."""
    import oracles

    model, proc = cached(family)
    x = qwen_inputs(proc)
    keep = 3
    seen = []
    hooks = [blk.norm1.register_forward_hook(lambda m, a, o, s=seen: s.append(o.shape[0]))
             for blk in model.model.visual.blocks]
    try:
        with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=keep):
            out = model(**x).logits
            rec = tokprune.last_record(model)
    finally:
        for h in hooks:
            h.remove()
    ref = flowcut_ref.run(model, x, keep=[keep, keep])
    assert [(layer, [k.tolist() for k in kk]) for layer, kk in rec.encoder_cuts] == \
        [(layer, [k.tolist() for k in kk]) for layer, kk in ref["history"]]
    if family != "qwen2_vl":  # 2 blocks there: only the last cuts
        assert len(rec.encoder_cuts) == 2  # a cut before the last block (Qwen2.5-VL: a windowed block follows)
    assert seen == [sum(s) for s in ref["seen"]]
    vision_kept = flowcut_ref.llm_tokens_alive(model, x, ref["alive"])
    assert [k.tolist() for k in rec.stages[0].kept[0]] == [k.tolist() for k in vision_kept]
    assert [int(k.numel()) for k in vision_kept] == [2 * keep, 2 * keep]
    llm = llm_cut_reference(model, x, ref, vision_kept, keep)
    assert [k.tolist() for k in rec.stages[1].kept[0]] == [v[k].tolist() for v, k in zip(vision_kept, llm)]
    ids = x["input_ids"]
    image = model.config.image_token_id
    counts = [int(f.shape[0]) for f in ref["features"].pooler_output]
    runs = torch.split((ids[0] == image).nonzero()[:, 0], counts)
    fed_mask = ids[0] != image
    final_mask = ids[0] != image
    for run, vk, fk in zip(runs, vision_kept, rec.stages[1].kept[0]):
        fed_mask[run[vk]] = True
        final_mask[run[fk]] = True
    with oracles.CutMask(model, [(2, final_mask[fed_mask][None])]), torch.no_grad():
        fed = ref["features"].__class__(**dict(ref["features"].items()))
        fed.pooler_output = [f[k] for f, k in zip(ref["features"].pooler_output, vision_kept)]
        if getattr(fed, "deepstack_features", None) is not None:
            fed.deepstack_features = [[f[k] for f, k in zip(lv, vision_kept)] for lv in fed.deepstack_features]
        mrope, _ = model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                              image_grid_thw=x["image_grid_thw"])
        position_ids = torch.cat([torch.arange(ids.shape[1])[None, None], mrope])[..., fed_mask]
        expect = model(input_ids=ids[:, fed_mask], mm_encoder_outputs={"image": fed}, position_ids=position_ids,
                       mm_token_type_ids=x["mm_token_type_ids"][:, fed_mask]).logits
    assert (out[0] - expect[0, final_mask[fed_mask]]).abs().max() <= TOL


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_generate_static_cache_and_eager_agree(family):
    model, proc = cached(family)
    x = qwen_inputs(proc)
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=3):
        fwd = model(**x).logits[:, -1]
        kept = tokprune.last_record(model).kept[0]
        dyn = model.generate(**x, **GEN)
        assert all(torch.equal(a, b) for a, b in zip(tokprune.last_record(model).kept[0], kept))
        sta = model.generate(**x, cache_implementation="static", **GEN)
    assert (dyn.logits[0] - fwd).abs().max() <= TOL
    assert torch.equal(dyn.sequences, sta.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, sta.logits)) <= TOL
    eager, _ = tiny_model(family, attn="eager")
    sharpen(eager, 32.0)
    with torch.no_grad(), tokprune.pruned(eager, "flowcut", keep=3):
        eager(**x)
        assert all(torch.equal(a, b) for a, b in zip(tokprune.last_record(eager).kept[0], kept))


def test_remove_restores_the_encoder():
    model, proc = cached("qwen2_5_vl")
    x = qwen_inputs(proc)

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    with torch.no_grad():
        ref = model(**x).logits
        tokprune.apply(model, "flowcut", keep=3)
        model(**x)
        tokprune.remove(model)
        assert torch.equal(model(**x).logits, ref)
    assert hooks() == before


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_batch_with_padding_matches_single_runs(family):
    """Two rows (two images, one image) packed in one ViT call with early cuts: each image's cuts, and every
    output, equal its single run."""
    model, proc = cached(family)
    tag = QWEN_IMAGE_TAG
    texts = [f"user {tag} {tag} compare the first and second picture ? assistant :", f"user {tag} what ? assistant :"]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(224, 112), (112, 168), (168, 168)])]
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=3):
        batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
        assert (batch["attention_mask"] == 0).any()
        gen = model.generate(**batch, **GEN)
        joined = tokprune.last_record(model).encoder_cuts
        singles, cuts = [], {}
        for t, ims in zip(texts, (images[:2], images[2:])):
            singles.append(model.generate(**proc(images=ims, text=t, return_tensors="pt"), **GEN))
            for layer, kk in tokprune.last_record(model).encoder_cuts:
                cuts.setdefault(layer, []).extend(k.tolist() for k in kk)
    assert len(joined) == 2 and [(layer, [k.tolist() for k in kk]) for layer, kk in joined] == sorted(cuts.items())
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


# ---------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_record_flops_count_the_tokens_each_encoder_layer_saw(family):
    """``record.flops`` (``tokprune.flops.from_record``) counts every ViT layer at the tokens its images really ran
    on, read here by hooks on the encoder layers (registered after tokprune's, so they see the shortened input)."""
    from tokprune import flops

    model, proc = cached(family)
    x = llava_inputs(proc, seeds=(0, 1)) if family == "llava" else qwen_inputs(proc)
    base = model.model
    layers = base.visual.blocks if family != "llava" else base.vision_tower.encoder.layers
    head = base.visual.merger if family != "llava" else base.multi_modal_projector
    seen: list[int] = []
    into_head: list[tuple[int, ...]] = []
    tokprune.apply(model, "flowcut", keep=K if family == "llava" else 4)
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).shape[-2]), with_kwargs=True) for m in layers]
    hooks.append(head.register_forward_pre_hook(lambda mod, args: into_head.append(tuple(args[0].shape[:-1]))))
    try:
        with torch.no_grad():
            model(**x)
        rec = tokprune.last_record(model)
    finally:
        for h in hooks:
            h.remove()
        tokprune.remove(model)
    works = flops.from_record(model.config, rec, **flops.geometry_from_inputs(x))[0].images
    per_layer = [[w.layer_tokens[i] for w in works] for i in range(len(layers))]
    # LLaVA: the images are rows of one batch, padded to the longest (the hook sees that row length; the record
    # counts each image's own tokens); Qwen: one packed sequence of all images
    counted = [max(n) if family == "llava" else sum(n) for n in per_layer]
    assert seen == counted and counted[-1] < counted[0]
    # the projector / merger runs on the survivors of the last cut only ([CLS] excluded)
    assert [math.prod(shape) for shape in into_head] == [sum(w.projector_tokens for w in works)]
    unpruned = flops.from_record(model.config, type(rec)(**{**rec.__dict__, "encoder_cuts": None}),
                                 **flops.geometry_from_inputs(x))[0].images
    assert all(w.layer_tokens[-1] < u.layer_tokens[-1] for w, u in zip(works, unpruned))
    assert rec.flops.vision < rec.flops.baseline.vision


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT (§3.2)
def next_vision_kept(model, x, alive: torch.Tensor, newlines: bool) -> list[torch.Tensor]:
    """The packed positions of the tiles' surviving patches: the alive mask ([CLS] dropped) pushed through HF's
    own stitching and unpadding (newline slots alive when ``newlines``), as the reference scatters its keep-mask."""
    base = model.model
    tiles = alive[:, 1:].float()[..., None]  # (n_tiles, patches, 1)
    packed, _ = base.pack_image_features([tiles], x["image_sizes"], "default",
                                         image_newline=torch.full((1,), float(newlines)))
    return [packed[0][:, 0].nonzero()[:, 0]]


@pytest.mark.parametrize("newlines, keep", [(False, 6), (True, 6), (True, 7)])
def test_llava_next_per_tile_cut_unpadding_and_llm_cut_match_the_reference(newlines, keep):
    """A non-square image (5 tiles; unpadding removes 2 of the stitched grid's 4 rows): every tile is cut to
    int(keep / 2) patches (TungChintao/FlowCut main.py: ``int(target_num / 2)``, rounding down an odd budget) by the
    key-mask reference's rule, the vision stage keeps the survivors in the unpadded
    layout, LLM layer 1's rule cuts to exactly ``keep`` (on eager maps of the unpatched model fed the survivors),
    and the logits equal that model with the cut hidden from layer 2 on; generate with and without cache agree."""
    import oracles

    model, proc = cached("llava_next")
    x = proc(images=[make_image(100, 70, seed=3)], text="user <image> what is in the image ? assistant :",
             return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=keep, newlines=newlines, positions="original"):
        out = model(**x).logits
        rec = tokprune.last_record(model)
        gen = model.generate(**x, **GEN)
        nocache = model.generate(**x, **GEN, use_cache=False)
    n_tiles = x["pixel_values"].shape[1]
    assert n_tiles == 5
    ref = flowcut_ref.run(model, x, keep=[int(keep / 2)] * n_tiles)
    assert [(layer, [k.tolist() for k in kk]) for layer, kk in rec.encoder_cuts] == \
        [(layer, [k.tolist() for k in kk]) for layer, kk in ref["history"]]
    assert [int(a.sum()) for a in ref["alive"]] == [1 + int(keep / 2)] * n_tiles
    vision_kept = next_vision_kept(model, x, ref["alive"], newlines)
    n_newlines = int(rec.special[0][0].sum())
    content = rec.n_visual[0][0] - n_newlines
    assert n_newlines == 2 and content == 12  # 4 base + 8 visible of the 16 stitched crop patches
    assert keep < int(vision_kept[0].numel()) - newlines * n_newlines < n_tiles * int(keep / 2)
    assert [k.tolist() for k in rec.stages[0].kept[0]] == [k.tolist() for k in vision_kept]
    # the LLM cut: the rule on the survivors' content tokens (newlines, kept on top, are never scored)
    sp = rec.special[0][0][vision_kept[0]]
    content_kept = [vision_kept[0][~sp]]
    llm = llm_cut_reference(model, x, ref, content_kept, keep)
    final = torch.cat([content_kept[0][llm[0]], vision_kept[0][sp]]).sort().values
    assert rec.stages[1].kept[0][0].tolist() == final.tolist()
    assert rec.n_kept == [[keep + newlines * n_newlines]]
    ids = x["input_ids"]
    image = model.config.image_token_id
    run = (ids[0] == image).nonzero()[:, 0]
    fed_mask, final_mask = ids[0] != image, ids[0] != image
    fed_mask[run[vision_kept[0]]] = True
    final_mask[run[final]] = True
    with oracles.CutMask(model, [(2, final_mask[fed_mask][None])]), torch.no_grad():
        fed = BaseModelOutputWithPooling(pooler_output=[ref["features"].pooler_output[0][vision_kept[0]]])
        expect = model(input_ids=ids[:, fed_mask], mm_encoder_outputs={"image": fed},
                       position_ids=torch.arange(ids.shape[1])[None, fed_mask]).logits
    assert (out[0] - expect[0, final_mask[fed_mask]]).abs().max() <= TOL
    assert torch.equal(gen.sequences, nocache.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(gen.logits, nocache.logits)) <= TOL


def test_llava_next_keep_all_is_identical_and_keep_ratio_counts_content_tokens():
    model, proc = cached("llava_next")
    x = proc(images=[make_image(100, 70, seed=3)], text="user <image> what ? assistant :", return_tensors="pt")
    with torch.no_grad():
        ref = model(**x).logits
        with tokprune.pruned(model, "flowcut", keep_ratio=1.0):
            out = model(**x).logits
            rec = tokprune.last_record(model)
        assert torch.equal(out, ref) and rec.encoder_cuts == [] and rec.n_kept == rec.n_visual
        with tokprune.pruned(model, "flowcut", keep_ratio=0.5, newlines=False):
            model(**x)
            rec = tokprune.last_record(model)
    assert rec.n_kept == [[6]]  # half of the 12 content tokens
    assert [int(k.numel()) for k in rec.encoder_cuts[-1][1]] == [1 + 3] * 5  # ceil(6 / 2) per tile + [CLS]


def test_llava_next_static_cache_eager_selection_and_flops():
    """Static cache equals the dynamic one, an eager-attention copy selects the same tokens at every stage, the
    record's FLOPs count the cut tiles, and the schedule states its vision stage as a bound."""
    model, proc = cached("llava_next")
    x = proc(images=[make_image(100, 70, seed=3)], text="user <image> what ? assistant :", return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "flowcut", keep=6):
        model(**x)
        rec = tokprune.last_record(model)  # a forward's record (it has the image sizes the FLOPs need)
        dyn = model.generate(**x, **GEN)
        sta = model.generate(**x, cache_implementation="static", **GEN)
    assert torch.equal(dyn.sequences, sta.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dyn.logits, sta.logits)) <= TOL
    assert 0 < rec.flops.vision < rec.flops.baseline.vision
    eager, _ = tiny_model("llava_next", attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad(), tokprune.pruned(eager, "flowcut", keep=6):
        eager(**x)
        got = tokprune.last_record(eager)
    assert [[k.tolist() for k in st.kept[0]] for st in got.stages] == \
        [[k.tolist() for k in st.kept[0]] for st in rec.stages]
    assert "at most 14 before the LLM" in tokprune.api.schedule(model, "flowcut", keep=6, n_visual=14).describe()
