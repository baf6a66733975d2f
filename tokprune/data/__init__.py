"""Procedurally generated data sets for measuring what pruning costs (no downloads).

``shapes``: Shapes-VQA, coloured shapes and digits with single-token answers that depend on a few patches.
"""

from tokprune.data.shapes import (
    ANSWERS,
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    SPLITS,
    Obj,
    Sample,
    Scene,
    ShapesVQA,
    answer_of,
    make_sample,
)

__all__ = ["ANSWERS", "COLORS", "QUESTION_TYPES", "SHAPES", "SPLITS", "Obj", "Sample", "Scene", "ShapesVQA",
           "answer_of", "make_sample"]
