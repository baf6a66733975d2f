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
