"""Mixed batches shrink (issue #29 item 6): after a cut, the batch is re-packed to its longest pruned row.

A batch mixes a small image, a row with two larger images of different sizes and a text-only row, left- or
right-padded, on every family. For a pre-LLM cut (``random``), an in-LLM cut (``fastv``), two in-LLM cuts
(``pdrop``) and both (``random+fastv``):

* the width each decoder layer sees equals the longest row at that depth, measured on each row run alone (a
  forward pre-hook on every layer, no tokprune internals);
* every row's logits equal the row run alone (1e-4, fp32), found in order in the batch row; after a pre-LLM cut the
  row's tokens are contiguous on the batch's padding side;
* ``generate()`` (left padding: right-padded ``generate`` is wrong in transformers itself) gives each row the
  tokens and per-step logits of its single run, with a dynamic and a static cache;
* keep-all leaves the padded batch exactly as the unpatched model computes it (the padding slots included).
"""

from __future__ import annotations

import pytest
import torch

import tokprune
import tokprune.api
from tokprune.patches.sequence import padded_right, repack, repack_slots
from tokprune.testing import QWEN_IMAGE_TAG, families, make_image, tiny_model

TOL = 1e-4
N_NEW = 4
GEN = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, output_logits=True,
           return_dict_in_generate=True)
#: a pre-LLM cut, one and two in-LLM cuts, both; every registered method is also run through the width test
METHODS = ["random", "fastv", "pdrop", "random+fastv"]
#: per row: the images (width, height); row 2 is text only
ROWS = [[(56, 56)], [(168, 112), (84, 56)], []]
QUESTIONS = ["what ?", "compare the first and the second picture please ?", "a question with no picture at all ?"]
MODELS: dict[str, tuple] = {}


def _fam(name: str) -> tuple:
    if name not in MODELS:
        MODELS[name] = tiny_model(name)
    return MODELS[name]


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    for model, _ in MODELS.values():
        tokprune.remove(model)


# ---------------------------------------------------------------------------------------------- the slot rules
def _rows(*texts: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in t] for t in texts])


def test_repack_keeps_own_padding_first_then_pads_on_the_batch_side():
    # row 0: two padding slots, 4 real tokens, 1 cut; row 1: no padding, 6 real tokens, 4 cut; row 2 kept whole
    pad = _rows("1100000", "0000000", "1110000")
    keep = _rows("0011011", "1000011", "0001111")
    idx, valid = repack(keep, pad, right=False)
    assert idx.shape[1] == 4  # the longest kept row (rows 0 and 2), not the 7 of the padded batch
    assert idx[0].tolist() == [2, 3, 5, 6] and valid[0].all()
    assert idx[1].tolist()[1:] == [0, 5, 6] and valid[1].tolist() == [False, True, True, True]  # new left padding
    assert idx[2].tolist() == [3, 4, 5, 6] and valid[2].all()  # padding the batch no longer needs is dropped
    idx, valid = repack(keep, pad, right=True)
    assert idx[1].tolist()[:3] == [0, 5, 6] and valid[1].tolist() == [True, True, True, False]  # new right padding
    # a shorter row fills with its own padding before any new slot (keep-all stays bit-identical)
    idx, valid = repack(_rows("0011111", "1111111"), _rows("1100000", "0000000"))
    assert idx.tolist() == [list(range(7))] * 2 and valid.all()


def test_padding_side_is_read_from_the_mask():
    assert not bool(padded_right(torch.tensor([[0, 1, 1], [1, 1, 1]])))
    assert bool(padded_right(torch.tensor([[1, 1, 0], [1, 1, 1]])))
    assert not bool(padded_right(torch.ones(2, 3))) and padded_right(None) is False


def test_llm_repack_fills_with_own_padding_then_dead_slots():
    pad = _rows("110000", "000000")
    keep = _rows("110011", "111001")  # row 0: 2 real survivors; row 1: 4 (two cut)
    slots, dead, any_dead = repack_slots(keep, pad)
    assert slots.tolist() == [[0, 1, 4, 5], [0, 1, 2, 5]] and not any_dead and not dead.any()
    keep = _rows("110001", "111011")  # row 0: 1 real survivor + its 2 padding slots + 2 dropped tokens made dead
    slots, dead, any_dead = repack_slots(keep, pad)
    assert slots.tolist() == [[0, 1, 2, 3, 5], [0, 1, 2, 4, 5]] and any_dead
    assert dead[0].tolist() == [False, False, True, True, False, False] and not dead[1].any()


def _text(name: str, n_images: int, question: str) -> str:
    tag = QWEN_IMAGE_TAG if name.startswith("qwen") else "<image>"
    return "user " + " ".join([tag] * n_images) + f" {question} assistant :"


def _encode(name: str, proc, rows: list[int], side: str = "left") -> dict:
    """The processor's batch of the chosen rows, padded on ``side``; LLaVA families get explicit positions (their
    forward counts positions from the left edge, so a left-padded row would differ from its single run)."""
    images = [make_image(w, h, seed=3 * r + j) for r in rows for j, (w, h) in enumerate(ROWS[r])]
    texts = [_text(name, len(ROWS[r]), QUESTIONS[r]) for r in rows]
    old, proc.tokenizer.padding_side = proc.tokenizer.padding_side, side
    try:
        x = dict(proc(images=images or None, text=texts, return_tensors="pt", padding=True))
    finally:
        proc.tokenizer.padding_side = old
    if not name.startswith("qwen"):
        x["position_ids"] = (x["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return x


class Widths:
    """The sequence length each decoder layer computes (its output's), at the first forward after ``take``."""

    def __init__(self, model) -> None:
        self.seen: dict[int, int] = {}
        self.handles = [layer.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.language_model.layers)]

    def _hook(self, i: int):
        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            self.seen.setdefault(i, hidden.shape[1])
        return hook

    def take(self) -> dict[int, int]:
        seen, self.seen = self.seen, {}
        return seen

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _find_in_order(batch_row: torch.Tensor, single: torch.Tensor) -> list[int]:
    """The slots of ``batch_row`` (W, V) that hold ``single``'s (L, V) rows, matched in order within TOL; fails when
    one is missing."""
    slots, s = [], 0
    for j in range(single.shape[0]):
        while s < batch_row.shape[0] and (batch_row[s] - single[j]).abs().max() > TOL:
            s += 1
        assert s < batch_row.shape[0], f"token {j} of the single run has no equal slot in the batch row"
        slots.append(s)
        s += 1
    return slots


def _kinds(name: str, method: str) -> tuple[str, ...] | None:
    """The kinds of the method's stages on the family ("vision", "llm", ...); None where it cannot run."""
    try:
        return tuple(st.kind for st in tokprune.api.schedule(_fam(name)[0], method, keep=1, n_visual=16).stages)
    except tokprune.UnsupportedError:
        return None


ALL = [(n, m) for n in families() for m in [*tokprune.methods(), "random+fastv"]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name, method", ALL)
def test_mixed_batch_is_repacked_and_rows_equal_single_runs(name, method, side):
    kinds = _kinds(name, method)
    if kinds is None:
        pytest.skip(f"{method} does not run on {name}")
    model, proc = _fam(name)
    rows = [0, 1, 2]
    x = _encode(name, proc, rows, side)
    widths = Widths(model)
    try:
        with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.25):
            got = model(**x).logits
            batch_widths = widths.take()
            rec = tokprune.last_record(model)
            singles, single_widths = [], []
            for r in rows:
                singles.append(model(**_encode(name, proc, [r])).logits[0])
                single_widths.append(widths.take())
    finally:
        widths.close()
    assert [len(n) for n in rec.n_visual] == [1, 2, 0]  # two image rows and a text-only row
    assert all(0 < k < n for row_k, row_n in zip(rec.n_kept, rec.n_visual) for k, n in zip(row_k, row_n))
    # the width of every layer is the longest row at that depth, not the longest padded row
    assert batch_widths == {i: max(w[i] for w in single_widths) for i in batch_widths}
    assert batch_widths[max(batch_widths)] < x["input_ids"].shape[1]
    assert got.shape[1] == max(s.shape[0] for s in singles)
    for b, single in enumerate(singles):
        slots = _find_in_order(got[b], single)
        if kinds == ("vision",):  # a pre-LLM cut: the row's tokens are contiguous, on the batch's padding side
            width, n = got.shape[1], single.shape[0]
            assert slots == (list(range(n)) if side == "right" else list(range(width - n, width)))
        if side == "left":  # the last slot holds the row's last token: what generate() continues from
            assert slots[-1] == got.shape[1] - 1


GENERATE = [(n, m, "dynamic") for n, m in ALL] + [(n, m, "static") for n in families() for m in METHODS]


@pytest.mark.parametrize("name, method, cache", GENERATE)
def test_mixed_batch_generate_equals_single_runs(name, method, cache):
    if _kinds(name, method) is None:
        pytest.skip(f"{method} does not run on {name}")
    model, proc = _fam(name)
    rows = [0, 1, 2]
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad(), tokprune.pruned(model, method, keep_ratio=0.25):
        gen = model.generate(**_encode(name, proc, rows), **GEN, **extra)
        singles = [model.generate(**_encode(name, proc, [r]), **GEN, **extra) for r in rows]
    for b, g in enumerate(singles):
        assert torch.equal(gen.sequences[b, -N_NEW:], g.sequences[0, -N_NEW:])
        assert max((la[b] - lb[0]).abs().max().item() for la, lb in zip(gen.logits, g.logits)) <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("name", families())
def test_keep_all_leaves_the_padded_batch_as_the_unpatched_model(name, method, side):
    """Nothing cut: every row keeps its own padding slots, so the batch is the unpatched one, padding included."""
    model, proc = _fam(name)
    x = _encode(name, proc, [0, 1, 2], side)
    with torch.no_grad():
        want = model(**x).logits
        with tokprune.pruned(model, method, keep_ratio=1.0):
            got = model(**x).logits
    assert got.shape == want.shape
    assert torch.equal(got, want)

