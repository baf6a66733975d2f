"""``tokprune.last_record`` after prompts without images: None, never an earlier image prompt's record."""

from __future__ import annotations

import torch

import tokprune
from tokprune.testing import image_prompt, make_image, tiny_model


def test_text_only_generate_forgets_the_image_record():
    model, proc = tiny_model("llava")
    text = proc.tokenizer("user what is in the picture ? assistant :", return_tensors="pt")
    image = proc(images=make_image(), text=image_prompt(proc), return_tensors="pt")
    with torch.no_grad(), tokprune.pruned(model, "cls", keep=4):
        model.generate(**text, max_new_tokens=2)
        assert tokprune.last_record(model) is None  # nothing was pruned yet
        model.generate(**image, max_new_tokens=2)
        assert tokprune.last_record(model).n_kept == [[4]]
        model.generate(**text, max_new_tokens=2)
        assert tokprune.last_record(model) is None  # not the image prompt's record
