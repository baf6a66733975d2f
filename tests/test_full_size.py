"""Real-size configs with random weights (slow: minutes on CPU; run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch

import tokprune

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_llava_1_5_7b_cls_keeps_64_of_576():
    from tokprune.configs import build_model, load

    cfg = load("llava-1.5-7b")
    model = build_model(cfg, device="cpu", dtype=torch.bfloat16)
    tokprune.apply(model, "cls", keep=64)
    n_img = cfg.image_seq_length
    ids = torch.tensor([[1, 3148, 1001, 29901] + [cfg.image_token_id] * n_img + [1724, 338, 445, 29973, 319, 29901]])
    pixels = torch.randn(1, 3, 336, 336, dtype=torch.bfloat16)
    seen = {}

    def count_llm_tokens(module, args, kwargs):
        seen["n"] = kwargs["inputs_embeds"].shape[1]

    handle = model.model.language_model.register_forward_pre_hook(count_llm_tokens, with_kwargs=True)
    out = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    handle.remove()
    rec = tokprune.last_record(model)
    assert rec.n_visual == [[576]] and rec.n_kept == [[64]]
    assert seen["n"] == ids.shape[1] - 576 + 64
    assert torch.isfinite(out.logits).all()
