"""A ``datasets.Dataset`` view of Shapes-VQA, for code that expects Hugging Face datasets (optional dependency:
``pip install datasets`` or ``pip install tokprune[eval]``)."""

from __future__ import annotations

from typing import Any

from tokprune.data.shapes import QUESTION_TYPES, ShapesVQA


def to_dataset(split: str = "test", n: int = 1000, seed: int = 0, types: tuple[str, ...] = QUESTION_TYPES,
               image_size: int = 64) -> Any:
    """Samples ``0 .. n-1`` of ``split`` as a ``datasets.Dataset`` with columns ``image`` (PIL, ``image_size``
    px), ``question``, ``answer``, ``qtype``, ``index`` and ``scene`` (objects and background as plain data)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_dataset needs the optional 'datasets' package: pip install datasets") from e

    def rows() -> Any:
        for s in ShapesVQA(split, n=n, seed=seed, types=types):
            d = s.to_dict()
            yield {"image": s.image(image_size), "question": s.question, "answer": s.answer, "qtype": s.qtype,
                   "index": s.index, "scene": d["scene"]}

    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "qtype": datasets.Value("string"), "index": datasets.Value("int64"),
        "scene": {"background": datasets.Sequence(datasets.Value("int64")),
                  "objects": [{"kind": datasets.Value("string"), "color": datasets.Value("string"),
                               "x": datasets.Value("float64"), "y": datasets.Value("float64"),
                               "size": datasets.Value("float64"), "rgb": datasets.Sequence(datasets.Value("int64")),
                               "value": datasets.Value("int64")}]},
    })
    return datasets.Dataset.from_list(list(rows()), features=features)
