"""Beam search and ``num_return_sequences > 1`` for every method on every family (issue #29 item 2).

``generate`` encodes each image once and repeats the encoder's output tensors for every beam / returned sequence,
so the vision tower sees fewer images than the LLM has rows; tokprune maps each expanded row's images back to the
encoded ones (``tokprune.patches.prefill.encoder_sources``). The references here never take that path:

* keep-all: the unpatched model's own beam search;
* pruned: the same ``generate`` call with the inputs repeated *by hand* (:func:`by_hand`: ``generate`` is told not
  to pre-encode, and every tensor input is repeated per beam), so the encoder, the taps and the selection run on
  each copy as on a separate image: every expanded row is computed as if it were alone.

The matrix comes from the registries (``tokprune.methods()`` x ``tokprune.testing.families()``); a method a family
cannot run is left out by asking the method itself (``UnsupportedError``), never by name.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

import tokprune
import tokprune.api
from tokprune.testing import QWEN_IMAGE_TAG, families, make_image, tiny_model

TOL = 1e-5
N_NEW = 3


def supported(family: str, method: str) -> bool:
    try:
        tokprune.api.schedule(zoo(family)[0], method, keep=1, n_visual=16)
    except tokprune.UnsupportedError:
        return False
    return True


_ZOO: dict[str, tuple[Any, Any]] = {}


def zoo(family: str) -> tuple[Any, Any]:
    if family not in _ZOO:
        _ZOO[family] = tiny_model(family)
    return _ZOO[family]


MATRIX = [(f, m) for f in families() for m in tokprune.methods() if supported(f, m)]
#: two-method compositions (a vision method, then an LLM method), tokprune.Compose through "a+b"
COMPOSED = [("llava", "cls+fastv"), ("qwen2_vl", "hiprune+pdrop")]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for model, _ in _ZOO.values():
        tokprune.remove(model)


def options(family: str, method: str) -> dict:
    return {"layer": 1} if (family, method) == ("qwen3_vl", "fastv") else {}  # as in test_families


def prompt(family: str, n_images: int, question: str) -> str:
    tag = QWEN_IMAGE_TAG if family.startswith("qwen") else "<image>"
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"


#: row 0: two images of different sizes and a longer question; row 1: one image, a short question (left padding)
ROWS = [([(112, 84), (84, 112)], "compare the first and second picture ?"), ([(56, 84)], "what ?")]


def row_inputs(family: str, row: int) -> dict:
    proc = zoo(family)[1]
    sizes, question = ROWS[row]
    images = [make_image(w, h, seed=10 * row + j) for j, (w, h) in enumerate(sizes)]
    return proc(images=images, text=prompt(family, len(images), question), return_tensors="pt")


def batch_inputs(family: str) -> dict:
    proc = zoo(family)[1]
    images = [make_image(w, h, seed=10 * r + j) for r, (sizes, _) in enumerate(ROWS) for j, (w, h) in enumerate(sizes)]
    texts = [prompt(family, len(sizes), q) for sizes, q in ROWS]
    x = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert (x["attention_mask"] == 0).any()  # left padding present
    return x


def beams(n: int, returned: int | None = None) -> dict:
    """``n`` beams, ``returned`` sequences returned per prompt (all ``n`` by default)."""
    return dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, num_beams=n, num_return_sequences=returned or n,
                do_sample=False, output_scores=True, return_dict_in_generate=True)


@torch.no_grad()
def by_hand(model: Any, x: dict, **gen: Any) -> Any:
    """``model.generate(**x, **gen)`` on a one-row prompt with the inputs repeated by hand: ``generate`` runs the
    encoder inside the first forward (no pre-encoding) on one copy of the row's images per expanded row, every
    tensor input (pixels and their sizes / grids too) repeated as a whole per copy, so no two rows share an
    encoded image. Everything else (beam bookkeeping, logits processors, sampling) is ``generate``'s own."""
    assert x["input_ids"].shape[0] == 1, "by_hand repeats one-row prompts"

    def expand(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **kw):
        def rep(key: str, t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if key == "position_ids" and t.dim() == 3:  # Qwen's (4, B, N)
                return t.repeat(1, expand_size, 1)
            return t.repeat(expand_size, *([1] * (t.dim() - 1)))

        return rep("input_ids", input_ids), {key: rep(key, v) for key, v in kw.items()}

    model._supports_mm_encoder_outputs = lambda: False
    model._expand_inputs_for_generation = types.MethodType(expand, model)
    try:
        return model.generate(**x, **gen)
    finally:
        del model._supports_mm_encoder_outputs, model._expand_inputs_for_generation


def assert_rows_equal(got: Any, ref: Any, rows: slice, scores: bool = True) -> None:
    assert torch.equal(got.sequences[rows, -N_NEW:], ref.sequences[:, -N_NEW:])
    if scores:
        assert (got.sequences_scores[rows] - ref.sequences_scores).abs().max().item() <= TOL


def same_kept(rec: Any, ref: Any, rows: slice) -> bool:
    return len(rec.kept[rows]) == len(ref.kept) and all(
        torch.equal(a, b) for ra, rb in zip(rec.kept[rows], ref.kept) for a, b in zip(ra, rb))


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("family, method", MATRIX)
def test_keep_all_beam_search_is_the_unpatched_models(family, method):
    model, _ = zoo(family)
    x = batch_inputs(family)
    with torch.no_grad():
        ref = model.generate(**x, **beams(2))
        with tokprune.pruned(model, method, keep_ratio=1.0, **options(family, method)):
            got = model.generate(**x, **beams(2))
            rec = tokprune.last_record(model)
    assert torch.equal(got.sequences, ref.sequences)
    assert (got.sequences_scores - ref.sequences_scores).abs().max().item() <= TOL
    assert len(rec.n_visual) == 4 and rec.n_kept == rec.n_visual  # 2 rows x 2 beams, nothing dropped


# ---------------------------------------------------------------------------------------------- pruned
@pytest.mark.parametrize("n_beams, returned", [(3, 3), (2, 1)])
@pytest.mark.parametrize("family, method", MATRIX + COMPOSED)
def test_pruned_beam_search_equals_each_row_expanded_by_hand(family, method, n_beams, returned):
    """A padded batch (row 0: two images of different sizes, row 1: one more) with 3 beams (all returned) or 2 (the
    best returned): every sample's returned beams, their scores and the kept sets of all its beams equal that
    sample's beam search with its inputs repeated by hand."""
    model, _ = zoo(family)
    x = batch_inputs(family)
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5, **options(family, method)):
        got = model.generate(**x, **beams(n_beams, returned))
        rec = tokprune.last_record(model)
        refs = []
        for row in range(len(ROWS)):
            refs.append((by_hand(model, row_inputs(family, row), **beams(n_beams, returned)),
                         tokprune.last_record(model)))
    assert [len(r) for r in rec.n_visual] == [2] * n_beams + [1] * n_beams
    assert any("beam search" in note for note in rec.notes)
    assert all(0 < sum(k) < sum(n) for k, n in zip(rec.n_kept, rec.n_visual))  # something was pruned
    for row, (ref, ref_rec) in enumerate(refs):
        assert not any("beam search" in note for note in ref_rec.notes)  # the reference never shared an image
        assert_rows_equal(got, ref, slice(returned * row, returned * (row + 1)))
        assert same_kept(rec, ref_rec, slice(n_beams * row, n_beams * (row + 1)))


@pytest.mark.parametrize("family, method", MATRIX)
def test_sampled_return_sequences_equal_the_inputs_repeated_by_hand(family, method):
    """``num_return_sequences=2`` with seeded sampling: the same draws, token for token, as the two-image row
    repeated by hand (the encoder then runs on each copy)."""
    model, _ = zoo(family)
    x = row_inputs(family, 0)
    gen = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=True, num_return_sequences=2,
               return_dict_in_generate=True)
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5, **options(family, method)):
        torch.manual_seed(0)
        got = model.generate(**x, **gen)
        rec = tokprune.last_record(model)
        torch.manual_seed(0)
        ref = by_hand(model, x, **gen)
        ref_rec = tokprune.last_record(model)
    assert_rows_equal(got, ref, slice(None), scores=False)
    assert same_kept(rec, ref_rec, slice(None)) and len(rec.kept) == 2


def test_readme_headline_example_runs_beam_search():
    """The README's first example (``cls`` keep=8 on the shipped llava-shapes) with ``num_beams=2`` and two
    returned sequences: each beam keeps the 8 tokens the single greedy run keeps."""
    from tokprune.reference import load

    model, processor = load("llava-shapes")
    tokprune.apply(model, method="cls", keep=8)
    try:
        image = make_image(64, 64, seed=3)
        x = processor(images=image, text=prompt("llava", 1, "what is in the image ?"), return_tensors="pt")
        with torch.no_grad():
            model.generate(**x, max_new_tokens=2)
            single = tokprune.last_record(model)
            out = model.generate(**x, max_new_tokens=2, num_beams=2, num_return_sequences=2)
            rec = tokprune.last_record(model)
    finally:
        tokprune.remove(model)
    assert out.shape[0] == 2
    assert rec.n_kept == [[8], [8]]
    assert all(torch.equal(k[0], single.kept[0][0]) for k in rec.kept)


@pytest.mark.parametrize("method", ["visionzip", "fastv"])
@pytest.mark.parametrize("family", families())
def test_static_cache_beams_equal_dynamic(family, method):
    model, _ = zoo(family)
    x = batch_inputs(family)
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.5, **options(family, method)):
        dyn = model.generate(**x, **beams(2))
        sta = model.generate(**x, cache_implementation="static", **beams(2))
    assert torch.equal(dyn.sequences, sta.sequences)
    assert (dyn.sequences_scores - sta.sequences_scores).abs().max().item() <= TOL
