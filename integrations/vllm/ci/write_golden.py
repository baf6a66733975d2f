"""Golden results of tokprune's Hugging Face path, for the vLLM plugin's CI job to compare against.

Runs in the *main* venv (transformers 5.23-5.25, tokprune installed). For both shipped reference models
(``llava-shapes``, ``qwen2vl-shapes``) and a fixed set of prompts (one image, two images; a portrait image on
Qwen), it records for the unpruned model and each method the plugin serves: the prompt ids the model ran on after
pruning, the kept visual-token indices per image (``tokprune.last_record``), the greedy tokens and the top-5
log-probabilities of each generated step, all in fp32.

It also writes, next to ``golden.json``, what the vLLM job needs that the shipped folders lack: the images (PNG)
and a vLLM-ready copy of each model folder (symlinks to the shipped files, plus a ``preprocessor_config.json``
for Qwen, whose processor is rebuilt in code by tokprune and never saved).

    python integrations/vllm/ci/write_golden.py --out /tmp/tokprune-vllm-golden
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

#: tokens generated per prompt (greedy)
NEW_TOKENS = 4
#: visual tokens kept per image (of 64 on both reference models)
KEEP = 16
TOP = 5
#: methods compared on each model: (method, options); the plugin's servable methods that the model supports
METHODS = {
    "llava-shapes": [("cls", {}), ("vtc_cls", {}), ("visionzip", {"merge": "llm"}), ("hiprune", {}),
                     ("random", {"seed_by": "content"}), ("divprune", {}), ("vispruner", {})],
    "qwen2vl-shapes": [("visionzip", {"merge": "llm"}), ("hiprune", {}), ("random", {"seed_by": "content"}),
                       ("divprune", {}), ("vispruner", {})],
}


def _images(family: str) -> dict[str, Image.Image]:
    """Deterministic test images: Shapes-VQA scenes at the model's size; Qwen also a 64x256 portrait (a 16x4
    token grid, so its text offset max(h, w) + 1 differs from vLLM's video-pruning default base + width)."""
    from tokprune.data.shapes import make_sample
    from tokprune.reference.arch import image_size

    side = image_size(family)
    out = {f"scene{i}": make_sample(i, "validation").image(side) for i in range(5)}
    if family == "qwen2vl":
        for name, first in (("portrait", 10), ("portrait2", 20)):
            tall = Image.new("RGB", (64, 256))
            for i in range(4):
                tall.paste(make_sample(first + i, "validation").image(64), (0, 64 * i))
            out[name] = tall
    return out


def _prompts(family: str) -> list[dict[str, Any]]:
    from tokprune.data.shapes import make_sample
    from tokprune.reference.text import IMAGE_TAG

    tag = IMAGE_TAG[family]
    q = [make_sample(i, "validation").question for i in range(5)]
    # every image appears once, so that each prompt runs the encoder on all its images (vLLM caches encoder
    # outputs by image content within an engine)
    prompts = [
        {"id": "one", "images": ["scene0"], "text": f"user {tag} {q[0]} assistant :"},
        {"id": "one_b", "images": ["scene1"], "text": f"user {tag} {q[1]} assistant :"},
        {"id": "two", "images": ["scene2", "scene3"], "text": f"user {tag} {tag} {q[2]} assistant :"},
    ]
    if family == "qwen2vl":
        prompts.append({"id": "portrait", "images": ["portrait"], "text": f"user {tag} {q[3]} assistant :"})
        prompts.append({"id": "portrait_two", "images": ["portrait2", "scene4"],
                        "text": f"user {tag} {tag} {q[4]} assistant :"})
    return prompts


def _vllm_model_dir(name: str, src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """A folder vLLM can load: the shipped files linked, plus the Qwen image processor's settings as a file."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = dst / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(f.resolve(), link)
    if meta["family"] == "qwen2vl":
        from tokprune.patches.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        ip = meta["image_processor"]
        size = ip["size"]
        cfg = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
               "patch_size": ip["patch_size"], "merge_size": ip["merge_size"],
               "temporal_patch_size": ip["temporal_patch_size"], "size": size,
               "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
               "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
               "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
               "rescale_factor": 1 / 255, "resample": 3}
        (dst / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


#: a tiny random Qwen2.5-VL (tokprune.testing.tiny_model: 4 ViT blocks, 56-px windows, blocks 1 and 3 full)
QWEN25 = "tiny-qwen2.5-vl"
QWEN25_KEEP = 8


def _tiny_qwen25(dst: Path) -> tuple[Any, Any, str, dict[str, Image.Image], list[dict[str, Any]]]:
    """The tiny Qwen2.5-VL, saved where vLLM can load it, with square and portrait images of 16 tokens each (no
    resize: 112x112 and 56x224 px are multiples of the 28-px merge unit within the pixel bounds)."""
    from tokprune.testing import QWEN_IMAGE_TAG, make_image, tiny_model

    model, processor = tiny_model("qwen2_5_vl")
    # vLLM's CPU attention needs head_dim >= 32: the same tiny model with a 128-wide LLM (4 heads of 32)
    cfg = model.config
    text = cfg.text_config
    text.hidden_size, text.intermediate_size = 128, 256
    if getattr(text, "head_dim", None) is not None:
        text.head_dim = 32
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [4, 6, 6]}
    cfg.vision_config.out_hidden_size = 128
    torch.manual_seed(0)
    model = type(model)(cfg).eval()
    model.save_pretrained(dst)
    processor.tokenizer.save_pretrained(dst)
    ip = processor.image_processor
    size = dict(ip.size)
    from tokprune.patches.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
           "patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
           "size": size, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
           "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
           "do_normalize": True, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3}
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    images = {"sq0": make_image(112, 112, seed=0), "sq1": make_image(112, 112, seed=1),
              "sq2": make_image(112, 112, seed=2), "tall": make_image(56, 224, seed=3)}
    t = QWEN_IMAGE_TAG
    prompts = [{"id": "one", "images": ["sq0"], "text": f"user {t} what is in the image ? assistant :"},
               {"id": "two", "images": ["sq1", "sq2"], "text": f"user {t} {t} what is in the image ? assistant :"},
               {"id": "portrait", "images": ["tall"], "text": f"user {t} what is in the image ? assistant :"}]
    return model, processor, "qwen2_5_vl", images, prompts


@torch.no_grad()
def _run(model: Any, processor: Any, family: str, prompt: dict[str, Any], images: dict[str, Image.Image],
         pruned: bool, image_tokens: int | None = None,
         processor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    import tokprune

    imgs = [images[k] for k in prompt["images"]]
    if image_tokens is None:
        enc = dict(processor(images=imgs, text=[prompt["text"]], return_tensors="pt", **(processor_kwargs or {})))
    else:  # the downsample baseline: that many image tokens per image (as tokprune.eval.predict.encode)
        tag = processor.image_token
        enc = dict(processor.tokenizer([prompt["text"].replace(tag, tag * image_tokens)], return_tensors="pt"))
        enc.update(processor.image_processor(imgs, return_tensors="pt"))
        enc.pop("token_type_ids", None)
    out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    n_prompt = enc["input_ids"].shape[1]
    tokens = out.sequences[0, n_prompt:].tolist()
    top = []
    for step in out.logits:
        lp = step[0].float().log_softmax(-1)
        v, i = lp.topk(TOP)
        top.append([[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())])
    res: dict[str, Any] = {"prompt": prompt["id"], "tokens": tokens, "top": top,
                           "prompt_ids": enc["input_ids"][0].tolist()}
    if pruned:
        rec = tokprune.last_record(model)
        res["kept"] = [k.tolist() for k in rec.stages[0].kept[0]]
        res["n_visual"] = rec.n_visual[0]
        # the prompt the LLM ran on: the unpruned one less each image's dropped tokens
        res["pruned_len"] = n_prompt - sum(rec.n_visual[0]) + sum(len(k) for k in res["kept"])
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for golden.json, images/ and models/")
    ap.add_argument("--with-qwen25", action="store_true",
                    help="also a tiny random Qwen2.5-VL (window attention), saved for vLLM")
    args = ap.parse_args(argv)

    import transformers

    import tokprune
    from tokprune.reference import load, path_of, read_meta

    torch.manual_seed(0)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    golden: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__,
                              "keep": KEEP, "new_tokens": NEW_TOKENS, "top": TOP, "models": {}}
    models = list(METHODS.items())
    if args.with_qwen25:
        models.append((QWEN25, METHODS["qwen2vl-shapes"]))
    for name, methods in models:
        keep = KEEP
        if name == QWEN25:
            model, processor, family, images, prompts = _tiny_qwen25(out / "models" / name)
            keep = QWEN25_KEEP
        else:
            meta = read_meta(name)
            family = meta["family"]
            _vllm_model_dir(name, path_of(name), out / "models" / name, meta)
            images = _images(family)
            model, processor = load(name)
            prompts = _prompts(family)
        for key, img in images.items():
            img.save(out / "images" / f"{name}-{key}.png")
        runs: dict[str, Any] = {"unpruned": [_run(model, processor, family, p, images, False) for p in prompts]}
        if family == "llava":  # the downsample baseline of tokprune's eval (tokprune.eval.variants); on Qwen the
            # plugin refuses it (a smaller image: vLLM's own max_pixels)
            from types import SimpleNamespace

            from tokprune.config import Budget
            from tokprune.eval.variants import downsample

            fam = {"qwen2vl": "qwen2_vl"}.get(family, family)
            opts, undo = downsample(SimpleNamespace(family=fam, model=model, processor=processor),
                                    Budget(keep=keep), 64)
            try:
                res = [_run(model, processor, family, p, images, False, opts.get("image_tokens"),
                            opts.get("processor_kwargs")) for p in prompts]
            finally:
                undo()
            for r in res:
                r["pruned_len"] = len(r["prompt_ids"])
            runs["downsample"] = {"options": {}, "results": res}
        for method, options in methods:
            tokprune.apply(model, method, keep=keep, **options)
            try:
                runs[method] = {"options": options,
                                "results": [_run(model, processor, family, p, images, True) for p in prompts]}
            finally:
                tokprune.remove(model)
        golden["models"][name] = {
            "family": family, "dir": str(out / "models" / name), "prompts": prompts, "keep": keep,
            "images": {k: str(out / "images" / f"{name}-{k}.png") for k in images},
            "unpruned": runs.pop("unpruned"), "methods": runs,
        }
        print(f"{name}: {len(prompts)} prompts x (unpruned + {len(methods)} methods)")
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out / 'golden.json'}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
