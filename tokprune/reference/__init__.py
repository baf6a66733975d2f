"""Small trained reference VLMs, so that accuracy after pruning means something offline.

    model, processor = tokprune.reference.load("llava-shapes")     # or "qwen2vl-shapes"

Both are standard ``transformers`` models (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``)
trained on this machine on Shapes-VQA (:mod:`tokprune.data.shapes`), whose answers depend on a few image patches:
pruning the wrong tokens costs accuracy. See docs/reference.md.
"""

from tokprune.reference.store import NAMES, load, names, path_of, read_meta

__all__ = ["NAMES", "load", "names", "path_of", "read_meta"]
