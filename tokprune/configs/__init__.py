"""Model configs shipped with tokprune, so FLOPs and benchmarks run offline on real model shapes.

Each ``<name>.json`` is a transformers 5.x config dict of a public checkpoint (``_source`` says which); the
``tiny-*`` ones are small random models for CPU tests and benchmarks. Keys starting with ``_`` are metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the shipped configs (usable wherever a config name is accepted)."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


def config_dict(name_or_path: str | Path) -> dict[str, Any]:
    """The raw config dict of a shipped name, a JSON file, or a model directory holding ``config.json``."""
    path = _DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config {str(name_or_path)!r}: not a shipped name ({', '.join(names())}), "
                "a JSON file or a directory with config.json"
            )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(name_or_path: str | Path) -> PretrainedConfig:
    """A transformers config from a shipped name, a JSON file or a model directory (no network access)."""
    from transformers import AutoConfig

    d = {k: v for k, v in config_dict(name_or_path).items() if not k.startswith("_")}
    if "model_type" not in d:
        raise ValueError(f"config {str(name_or_path)!r} has no model_type")
    return AutoConfig.for_model(**d)


def build_model(name_or_config: str | Path | PretrainedConfig, device: str | torch.device = "meta",
                dtype: torch.dtype | None = None, *, attn_implementation: str = "sdpa",
                seed: int | None = 0) -> nn.Module:
    """A random-weight model of a config, in eval mode.

    ``device="meta"`` allocates nothing (enough for shapes and FLOP counts, built in well under a second even for
    7B); ``"cpu"``/``"cuda"`` initialise real random weights there (``seed`` makes them reproducible).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = load(name_or_config) if isinstance(name_or_config, (str, Path)) else name_or_config
    is_vlm = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def example_inputs(config: PretrainedConfig, *, n_text: int = 16, n_images: int = 1, batch: int = 1,
                   image_size: tuple[int, int] | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, Any]:
    """Random forward inputs for a VLM config: ``n_text`` non-image prompt tokens (Qwen's vision start/end
    markers included) around ``n_images`` images per sample, with the image-token count the model expects.

    Image sizes follow :func:`tokprune.flops.image_work` (default: LLaVA's native size, a 5-tile LLaVA-NeXT image,
    24 x 24 Qwen tokens), so the same arguments give the matching :class:`tokprune.flops.TokenSchedule`.
    """
    import torch

    from tokprune.flops import image_work

    family = config.model_type
    work = image_work(config, image_size=image_size)
    g = torch.Generator().manual_seed(seed)
    qwen = family.startswith("qwen")
    image_id = config.image_token_id if qwen else config.image_token_index
    per_image = [image_id] * work.llm_tokens
    if qwen:
        per_image = [config.vision_start_token_id, *per_image, config.vision_end_token_id]
    n_free = n_text - (2 * n_images if qwen else 0)
    if n_free < 0:
        raise ValueError(f"n_text={n_text} is too small for {n_images} Qwen images (2 marker tokens each)")
    rows = []
    for _ in range(batch):
        text = torch.randint(10, 100, (n_free,), generator=g).tolist()  # ordinary ids: never a special token
        head, tail = text[: n_free // 2], text[n_free // 2:]
        rows.append(head + per_image * n_images + tail)
    input_ids = torch.tensor(rows, device=device)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    n_img = batch * n_images
    vc = config.vision_config
    if family == "llava":
        shape: tuple[int, ...] = (n_img, vc.num_channels, vc.image_size, vc.image_size)
    elif family in ("llava_next", "llava_onevision"):
        size = image_size if image_size is not None else (2 * vc.image_size, 2 * vc.image_size)
        shape = (n_img, work.sequences, vc.num_channels, vc.image_size, vc.image_size)
        inputs["image_sizes"] = torch.tensor([list(size)] * n_img, device=device)
    else:
        t, h, w = work.grid
        shape = (n_img * t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
        inputs["image_grid_thw"] = torch.tensor([list(work.grid)] * n_img, device=device)
        inputs["mm_token_type_ids"] = (input_ids == image_id).long()
    inputs["pixel_values"] = torch.randn(shape, generator=g).to(device=device, dtype=dtype or torch.float32)
    return inputs

