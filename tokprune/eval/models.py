"""Loading the model an evaluation runs on, with what is needed to prompt it: a :class:`ModelBundle`.

MODEL is a shipped reference model (``llava-shapes``, ``qwen2vl-shapes``: :func:`tokprune.reference.load`), or a
hub id or local directory (``from_pretrained``). The prompt comes from the processor's chat template, or from an
explicit ``template`` (``{question}`` and ``<image>`` placeholders) for processors without one; a model without
either is an error, not a guessed format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokprune.reference.store import NAMES as REFERENCE_NAMES

#: placeholder of the image in ``--template``; replaced by the processor's image token
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class ModelBundle:
    """A loaded model ready for evaluation. ``prompt(question)`` is the full text with the image placeholder;
    ``image_size`` is the side (px) generated images are rendered at (None: the data's own size);
    ``max_new_tokens`` bounds generated answers. ``answer_tokens``: the answer length that holds whatever a task
    asks (lmms-eval tasks carry their own ``max_new_tokens``): the user's explicit ``max_new_tokens``, or the
    reference models' one-token answers (they were trained to answer in one token and never emit an end of
    sequence); None lets a task's own setting apply."""

    name: str
    model: Any
    processor: Any
    prompt: Callable[[str], str]
    template: str
    image_size: int | None
    max_new_tokens: int
    answer_tokens: int | None = None

    @property
    def family(self) -> str:
        import tokprune.api  # noqa: F401  (fills the registry of families)
        from tokprune.registry import adapter_for

        return adapter_for(self.model).family

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def is_reference(name: str) -> bool:
    return name in REFERENCE_NAMES


def resolve_config(name: str) -> Any:
    """The transformers config of MODEL without loading weights (for validation before the model loads)."""
    from transformers import AutoConfig

    if is_reference(name):
        from tokprune.reference import path_of

        return AutoConfig.from_pretrained(path_of(name), local_files_only=True)
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"model directory {name!r} has no config.json")
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"model directory {name!r} does not exist")
    from tokprune import hub

    try:
        return hub.load(AutoConfig.from_pretrained, str(local) if local.exists() else name)
    except OSError as e:
        raise FileNotFoundError(f"cannot read the config of model {name!r}: {e}") from e


def load(name: str, *, device: str = "cpu", dtype: Any = None, attn: str = "sdpa", template: str | None = None,
         max_new_tokens: int | None = None) -> ModelBundle:
    """Load MODEL (see the module docstring) in eval mode on ``device``."""
    import torch

    dtype = dtype or torch.float32
    if is_reference(name):
        return _reference(name, device, dtype, attn, template, max_new_tokens)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokprune import hub

    path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    model = hub.load(AutoModelForImageTextToText.from_pretrained, path, dtype=dtype, attn_implementation=attn)
    model = model.eval().to(device)
    processor = hub.load(AutoProcessor.from_pretrained, path)
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    prompt, described = _prompt_builder(processor, template)
    return ModelBundle(name, model, processor, prompt, described, None, max_new_tokens or 16, max_new_tokens)


def _reference(name: str, device: str, dtype: Any, attn: str, template: str | None,
               max_new_tokens: int | None) -> ModelBundle:
    from tokprune.reference import load as load_reference
    from tokprune.reference import read_meta
    from tokprune.reference.arch import image_size
    from tokprune.reference.text import IMAGE_TAG, prompt

    if template is not None:
        raise ValueError(f"{name} is trained on one prompt format; --template does not apply to it")
    model, processor = load_reference(name, dtype=dtype, attn=attn)
    family = read_meta(name)["family"]

    def build(question: str) -> str:
        return prompt(family, question)

    # single-token answers: the reference models were trained to answer in one token, and greedy decoding of
    # one token is the argmax their accuracy is defined by
    return ModelBundle(name, model.to(device), processor, build, prompt(family, "{question}").replace(
        IMAGE_TAG[family], IMAGE_PLACEHOLDER), image_size(family), max_new_tokens or 1, max_new_tokens or 1)


def _prompt_builder(processor: Any, template: str | None) -> tuple[Callable[[str], str], str]:
    """``(question -> prompt text, a description of the format)`` from a template or the chat template."""
    image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    if template is not None:
        if "{question}" not in template or IMAGE_PLACEHOLDER not in template:
            raise ValueError(f"--template must contain {{question}} and {IMAGE_PLACEHOLDER}, got {template!r}")
        text = template.replace(IMAGE_PLACEHOLDER, image_token)
        return (lambda q: text.replace("{question}", q)), template
    if not getattr(processor, "chat_template", None):
        raise ValueError("the processor has no chat template; pass --template, e.g. "
                         f"'USER: {IMAGE_PLACEHOLDER}\\n{{question}} ASSISTANT:'")

    def chat(question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return chat, "chat template: " + chat("{question}")


def visual_tokens(model: str) -> int | None:
    """Visual tokens per image of MODEL when the family fixes them (LLaVA, the reference models), else None
    (dynamic resolution: the budget is checked per image at run time)."""
    from tokprune import flops

    if is_reference(model):
        from tokprune.reference.arch import GRID

        return GRID * GRID
    config = resolve_config(model)
    if getattr(config, "model_type", None) != "llava":
        return None
    return flops.image_work(config).llm_tokens
