"""``score_dtype="model"`` (issue 24 item 7): the references rank attention scores computed by an eager kernel in the
model's dtype (fp16 / bf16 logits, the softmax rounded back to that dtype, the head mean in it); tokprune ranks in
float32 by default. On a bf16 model, ``score_dtype="model"`` keeps the set the reference rule keeps on the model's
own eager bf16 maps (FasterVLM: head-mean [CLS] row of the feature layer, top-k)."""

from __future__ import annotations

import pytest
import torch

import oracles
import tokprune
from tokprune.pruners.cls_attention import CLSAttention
from tokprune.testing import image_prompt, make_image, tiny_model


def _bf16_llava():
    model, proc = tiny_model("llava")
    return model.to(torch.bfloat16), proc


def test_model_dtype_scores_follow_the_eager_bf16_kernel():
    model, proc = _bf16_llava()
    layer = oracles._feature_layer(model)
    k = 5
    agree = {"model": 0, "float32": 0}
    for seed in range(6):
        x = proc(images=[make_image(64, 48, seed=seed)], text=image_prompt(proc, 1, "what ?"), return_tensors="pt")
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            attn = oracles.vision_attention(model, x, layer)[0]  # (1, H, 17, 17) bf16, the model's eager kernel
            ref_score = attn[0, :, 0, 1:].mean(0)  # the reference: head mean in bf16
            want = oracles.topk_sorted(ref_score.float(), k)
            for dtype in ("model", "float32"):
                with tokprune.pruned(model, "cls", keep=k, score_dtype=dtype, record_scores=True):
                    model(**x)
                    rec = tokprune.last_record(model)
                got = rec.kept[0][0]
                agree[dtype] += int(torch.equal(got, want))
                if dtype == "model":  # the score is a bf16 value, the reference's within one bf16 step (the row
                    # matmul and the kernel's full matmul may round a logit differently)
                    scores = rec.stages[0].scores[0][0]
                    assert torch.equal(scores, scores.to(torch.bfloat16).float())
                    torch.testing.assert_close(scores, ref_score.float(), atol=0, rtol=2 ** -7)
    assert agree["model"] == 6


def test_model_dtype_llm_rows_follow_the_eager_bf16_kernel():
    """FastV (K = 2) on a bf16 model: ``score_dtype="model"`` ranks the last prompt token's head-mean row of layer
    K-1 as the model's own eager bf16 kernel gives it (the reference's ``output_attentions`` path)."""
    model, proc = _bf16_llava()
    k = 5
    hits = 0
    for seed in range(4):
        x = proc(images=[make_image(64, 48, seed=seed)], text=image_prompt(proc, 1, "what color is it ?"),
                 return_tensors="pt")
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        img = oracles.image_positions(x["input_ids"][0], model.config.image_token_id)
        with torch.no_grad():
            probs = oracles.eager_rows_under_cuts(model, x, [], 1)[0]  # (H, N, N) bf16, layer K-1
            score = probs[:, -1, img].mean(0)  # head mean in bf16, as the reference's FastV
            want = oracles.topk_sorted(score.float(), k)
            with tokprune.pruned(model, "fastv", keep=k, score_dtype="model"):
                model(**x)
                got = tokprune.last_record(model).kept[0][0]
        hits += int(torch.equal(got, want))
    assert hits == 4


def test_option_is_validated_and_fp32_models_are_unchanged():
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        CLSAttention(score_dtype="fp16")
    model, proc = tiny_model("llava")
    x = proc(images=[make_image(64, 48, seed=1)], text=image_prompt(proc, 1, "what ?"), return_tensors="pt")
    with torch.no_grad():
        outs = []
        for dtype in ("float32", "model"):
            with tokprune.pruned(model, "fastv", keep=5, score_dtype=dtype):
                outs.append(model(**x).logits)
    assert torch.equal(outs[0], outs[1])
