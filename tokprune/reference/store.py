"""Saving and loading reference models: ``weights/<name>/`` holds a standard ``from_pretrained`` directory.

Files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (the model), ``tokenizer.json`` +
``tokenizer_config.json`` (the word-level tokenizer), for LLaVA ``processor_config.json`` (the whole processor,
``LlavaProcessor.from_pretrained`` works), and ``reference.json`` (family, image size, question types, prompt
format and the accuracy measured when it was trained). Qwen2-VL processors cannot ``save_pretrained`` without
torchvision, so the Qwen processor is rebuilt in code from the saved tokenizer and the image settings recorded in
``reference.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"
#: shipped models: name -> family
NAMES = {"llava-shapes": "llava", "qwen2vl-shapes": "qwen2vl"}


def names() -> list[str]:
    """Reference models shipped with the package (those whose weights are present)."""
    return sorted(n for n in NAMES if (WEIGHTS / n / "model.safetensors").exists())


def path_of(name: str | Path) -> Path:
    p = Path(name)
    if p.is_dir():
        return p
    if str(name) in NAMES:
        p = WEIGHTS / str(name)
        if (p / "model.safetensors").exists():
            return p
        raise FileNotFoundError(f"the weights of {name!r} are not in {p}; train them with "
                                f"python -m tokprune.reference.train --arch {NAMES[str(name)]} --out {p}")
    raise ValueError(f"unknown reference model {name!r}; shipped: {', '.join(NAMES)} (or pass a directory)")


def save(model: Any, processor: Any, family: str, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write the model (safetensors), tokenizer, processor settings and ``reference.json`` to ``out``."""
    from tokprune.reference.arch import image_size, qwen_image_processor_settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if family == "llava":
        processor.save_pretrained(out)
    else:
        processor.tokenizer.save_pretrained(out)
    meta = {"family": family, "image_size": image_size(family), **meta}
    if family == "qwen2vl":
        meta["image_processor"] = qwen_image_processor_settings()
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_meta(name: str | Path) -> dict[str, Any]:
    return json.loads((path_of(name) / "reference.json").read_text())


def load(name: str | Path = "llava-shapes", dtype: Any = None, attn: str = "sdpa") -> tuple[Any, Any]:
    """``(model, processor)`` of a shipped reference model (``"llava-shapes"``, ``"qwen2vl-shapes"``) or of a
    directory written by :func:`save`, entirely offline. The model is in eval mode, fp32 unless ``dtype``."""
    import torch
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    from tokprune.reference.arch import build_processor

    path = path_of(name)
    meta = read_meta(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation=attn,
                                                        local_files_only=True).eval()
    if meta["family"] == "llava":
        from transformers import LlavaProcessor

        processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    else:
        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        tok.padding_side = "left"
        processor = build_processor("qwen2vl", tok, meta.get("image_processor"))
    processor.tokenizer.padding_side = "left"
    return model, processor
