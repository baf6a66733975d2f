"""Family x method matrix on the tiny LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL models
(CPU, random weights).

Every reference is built here without tokprune code: the unpatched model fed only the kept tokens at their
original positions (pre-LLM methods, the "no-hook" variant of hooks-guide §4), a masking oracle that keeps the
whole sequence and hides the pruned keys from layer K on (FastV, hooks-guide §5), and method scores read from
eager attention maps. Generation is compared on the per-step logits, not only the ids: tiny random models often
repeat one token, which would hide a wrong position. The generation references are decoded by hand
(``oracles.greedy_decode``: explicit positions at every step, the prompt's attention mask), not by ``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import flowcut_ref
import oracles
import tokprune
import tokprune.api
from tokprune.patches.compat import cache_kwargs, output_cache
from tokprune.testing import QWEN_IMAGE_TAG, families, make_image, tiny_model

FAMILIES = [f for f in families() if f != "llava"]  # LLaVA-1.5 has its own tests (tests/test_llava.py)
METHODS = tokprune.methods()
NEEDS_CLS = ("cls", "vtc_cls")  # the methods whose scores test_next_kept_tokens_are_the_top_cls_scores recomputes
N_NEW = 8
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)
TOL = 1e-5
SIZES = [(112, 84), (168, 84)]  # two images of different sizes -> different visual token counts


@dataclass
class Fam:
    name: str
    model: Any
    proc: Any

    @property
    def qwen(self) -> bool:
        return self.name.startswith("qwen")

    @property
    def image_id(self) -> int:
        return self.model.config.image_token_id


class Zoo:
    """Tiny models built once, on first use."""

    def __init__(self) -> None:
        self.built: dict[str, Fam] = {}
        self.unpatched: dict[str, tuple[torch.Tensor, Any]] = {}

    def __getitem__(self, name: str) -> Fam:
        if name not in self.built:
            self.built[name] = Fam(name, *tiny_model(name))
        return self.built[name]


ZOO = Zoo()


@pytest.fixture(scope="module")
def zoo():
    return ZOO


@pytest.fixture(autouse=True)
def _unpatched(zoo):
    yield
    for fam in zoo.built.values():
        tokprune.remove(fam.model)


QWEN = [f for f in FAMILIES if f.startswith("qwen")]
BUILTIN = ("cls", "vtc_cls", "fastv", "random")
NO_CLS = [*QWEN, "llava_onevision"]  # the Qwen ViTs and SigLIP have no [CLS] token
EXPECTED_UNSUPPORTED = {(f, m) for f in NO_CLS for m in NEEDS_CLS}


def stage_kinds(family: str, method: str) -> tuple[str, ...] | None:
    """The kinds of the method's schedule on the family's tiny model ("vision", "llm", ...), asked from the method
    itself; None where it cannot run (``UnsupportedError``). The matrix below is built from these, never from
    method names, so a new method is covered without editing this file."""
    try:
        sched = tokprune.api.schedule(ZOO[family].model, method, keep=1, n_visual=16)
    except tokprune.UnsupportedError:
        return None
    return tuple(st.kind for st in sched.stages)


KINDS = {(f, m): stage_kinds(f, m) for f in FAMILIES for m in METHODS}
SUPPORTED = [fm for fm, kinds in KINDS.items() if kinds is not None]
UNSUPPORTED = [fm for fm, kinds in KINDS.items() if kinds is None]
VISION_ONLY = [fm for fm in SUPPORTED if KINDS[fm] == ("vision",)]
WITH_LLM = [fm for fm in SUPPORTED if "llm" in KINDS[fm]]


def test_the_built_in_methods_run_where_expected():
    assert {fm for fm in UNSUPPORTED if fm[1] in BUILTIN} == EXPECTED_UNSUPPORTED


def prompt(fam: Fam, n_images: int, question: str = "what is in the image ?") -> str:
    tag = QWEN_IMAGE_TAG if fam.qwen else "<image>"
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"


def inputs(fam: Fam, sizes=SIZES, seed: int = 0):
    images = [make_image(w, h, seed=seed + j) for j, (w, h) in enumerate(sizes)]
    return fam.proc(images=images, text=prompt(fam, len(images)), return_tensors="pt")


# ---------------------------------------------------------------------------------------------- references
@torch.no_grad()
def encode(fam: Fam, x) -> Any:
    """The unpatched encoder outputs of the images of ``x`` (all images of the batch, row-major)."""
    extra = {k: x[k] for k in ("image_grid_thw", "image_sizes") if k in x}
    return fam.model.model.get_image_features(pixel_values=x["pixel_values"], return_dict=True, **extra)


def subset(out: Any, kept: list[torch.Tensor]) -> Any:
    """Encoder outputs holding only the kept tokens (pooler output and, for Qwen3-VL, every DeepStack level)."""
    new = out.__class__(**dict(out.items()))
    new.pooler_output = [f[k] for f, k in zip(out.pooler_output, kept)]
    if getattr(out, "deepstack_features", None) is not None:
        new.deepstack_features = [[f[k] for f, k in zip(level, kept)] for level in out.deepstack_features]
    return new


def image_runs(fam: Fam, ids: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Sequence positions of each image's tokens in a one-row prompt (images in order, ``counts`` tokens each)."""
    pos = (ids[0] == fam.image_id).nonzero()[:, 0]
    assert pos.numel() == sum(counts)
    return list(torch.split(pos, counts))


def keep_mask(fam: Fam, ids: torch.Tensor, counts: list[int], kept: list[torch.Tensor]) -> torch.Tensor:
    keep = ids[0] != fam.image_id
    for run, k in zip(image_runs(fam, ids, counts), kept):
        keep[run[k]] = True
    return keep


@torch.no_grad()
def positions(fam: Fam, x) -> torch.Tensor:
    """Positions of the unpatched model for a one-row prompt: (4, 1, N) M-RoPE for Qwen, (1, N) otherwise."""
    ids = x["input_ids"]
    n = ids.shape[1]
    if not fam.qwen:
        return torch.arange(n)[None]
    mrope, _ = fam.model.model.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"],
                                              image_grid_thw=x["image_grid_thw"])
    return torch.cat([torch.arange(n)[None, None], mrope])


@torch.no_grad()
def kept_tokens_reference(fam: Fam, x, kept: list[torch.Tensor], generate: bool = False,
                          original: bool = False, replace: Any = None, shift: int = 0, cuts: Any = None) -> Any:
    """The unpatched model fed only the kept visual tokens of a one-row prompt.

    Qwen: kept tokens at their original M-RoPE positions. LLaVA-NeXT: re-indexed contiguously (the pre-LLM
    default, "compact": what the model does when no positions are passed), or at their ``original`` positions.
    ``replace(image, features)``: rewrites the kept features of an image (every DeepStack level too), e.g. to put
    a merged token in a slot. ``generate``: :func:`oracles.greedy_decode` (explicit positions at every step: the
    kept prompt's largest position + 1 + step; ``shift`` moves them, to show a wrong decode rule fails).
    ``cuts``: a record's ``encoder_cuts``: the encoder outputs are those of an encoder that drops the same tokens
    inside (the key-mask re-run of ``tests/flowcut_ref.py``).
    """
    out = encode(fam, x) if not cuts else flowcut_ref.run(fam.model, x, cuts=cuts)["features"]
    ids = x["input_ids"]
    keep = keep_mask(fam, ids, [f.shape[0] for f in out.pooler_output], kept)
    fed = subset(out, kept)
    if replace is not None:
        fed.pooler_output = [replace(j, f, g) for j, (f, g) in enumerate(zip(out.pooler_output, fed.pooler_output))]
        if getattr(out, "deepstack_features", None) is not None:
            fed.deepstack_features = [[replace(j, f, g) for j, (f, g) in enumerate(zip(lv, flv))]
                                      for lv, flv in zip(out.deepstack_features, fed.deepstack_features)]
    kw = dict(input_ids=ids[:, keep], mm_encoder_outputs={"image": fed})
    if fam.qwen or original:
        kw["position_ids"] = positions(fam, x)[..., keep]
    if fam.qwen:
        kw["mm_token_type_ids"] = x["mm_token_type_ids"][:, keep]
    if not generate:
        return fam.model(**kw).logits
    # by hand, never generate(): without the prompt's attention_mask generate() infers one from the pad id and
    # hides real prompt tokens that share it (the tiny Qwen tokenizers map every unknown word to pad = 0)
    mask = x.get("attention_mask", torch.ones_like(ids))[:, keep]
    pos = kw.pop("position_ids", torch.arange(int(keep.sum()))[None])
    return oracles.greedy_decode(fam.model, N_NEW, attention_mask=mask, position_ids=pos, **kw, shift=shift)


def MaskingOracle(model: Any, layer: int, keep: torch.Tensor) -> oracles.CutMask:  # noqa: N802 (a context)
    """Keeps the whole sequence; decoder layers >= ``layer`` hide the pruned prompt keys (each query still sees
    itself): one cut of the multi-cut oracle in ``tests/oracles.py``."""
    return oracles.CutMask(model, [(layer, keep)])


@torch.no_grad()
def eager_attentions(fam: Fam, x) -> tuple:
    """Attention maps of the unpatched model (every module switched to eager for this one call)."""
    fam.model.set_attn_implementation("eager")
    try:
        return fam.model(**x, output_attentions=True).attentions
    finally:
        fam.model.set_attn_implementation("sdpa")


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(-scores, stable=True).indices[:k].sort().values


@torch.no_grad()
def unpatched(fam: Fam) -> tuple[torch.Tensor, Any]:
    """Logits and generation of the unpatched model on ``inputs(fam)`` (computed once per family)."""
    if fam.name not in ZOO.unpatched:
        assert not tokprune.is_patched(fam.model)
        x = inputs(fam)
        ZOO.unpatched[fam.name] = (fam.model(**x).logits, fam.model.generate(**x, **GEN))
    return ZOO.unpatched[fam.name]


def assert_same_generation(a: Any, b: Any, tol: float = TOL) -> None:
    assert torch.equal(a.sequences[:, -N_NEW:], b.sequences[:, -N_NEW:])
    assert max((la - lb).abs().max().item() for la, lb in zip(a.logits, b.logits)) <= tol


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("family, method", SUPPORTED)
def test_keep_all_is_identical(zoo, family, method):
    fam = zoo[family]
    x = inputs(fam)
    ref, ref_gen = unpatched(fam)
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep_ratio=1.0)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
    rec = tokprune.last_record(fam.model)
    assert torch.equal(out, ref)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))
    assert rec.n_kept == rec.n_visual


@pytest.mark.parametrize("family, method", UNSUPPORTED)
def test_unsupported_methods_raise_naming_working_ones(zoo, family, method):
    fam = zoo[family]
    working = [m for f, m in SUPPORTED if f == family]
    with pytest.raises(tokprune.UnsupportedError) as err:
        tokprune.apply(fam.model, method, keep=4)
    assert not tokprune.is_patched(fam.model)
    if (family, method) in EXPECTED_UNSUPPORTED:
        assert "no [CLS] token" in str(err.value)
    assert all(m in str(err.value) for m in working if m in BUILTIN)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_rejects_compact_positions(zoo, family):
    with pytest.raises(tokprune.UnsupportedError, match="M-RoPE keeps each token's 3-D position"):
        tokprune.apply(zoo[family].model, "random", keep=4, positions="compact")


# ---------------------------------------------------------------------------------------------- keep k (pre-LLM)
@pytest.mark.parametrize("family, method, pos_mode", [(f, m, None) for f, m in VISION_ONLY]
                         + [("llava_next", "cls", "original")])
def test_pre_llm_keep_k_equals_model_fed_kept_tokens(zoo, family, method, pos_mode):
    """Two images of different sizes in one prompt; logits of the whole pruned sequence and 8 generated steps."""
    fam = zoo[family]
    x = inputs(fam)
    k = 6
    original = pos_mode == "original"
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep=k, positions=pos_mode, **MATRIX_OPTS.get((family, method), {}))
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        replace = merged_replace(fam, x, rec, k)
        cuts = rec.encoder_cuts
        ref = kept_tokens_reference(fam, x, rec.kept[0], original=original, replace=replace, cuts=cuts)
        ref_gen = kept_tokens_reference(fam, x, rec.kept[0], generate=True, original=original, replace=replace,
                                        cuts=cuts)
    n_newlines = [0, 0] if fam.qwen else [n_visual_newlines(fam, x, j) for j in range(2)]
    assert rec.n_kept == [[k + n for n in n_newlines]]
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


#: independent references of the methods that add new (merged) tokens: (model, x, keep) -> per image (slots, merge)
MERGE_ORACLES = {"visionzip": oracles.visionzip_reference}
#: options of the keep-k run where a default builds its tokens before the projector, which the matrix's oracles do
#: not model; that default has its own reference test (tests/test_visionzip.py, LLaVA-NeXT per tile)
MATRIX_OPTS = {("llava_next", "visionzip"): {"merge": "llm"}}


def merged_replace(fam: Fam, x, rec, k: int) -> Any:
    """None when the method added no tokens; else the ``replace`` of :func:`kept_tokens_reference` that puts the
    method's independent reference tokens in their slots (a merging method without a reference fails here)."""
    if rec.merged is None:
        return None
    ref = MERGE_ORACLES[rec.method](fam.model, x, k)
    assert [torch.equal(slots, kept) for (slots, _), kept in zip(ref, rec.kept[0])] == [True] * len(ref)

    def replace(j, full, fed):
        return ref[j][1](full)[ref[j][0]]

    return replace


def n_visual_newlines(fam: Fam, x, j: int) -> int:
    """Newline tokens of image ``j`` of a LLaVA-NeXT prompt (features equal to the learned ``image_newline``)."""
    f = encode(fam, x).pooler_output[j]
    return int((f == fam.model.model.image_newline.to(f.dtype)).all(-1).sum())


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT tiles
@torch.no_grad()
def next_tile_scores(fam: Fam, x, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (tile of every packed token, -1 = newline; summed head-mean [CLS] attention per packed token).

    [CLS] rows come from eager attention maps of the tiles; the model's own ``pack_image_features`` aligns them
    with the packed token order.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    m = fam.model.model
    cfg = fam.model.config
    sizes = x["image_sizes"]
    n_tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    pixels = torch.cat([p[:n] for p, n in zip(x["pixel_values"], n_tiles)])
    vt = m.vision_tower
    vt.set_attn_implementation("eager")
    try:
        att = vt(pixels, output_attentions=True).attentions
    finally:
        vt.set_attn_implementation("sdpa")
    cls = sum(att[i][:, :, 0, 1:].mean(1) for i in layers)  # (tiles, patches)
    out = []
    for j, rows in enumerate(torch.split(cls, n_tiles)):
        tiles = torch.arange(rows.shape[0], dtype=torch.float)[:, None, None].expand(*rows.shape, 1)
        both = torch.cat([tiles, rows[..., None]], -1)
        packed, _ = m.pack_image_features([both], sizes[j:j + 1], "default", image_newline=torch.tensor([-1.0, 0.0]))
        out.append((packed[0][:, 0].round().long(), packed[0][:, 1]))
    return out


@pytest.mark.parametrize("method", NEEDS_CLS)
@pytest.mark.parametrize("tile_budget", ["per_tile", "global"])
def test_next_kept_tokens_are_the_top_cls_scores(zoo, method, tile_budget):
    fam = zoo["llava_next"]
    x = inputs(fam, sizes=[(112, 84), (84, 112)])  # no tile loses tokens to unpadding
    k = 10  # 5 tiles per image in the tiny model -> 2 per tile
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep=k, tile_budget=tile_budget)
        fam.model(**x)
    kept = tokprune.last_record(fam.model).kept[0]
    layers = [1] if method == "cls" else [0, 1]  # the feature layer (hidden_states[-2] of 3) / the last three up to it
    for j, (tile, score) in enumerate(next_tile_scores(fam, x, layers)):
        newline = tile < 0
        assert newline.any()
        chosen = torch.zeros_like(newline)
        chosen[kept[j]] = True
        assert chosen[newline].all()  # every newline kept, on top of the budget
        assert int((chosen & ~newline).sum()) == k
        groups = [tile == t for t in range(int(tile.max()) + 1)] if tile_budget == "per_tile" else [~newline]
        for g in groups:
            n_g = int((chosen & g).sum())
            if tile_budget == "per_tile":
                assert n_g == k // len(groups)
            assert torch.equal(kept[j][g[kept[j]]], topk_sorted(torch.where(g, score, -torch.inf), n_g))


def test_next_split_budget_spreads_what_a_tile_cannot_use():
    from tokprune.patches.llava_next import split_budget

    assert split_budget(10, [4, 4, 4, 4, 4]) == [2, 2, 2, 2, 2]
    assert split_budget(7, [4, 4, 4]) == [3, 2, 2]
    assert split_budget(9, [1, 6, 6]) == [1, 4, 4]
    assert split_budget(20, [3, 2]) == [3, 2]
    assert split_budget(2, [0, 5, 5]) == [0, 1, 1]


def test_next_family_options_are_validated(zoo):
    fam = zoo["llava_next"]
    with pytest.raises(ValueError, match=r"tile_budget must be one of \('per_tile', 'global', 'per_tile_reference'\)"):
        tokprune.apply(fam.model, "cls", keep=4, tile_budget="per_crop")
    assert not tokprune.is_patched(fam.model)


# ---------------------------------------------------------------------------------------------- keep k (FastV)
def fastv_layers(family: str) -> list[int]:
    return [1, 2] if family == "qwen3_vl" else [2]  # Qwen3-VL: K=1 lies inside the DeepStack range


@pytest.mark.parametrize("family, layer", [(f, k) for f in FAMILIES for k in fastv_layers(f)])
def test_fastv_keep_k_equals_masking_oracle(zoo, family, layer):
    fam = zoo[family]
    x = inputs(fam)
    k = 5
    with torch.no_grad():
        tokprune.apply(fam.model, "fastv", keep=k, layer=layer)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ids = x["input_ids"]
        counts = rec.n_visual[0]
        keep = keep_mask(fam, ids, counts, rec.kept[0])[None]
        with MaskingOracle(fam.model, layer, keep):
            ref = fam.model(**x).logits
            ref_gen = fam.model.generate(**x, **GEN)
        att = eager_attentions(fam, x)[layer - 1][0, :, -1].mean(0)  # last token's row, head mean
    assert [(s.kind, s.layer) for s in rec.stages] == [("llm", layer)]
    # LLaVA-NeXT: keep counts content tokens; the newlines (rec.special) are never scored and kept on top
    n_newlines = [0, 0] if fam.qwen else [n_visual_newlines(fam, x, j) for j in range(2)]
    assert [int(sp.sum()) for sp in rec.special[0]] == n_newlines
    assert rec.n_kept == [[k + n for n in n_newlines]]
    for run, kept, newline in zip(image_runs(fam, ids, counts), rec.kept[0], rec.special[0]):
        content = (~newline).nonzero()[:, 0]
        top = content[topk_sorted(att[run][content], k)]
        assert torch.equal(kept, torch.cat([top, newline.nonzero()[:, 0]]).sort().values)
    assert out.shape[1] == int(keep.sum())  # the LLM output holds only the kept tokens
    assert (out[0] - ref[0, keep[0]]).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


# ---------------------------------------------------------------------------------------------- any schedule
@pytest.mark.parametrize("family, method", WITH_LLM)
def test_keep_k_equals_the_reference_of_its_schedule(zoo, family, method):
    """Every method with LLM stages, from its record alone: the unpatched model fed the tokens its vision stage
    kept (if any), with every LLM cut applied by the multi-cut masking oracle (original positions); logits, and
    ``generate()`` against that reference decoded by hand."""
    fam = zoo[family]
    x = inputs(fam)
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep=4, positions="original")
        out = fam.model(**x).logits
        rec = tokprune.last_record(fam.model)
        gen = fam.model.generate(**x, **GEN)
        gen_rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        ref, final = schedule_reference(fam, x, rec)
        ref_gen, _ = schedule_reference(fam, x, gen_rec, generate=True)
    assert [st.kind for st in rec.stages] == list(KINDS[(family, method)])
    assert (out[0] - ref[0, final]).abs().max() <= TOL
    assert_same_generation(gen, ref_gen)


#: methods with LLM stages whose vision stage adds tokens: (model, x, rec) -> per image ``full -> full`` putting
#: the new tokens, computed independently from the record's sources and slots, into any per-token tensor
RECORD_MERGES = {"vflowopt": lambda model, x, rec: oracles.vflowopt_record_merges(model, x, rec, t=34.76)}


@torch.no_grad()
def schedule_reference(fam: Fam, x, rec, generate: bool = False) -> tuple[Any, torch.Tensor]:
    """The reference of any schedule of a one-row record, at original positions: the unpatched model fed the
    tokens the vision stage kept (all without one; new tokens in their slots), with every LLM cut hidden from its
    layer on by the multi-cut masking oracle. Returns (logits over the fed prompt, or with ``generate`` its greedy
    decode by hand, mask of the tokens that survive every stage)."""
    ids = x["input_ids"]
    vision = [st for st in rec.stages if st.kind == "vision"]
    fed = vision[0].kept[0] if vision else [torch.arange(n) for n in rec.n_visual[0]]
    replace = None
    if rec.merged is not None:
        merges = RECORD_MERGES[rec.method](fam.model, x, rec)

        def replace(j, full, got):
            return merges[j](full)[fed[j]]
    prompt_keep = keep_mask(fam, ids, rec.n_visual[0], fed)
    cuts = [(st.layer, keep_mask(fam, ids, rec.n_visual[0], st.kept[0])[prompt_keep][None])
            for st in rec.stages if st.kind == "llm"]
    llm_new = llm_merges(fam, ids, rec, prompt_keep)
    with oracles.CutMask(fam.model, cuts, llm_new) if cuts else torch.no_grad():
        ref = kept_tokens_reference(fam, x, fed, generate=generate, original=True, replace=replace,
                                    cuts=rec.encoder_cuts)
    final = cuts[-1][1][0] if cuts else prompt_keep[prompt_keep]
    return ref, final


def llm_merges(fam: Fam, ids: torch.Tensor, rec, prompt_keep: torch.Tensor) -> list:
    """An LLM stage's new tokens (its record's ``merged``: sources and slots, original indices of each image) as
    ``(layer, row 0, slot, sources)`` positions in the fed prompt, for :class:`oracles.CutMask`."""
    runs = image_runs(fam, ids, rec.n_visual[0])
    fed_pos = torch.full((ids.shape[1],), -1, dtype=torch.long)
    fed_pos[prompt_keep] = torch.arange(int(prompt_keep.sum()))
    out = []
    for st in rec.stages:
        for i, m in enumerate(st.merged[0] if st.kind == "llm" and st.merged else []):
            if m is not None:
                out += [(st.layer, 0, int(fed_pos[runs[i][slot]]), fed_pos[runs[i][src]].tolist())
                        for slot, src in zip(m.slots.tolist(), m.sources)]
    return out


# ---------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("family, method", SUPPORTED)
def test_batch_left_padding_two_images_matches_single_runs(zoo, family, method):
    fam = zoo[family]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(112, 84), (56, 84), (84, 112)])]
    texts = [prompt(fam, 2, "compare the first and second picture ?"), prompt(fam, 1, "what ?")]
    batch = fam.proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # left padding present
    opts = {"layer": 1} if (family, method) == ("qwen3_vl", "fastv") else {}  # dead slots meet DeepStack
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep_ratio=0.5, **opts)
        gen = fam.model.generate(**batch, **GEN)  # gen.logits[0]: the prefill's last-token logits
        rec = tokprune.last_record(fam.model)
        single_gen = [fam.model.generate(**fam.proc(images=ims, text=t, return_tensors="pt"), **GEN)
                      for t, ims in zip(texts, (images[:2], images[2:]))]
    assert [len(r) for r in rec.n_visual] == [2, 1] and len(set(rec.n_visual[0])) == 2  # different token counts
    assert all(0 < k < n for row_k, row_n in zip(rec.n_kept, rec.n_visual) for k, n in zip(row_k, row_n))
    for b, g in enumerate(single_gen):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


@pytest.mark.parametrize("family, method", [("llava_next", "cls"), ("llava_next", "random"), ("qwen2_vl", "random"),
                                            ("qwen3_vl", "fastv"), ("llava_onevision", "vispruner")])
def test_beam_search_rows_match_single_runs(zoo, family, method):
    """``generate`` repeats the encoder outputs per beam; each sample's beams still prune like its single run."""
    fam = zoo[family]
    images = [make_image(w, h, seed=s) for s, (w, h) in enumerate([(112, 84), (84, 112)])]
    texts = [prompt(fam, 1, "what is in the image ?"), prompt(fam, 1, "what ?")]
    beams = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, output_scores=True,
                 return_dict_in_generate=True)
    with torch.no_grad(), tokprune.pruned(fam.model, method, keep=4):
        gen = fam.model.generate(**fam.proc(images=images, text=texts, return_tensors="pt", padding=True), **beams)
        singles = [fam.model.generate(**fam.proc(images=[im], text=t, return_tensors="pt"), **beams)
                   for im, t in zip(images, texts)]
    assert torch.equal(gen.sequences[:, -4:], torch.cat([g.sequences[:, -4:] for g in singles]))
    assert (gen.sequences_scores - torch.cat([g.sequences_scores for g in singles])).abs().max() <= TOL


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_matches_dynamic(zoo, family, method):
    fam = zoo[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, method, keep=5):
        dyn = fam.model.generate(**x, **GEN)
        sta = fam.model.generate(**x, cache_implementation="static", **GEN)
    assert_same_generation(dyn, sta)


# ---------------------------------------------------------------------------------------------- Qwen specifics
@pytest.mark.parametrize("family", QWEN)
def test_qwen_manual_decode_without_positions_continues_after_pruning(zoo, family):
    """A hand-written loop that passes no position_ids relies on ``rope_deltas`` (set for the pruned prompt)."""
    fam = zoo[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "random", keep=4):
        gen = fam.model.generate(**x, **GEN)
        out = fam.model(**x, use_cache=True)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(3):
            step = fam.model(input_ids=token, **cache_kwargs(cache), use_cache=True)
            logits.append(step.logits[:, -1])
            token = step.logits[:, -1:].argmax(-1)
    assert max((a - b).abs().max().item() for a, b in zip(logits, gen.logits[1:4])) <= TOL


@pytest.mark.parametrize("method", ["random", "hiprune"])
@pytest.mark.parametrize("family", QWEN)
def test_qwen_generate_after_pre_llm_cut_decodes_past_the_kept_prompt(zoo, family, method):
    """Every decode step of ``generate()`` after a pre-LLM cut (original M-RoPE positions) equals the unpatched
    model decoded by hand at the kept prompt's largest position + 1 + step. That is also the unpruned prompt's
    (its last token is text, never dropped), so generate()'s own rule (last position + 1) is the same; a decode
    at the pruned length (positions shifted down by the dropped count, what a cache-length rule would give)
    differs. The question names an object the tiny tokenizers do not know, i.e. tokens equal to the pad id: a
    reference ``generate()`` without an attention mask would infer one from the pad id and hide them."""
    fam = zoo[family]
    x = fam.proc(images=[make_image(w, h, seed=j) for j, (w, h) in enumerate(SIZES)],
                 text=prompt(fam, 2, "which shape is left of the circle ?"), return_tensors="pt")
    ids = x["input_ids"]
    assert (ids == fam.model.generation_config.pad_token_id).any()
    with torch.no_grad():
        tokprune.apply(fam.model, method, keep=4)
        gen = fam.model.generate(**x, **GEN)
        rec = tokprune.last_record(fam.model)
        tokprune.remove(fam.model)
        keep = keep_mask(fam, ids, rec.n_visual[0], rec.kept[0])
        full = positions(fam, x)
        assert full[1:, :, keep].max() == full[1:].max() == full[1:, 0, -1].max()  # kept max = unpruned max = last
        ref = kept_tokens_reference(fam, x, rec.kept[0], generate=True)
        wrong = kept_tokens_reference(fam, x, rec.kept[0], generate=True, shift=-int((~keep).sum()))
        hf = fam.model.generate(input_ids=ids[:, keep], attention_mask=x["attention_mask"][:, keep],
                                mm_token_type_ids=x["mm_token_type_ids"][:, keep], position_ids=full[..., keep],
                                mm_encoder_outputs={"image": subset(encode(fam, x), rec.kept[0])}, **GEN)
    assert rec.n_kept == [[4, 4]]
    assert_same_generation(gen, ref)
    assert_same_generation(hf, ref)  # HF's generate on the fed tokens (mask passed) follows the same rule
    assert max((a - b).abs().max().item() for a, b in zip(gen.logits[1:], wrong.logits[1:])) > 1e-3


@pytest.mark.parametrize("family", QWEN)
def test_qwen_video_inputs_raise(zoo, family):
    fam = zoo[family]
    x = inputs(fam, sizes=[(56, 56)])
    with tokprune.pruned(fam.model, "random", keep=2), pytest.raises(NotImplementedError, match="video"):
        fam.model(**x, pixel_values_videos=torch.zeros(1, 1))


@pytest.mark.parametrize("family", QWEN)
def test_qwen_pruned_forward_without_cache_is_not_treated_as_packed(zoo, family):
    """Original positions leave gaps; the text position row must not make the mask block-diagonal."""
    fam = zoo[family]
    x = inputs(fam)
    with torch.no_grad(), tokprune.pruned(fam.model, "random", keep=3):
        cached = fam.model(**x).logits
        uncached = fam.model(**x, use_cache=False).logits
    assert (cached - uncached).abs().max() <= TOL


@pytest.mark.parametrize("family", QWEN)
def test_qwen_vit_values_map_to_llm_token_order(zoo, family):
    """What a vision signal needs: values read inside the ViT (window order on Qwen2.5-VL) land on LLM tokens after
    the merge-unit mean and the adapter's ``to_token_order`` (checked against the ViT's own merger and permutation)."""
    from tokprune.api import make_pruner
    from tokprune.config import Budget
    from tokprune.patches.qwen2_vl import merge_units
    from tokprune.registry import MODELS

    fam = zoo[family]
    adapter = MODELS[family](fam.model, make_pruner("random", {}), Budget(keep=2))
    x = inputs(fam)
    grid = x["image_grid_thw"]
    vt = fam.model.model.visual
    with torch.no_grad():
        out = vt(x["pixel_values"], grid_thw=grid)
        merged = vt.merger(out.last_hidden_state)
    assert torch.equal(adapter.to_token_order(merged, grid), out.pooler_output)
    n = int(grid.prod(-1).sum())
    raster = torch.arange(n, dtype=torch.float)
    inside = raster
    if family == "qwen2_5_vl":
        inside = vt.permute_input_for_window_attn(raster[:, None], adapter.window_index(grid), n)[:, 0]
        assert not torch.equal(inside, raster)
    assert torch.equal(adapter.to_token_order(merge_units(inside, adapter.merge_unit), grid),
                      merge_units(raster, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_units_over_the_patch_axis_equal_the_moved_axis_form(dtype):
    """``merge_units(x, u, dim=0)`` (what the Qwen adapter runs on per-patch hidden states, D contiguous) gives the
    same bits as the former form, the patch axis moved last and back (a strided reduction ~10x slower on CPU), so
    every method reading per-token ViT states on Qwen keeps the same tokens."""
    from tokprune.encoder_taps import merge_units

    g = torch.Generator().manual_seed(0)
    for shape in [(5476, 1280), (64, 3, 7), (12,)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        moved = merge_units(x.movedim(0, -1), 4).movedim(-1, 0)
        assert torch.equal(merge_units(x, 4, dim=0), moved)
    with pytest.raises(ValueError, match="merge units of 4"):
        merge_units(torch.zeros(6, 2), 4, dim=0)


@pytest.mark.parametrize("family, method", [("llava_next", "cls"), ("llava_next", "vtc_cls"),
                                            ("qwen2_5_vl", "fastv"), ("qwen3_vl", "fastv"),
                                            ("llava_onevision", "visionzip")])
def test_sdpa_and_eager_select_the_same_tokens(family, method):
    kept = []
    for attn in ("sdpa", "eager"):
        fam = Fam(family, *tiny_model(family, attn=attn))
        with torch.no_grad(), tokprune.pruned(fam.model, method, keep=4):
            fam.model(**inputs(fam))
            kept.append(tokprune.last_record(fam.model).kept[0])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


# ---------------------------------------------------------------------------------------------- apply / remove
def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_identical_outputs(zoo, family):
    fam = zoo[family]
    x = inputs(fam)
    local = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    n_hooks = _hooks(fam.model)
    lm, base = fam.model.model.language_model, fam.model.model
    ref, ref_gen = unpatched(fam)
    with torch.no_grad():
        for method in [m for m in METHODS if KINDS[(family, m)] is not None]:
            tokprune.apply(fam.model, method, keep=3, **({"layer": 1} if method == "fastv" else {}))
            fam.model(**x)
        fam.model.generate(**x, **GEN)
        tokprune.remove(fam.model)
        out = fam.model(**x).logits
        gen = fam.model.generate(**x, **GEN)
    assert torch.equal(out, ref)
    assert_same_generation(gen, ref_gen, tol=0.0)
    assert _hooks(fam.model) == n_hooks
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == local
    assert "_deepstack_process" not in vars(lm) and "pack_image_features" not in vars(base)


# ---------------------------------------------------------------------------------------------- full size
def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


@pytest.mark.slow
@torch.no_grad()
def test_qwen2_5_vl_7b_prunes_a_1024px_image_in_one_forward():
    """Qwen2.5-VL-7B with random bf16 weights: the full 32-block window-attention ViT and the 28-layer LLM (about
    17 GB; with less than 20 GiB of memory available the LLM is cut to 2 real-width layers, which does not change
    what is pruned).
    A 1024 x 1024 image (the checkpoint's pixel limits resize it to 1036 x 1036: 74 x 74 patches, 1369 tokens)
    keeps exactly the requested count before the LLM (random) and inside it (FastV before layer 1)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tokprune.configs import build_model, load

    cfg = load("qwen2.5-vl-7b")
    if _available_gib() < 20:
        cfg.text_config.num_hidden_layers = 2
        cfg.text_config.layer_types = cfg.text_config.layer_types[:2]
    model = build_model(cfg, device="cpu", dtype=torch.bfloat16)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056})  # the checkpoint's limits
    px = ip(images=make_image(1024, 1024), return_tensors="pt")
    grid = px["image_grid_thw"]
    n_img = int(grid.prod()) // 4
    assert grid.tolist() == [[1, 74, 74]] and n_img == 1369
    text = [151644, 872, 198, cfg.vision_start_token_id]
    ids = torch.tensor([text + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id, 3838, 374, 419, 30, 151645]])
    types = (ids == cfg.image_token_id).long()
    seen: dict[str, int] = {}
    lm = model.model.language_model
    hooks = [lm.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("llm_in", kw["inputs_embeds"].shape[1]),
                                          with_kwargs=True),
             lm.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("layer1", out.shape[1]))]
    try:
        tokprune.apply(model, "random", keep=256)
        out = model(input_ids=ids, mm_token_type_ids=types, pixel_values=px["pixel_values"].to(torch.bfloat16),
                    image_grid_thw=grid, logits_to_keep=1)
        assert tokprune.last_record(model).n_kept == [[256]]
        assert seen["llm_in"] == ids.shape[1] - n_img + 256
        assert torch.isfinite(out.logits).all()
        tokprune.remove(model)
        feats = model.model.get_image_features(pixel_values=px["pixel_values"].to(torch.bfloat16), image_grid_thw=grid)
        tokprune.apply(model, "fastv", keep=256, layer=1)
        out = model(input_ids=ids, mm_token_type_ids=types, image_grid_thw=grid, mm_encoder_outputs={"image": feats},
                    logits_to_keep=1)
        assert tokprune.last_record(model).n_kept == [[256]]
        assert seen["llm_in"] == ids.shape[1] and seen["layer1"] == ids.shape[1] - n_img + 256
        assert torch.isfinite(out.logits).all()
    finally:
        tokprune.remove(model)
        for h in hooks:
            h.remove()
