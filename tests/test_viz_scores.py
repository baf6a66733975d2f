"""Opt-in scores in the record (``apply(..., record_scores=True)``): the heat-map shows what the selection saw."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune.testing import QWEN_IMAGE_TAG, image_prompt, make_image, tiny_model
from tokprune.viz import picture


def prefill(family: str, method: str, **kw):
    model, proc = tiny_model(family)
    img = make_image(84, 56)
    text = f"user {QWEN_IMAGE_TAG} what ? assistant :" if family.startswith("qwen") else image_prompt(proc)
    enc = proc(images=[img], text=[text], return_tensors="pt")
    tokprune.apply(model, method, **kw)
    with torch.no_grad():
        model(**enc)
    return model, img, tokprune.last_record(model)


def top(scores: torch.Tensor, k: int) -> list[int]:
    ok = torch.isfinite(scores).nonzero()[:, 0]
    return sorted(ok[scores[ok].topk(k).indices].tolist())


@pytest.mark.parametrize("family,method", [("llava", "cls"), ("llava", "vtc_cls"), ("llava", "fastv"),
                                           ("qwen2_vl", "random"), ("qwen2_5_vl", "fastv"), ("qwen3_vl", "fastv")])
def test_recorded_scores_are_the_ones_the_selection_ranked(family, method) -> None:
    model, _, rec = prefill(family, method, keep_ratio=0.5, record_scores=True)
    (stage,) = rec.stages
    scores, kept = stage.scores[0][0], stage.kept[0][0]
    assert scores.shape == (rec.n_visual[0][0],) and torch.isfinite(scores).all()
    assert top(scores, kept.numel()) == kept.tolist()
    assert "vision_scores" not in vars(model.tokprune.pruner) and "llm_scores" not in vars(model.tokprune.pruner)


def test_next_scores_leave_newlines_unscored() -> None:
    _, _, rec = prefill("llava_next", "cls", keep=4, record_scores=True, tile_budget="global")
    scores, kept = rec.stages[0].scores[0][0], rec.stages[0].kept[0][0]
    nan = (~torch.isfinite(scores)).nonzero()[:, 0]
    assert nan.numel() == 2 and set(nan.tolist()) <= set(kept.tolist())  # the 2 newlines: kept, not scored
    assert top(scores, 4) == sorted(set(kept.tolist()) - set(nan.tolist()))


def test_scores_are_off_by_default_and_the_heat_map_says_how_to_get_them() -> None:
    _, img, rec = prefill("llava", "cls", keep=4)
    assert rec.stages[0].scores is None
    with pytest.raises(ValueError, match=r"record_scores=True"):
        picture(img, rec, scores=True)
    _, img, rec = prefill("llava", "cls", keep=4, record_scores=True)
    assert picture(img, rec, scores=True).tobytes() != picture(img, rec).tobytes()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_catp_stage1_scores_are_its_greedy_order(family) -> None:
    """CATP's facility-location greedy has no score of its own: the record holds its pick order as one, whose top k
    are exactly the stage-1 picks (and the tokens never picked score 0)."""
    _, _, rec = prefill(family, "catp", keep_ratio=0.5, record_scores=True)
    stage = rec.stages[0]
    scores, kept = stage.scores[0][0], stage.kept[0][0]
    assert stage.kind == "vision" and torch.isfinite(scores).all()
    assert top(scores, kept.numel()) == kept.tolist()
    assert (scores[kept] > 0).all() and int((scores > 0).sum()) == kept.numel()
    assert len(set(scores[kept].tolist())) == kept.numel()  # a strict order: one rank per pick


def test_a_stage_without_scores_shows_the_last_stage_that_has_them() -> None:
    """CATP's LLM cuts select without a per-token score: the heat-map of the last stage uses stage 1's scores and
    says so, instead of failing (issue #22)."""
    from tokprune.viz.panels import scored_stage

    _, img, rec = prefill("llava", "catp", keep_ratio=0.5, record_scores=True)
    assert [s.scores is not None for s in rec.stages] == [True, False, False]
    assert scored_stage(rec) == 0 and scored_stage(rec, 0) == 0
    fallback = picture(img, rec, scores=True)
    plain = picture(img, rec)
    assert fallback.height > plain.height  # the label "scores of the vision stage (LLM layer 3 scores none)"
    assert picture(img, rec, stage=0, scores=True).height == plain.height  # stage 0 has its own: no label


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_show_scores_runs_for_every_method(family, tmp_path) -> None:
    """``tokprune show --scores`` with the default method list (every method the model runs) succeeds: catp shows
    stage 1's scores, a method that records none (flowcut's in-encoder cut on LLaVA) is drawn without, labelled."""
    from tokprune.cli import main

    assert main(["show", "--model", f"tiny:{family}", "--scores", "--keep", "0.5", "--size", "48",
                 "--out", str(tmp_path / "k.png")]) == 0
