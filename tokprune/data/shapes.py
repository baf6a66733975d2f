"""Shapes-VQA: a seeded, procedurally generated visual question answering task whose answers live in a few patches.

A scene is a handful of coloured shapes (circle, square, triangle in red, green, blue, yellow) and sometimes a
seven-segment digit on a plain dark background. Each sample asks one question with a **single-token answer**, so
accuracy is the argmax of one next-token distribution:

=========  ==========================================  ===========================
type       question                                    answers
=========  ==========================================  ===========================
color      ``what color is the circle ?``              red / green / blue / yellow
exist      ``is there a red square ?``                 yes / no
count      ``how many triangles are there ?``          0 / 1 / 2 / 3
position   ``is the circle on the left or right ?``    left / right (image half)
digit      ``what digit is shown ?``                   0 ... 9
=========  ==========================================  ===========================

Why this task: a pruner that drops the patches of the asked-about objects must lose accuracy, and one that keeps
them need not, so accuracy after pruning measures whether a method kept the right tokens. Objects are 10-14 units
wide on a 64-unit canvas (about 2x2 patches of an 8x8 grid), and a scene has at most six objects.

Samples are a pure function of ``(split, seed, index)``: the question type cycles with the index and the answer
cycles within each type, so any block of consecutive indices is balanced over types and answers; the scene is
then drawn at random *given* the answer (e.g. a "no" to ``is there a red square ?`` gets a red circle or a blue
square as a near miss half the time). Splits use disjoint seed streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from tokprune.data.render import CANVAS, patch_owners, render

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 225), "yellow": (230, 210, 40)}
DIGIT_RGB = (235, 235, 235)
QUESTION_TYPES = ("color", "exist", "count", "position", "digit")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "exist": ("yes", "no"),
    "count": ("0", "1", "2", "3"),
    "position": ("left", "right"),
    "digit": tuple(str(d) for d in range(10)),
}
SPLITS = {"train": 0, "validation": 1, "test": 2}
PLURAL = {s: s + "s" for s in SHAPES}

SHAPE_SIZE = (10.0, 14.0)  # diameter range, canvas units
DIGIT_SIZE = (12.0, 14.0)  # glyph height range, canvas units (width is 0.6x)
MIN_GAP = 2.0  # canvas units between the bounding circles of two objects
MARGIN = 6.0  # distance of a position question's object from the vertical midline


@dataclass(frozen=True)
class Obj:
    """One object: ``kind`` is a shape name or ``"digit"``; ``color`` a colour name (``"white"`` for digits);
    ``value`` the digit shown (None for shapes); ``(x, y)`` its centre and ``size`` its diameter (glyph height
    for digits) in canvas units; ``rgb`` the exact fill."""

    kind: str
    color: str
    x: float
    y: float
    size: float
    rgb: tuple[int, int, int]
    value: int | None = None

    @property
    def radius(self) -> float:
        return self.size / 2


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]

    def shapes(self, kind: str | None = None, color: str | None = None) -> list[Obj]:
        """The shapes (not digits) matching ``kind`` and ``color`` (None matches any)."""
        return [o for o in self.objects if o.kind in SHAPES and kind in (None, o.kind) and color in (None, o.color)]

    @property
    def digit(self) -> Obj | None:
        return next((o for o in self.objects if o.kind == "digit"), None)

    def image(self, size: int = CANVAS) -> Image.Image:
        return render(self, size)

    def owners(self, grid: int) -> np.ndarray:
        """(grid, grid): ``i + 1`` where object ``i`` owns the cell, 0 for background (see :func:`patch_owners`)."""
        return patch_owners(self, grid)


@dataclass(frozen=True)
class Sample:
    """One question about one scene. ``targets`` are the indices into ``scene.objects`` the answer depends on."""

    scene: Scene
    qtype: str
    question: str
    answer: str
    targets: tuple[int, ...] = ()
    index: int = 0
    split: str = "train"

    def image(self, size: int = CANVAS) -> Image.Image:
        return self.scene.image(size)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (no image) for logging and datasets."""
        d = asdict(self)
        d["scene"] = {"background": list(self.scene.background), "objects": [asdict(o) for o in self.scene.objects]}
        return d


# ----------------------------------------------------------------------------------------------- scene building
class _Builder:
    """Places objects one at a time without overlap; raises :class:`_Retry` when a placement does not fit."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.objects: list[Obj] = []

    def _jitter(self, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        j = self.rng.integers(-20, 21, size=3)
        return tuple(int(v) for v in np.clip(np.array(rgb) + j, 0, 255))  # type: ignore[return-value]

    def place(self, kind: str, color: str | None = None, value: int | None = None,
              x_range: tuple[float, float] | None = None) -> int:
        rng = self.rng
        if kind == "digit":
            size = float(rng.uniform(*DIGIT_SIZE))
            color, rgb = "white", self._jitter(DIGIT_RGB)
        else:
            size = float(rng.uniform(*SHAPE_SIZE))
            color = color or str(rng.choice(list(COLORS)))
            rgb = self._jitter(COLORS[color])
        r = size / 2 + 1
        lo, hi = (r, CANVAS - r) if x_range is None else (max(r, x_range[0]), min(CANVAS - r, x_range[1]))
        for _ in range(60):
            if hi <= lo:
                break
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(r, CANVAS - r))
            if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (o.radius + size / 2 + MIN_GAP) ** 2 for o in self.objects):
                self.objects.append(Obj(kind, color, round(x, 2), round(y, 2), round(size, 2), rgb, value))
                return len(self.objects) - 1
        raise _Retry

    def distractors(self, n: int, kinds: Sequence[str]) -> None:
        for _ in range(n):
            if kinds:
                self.place(str(self.rng.choice(list(kinds))))

    def maybe_digit(self, p: float = 0.3) -> None:
        if self.rng.random() < p:
            self.place("digit", value=int(self.rng.integers(10)))

    def scene(self) -> tuple[Scene, np.ndarray]:
        """The scene (objects in a random drawing order, which carries no information) and that order."""
        order = self.rng.permutation(len(self.objects))
        g = int(self.rng.integers(0, 61))
        return Scene((g, g, g), tuple(self.objects[i] for i in order)), order


class _Retry(Exception):
    pass


def _others(*exclude: str) -> list[str]:
    return [s for s in SHAPES if s not in exclude]


def _color(b: _Builder, answer: str) -> tuple[str, list[int]]:
    kind = str(b.rng.choice(SHAPES))
    t = b.place(kind, answer)
    b.distractors(int(b.rng.integers(0, 4)), _others(kind))
    b.maybe_digit()
    return f"what color is the {kind} ?", [t]


def _exist(b: _Builder, answer: str) -> tuple[str, list[int]]:
    rng = b.rng
    kind, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    targets = []
    if answer == "yes":
        targets.append(b.place(kind, color))
        n_more = int(rng.integers(0, 3))
    else:
        # half the negatives are near misses: the asked shape in another colour, or another shape in the colour
        if rng.random() < 0.5:
            if rng.random() < 0.5:
                b.place(kind, str(rng.choice([c for c in COLORS if c != color])))
            else:
                b.place(str(rng.choice(_others(kind))), color)
        n_more = int(rng.integers(1, 3))
    for _ in range(n_more):
        k = str(rng.choice(SHAPES))
        c = str(rng.choice([c for c in COLORS if (k, c) != (kind, color)]))
        b.place(k, c)
    b.maybe_digit()
    return f"is there a {color} {kind} ?", targets


def _count(b: _Builder, answer: str) -> tuple[str, list[int]]:
    kind = str(b.rng.choice(SHAPES))
    targets = [b.place(kind) for _ in range(int(answer))]
    b.distractors(int(b.rng.integers(0 if targets else 1, 3)), _others(kind))
    b.maybe_digit(0.2)
    return f"how many {PLURAL[kind]} are there ?", targets


def _position(b: _Builder, answer: str) -> tuple[str, list[int]]:
    kind = str(b.rng.choice(SHAPES))
    # the object's centre at least MARGIN units from the vertical midline, on the answer's side
    half = (0.0, CANVAS / 2 - MARGIN) if answer == "left" else (CANVAS / 2 + MARGIN, CANVAS)
    t = b.place(kind, x_range=half)
    b.distractors(int(b.rng.integers(1, 4)), _others(kind))
    b.maybe_digit()
    return f"is the {kind} on the left or right ?", [t]


def _digit(b: _Builder, answer: str) -> tuple[str, list[int]]:
    t = b.place("digit", value=int(answer))
    b.distractors(int(b.rng.integers(1, 4)), SHAPES)
    return "what digit is shown ?", [t]


_BUILDERS = {"color": _color, "exist": _exist, "count": _count, "position": _position, "digit": _digit}


def make_sample(index: int, split: str = "train", seed: int = 0,
                types: Sequence[str] = QUESTION_TYPES) -> Sample:
    """Sample ``index`` of ``split``: a pure function of its arguments (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown or not types:
        raise ValueError(f"unknown question types {unknown}; types: {', '.join(QUESTION_TYPES)}")
    qtype = types[index % len(types)]
    answers = ANSWERS[qtype]
    answer = answers[(index // len(types)) % len(answers)]
    rng = np.random.default_rng([SPLITS[split], seed, index])
    for _ in range(50):
        b = _Builder(rng)
        try:
            question, targets = _BUILDERS[qtype](b, answer)
        except _Retry:
            continue
        scene, order = b.scene()
        where = {int(old): new for new, old in enumerate(order)}
        return Sample(scene, qtype, question, answer, tuple(sorted(where[t] for t in targets)), index, split)
    raise RuntimeError(f"could not place the objects of sample {index} of {split!r}")  # pragma: no cover


def answer_of(scene: Scene, qtype: str, question: str) -> str:
    """The answer to ``question`` about ``scene``, recomputed from the scene alone (an independent check of
    :func:`make_sample`, and a way to ask new questions about a generated scene)."""
    words = question.replace("?", "").split()
    if qtype == "color":
        (obj,) = scene.shapes(words[-1])
        return obj.color
    if qtype == "exist":
        return "yes" if scene.shapes(words[-1], words[-2]) else "no"
    if qtype == "count":
        kind = next(s for s in SHAPES if PLURAL[s] == words[2])
        return str(len(scene.shapes(kind)))
    if qtype == "position":
        (a,) = scene.shapes(words[2])
        return "left" if a.x < CANVAS / 2 else "right"
    if qtype == "digit":
        return str(scene.digit.value)
    raise ValueError(f"unknown question type {qtype!r}")


@dataclass
class ShapesVQA:
    """A split of Shapes-VQA as a sequence: ``ShapesVQA("test", n=200)[i]`` is ``make_sample(i, "test", seed)``.

    ``n`` is the length (None = unbounded, for streaming training data); ``types`` restricts the question types.
    """

    split: str = "train"
    n: int | None = 1000
    seed: int = 0
    types: tuple[str, ...] = field(default=QUESTION_TYPES)

    def __post_init__(self) -> None:
        self.types = tuple(self.types)
        make_sample(0, self.split, self.seed, self.types)  # validate arguments early

    def __len__(self) -> int:
        if self.n is None:
            raise TypeError("an unbounded ShapesVQA has no length; pass n=")
        return self.n

    def __getitem__(self, index: int) -> Sample:
        if self.n is not None and not -self.n <= index < self.n:
            raise IndexError(index)
        return make_sample(index % self.n if self.n else index, self.split, self.seed, self.types)

    def __iter__(self) -> Iterator[Sample]:
        i = 0
        while self.n is None or i < self.n:
            yield self[i]
            i += 1

    def batch(self, start: int, size: int) -> list[Sample]:
        return [self[i] for i in range(start, start + size)]


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A random valid question of ``qtype`` about an existing ``scene`` and its answer, or None when the scene
    admits none (e.g. no digit for ``digit``). Used to ask several questions about one training image; the
    answers are not balanced like :func:`make_sample`'s, except ``exist``, which is yes half the time when it can."""
    present = sorted({(o.kind, o.color) for o in scene.shapes()})
    if qtype == "color":
        kinds = [k for k in SHAPES if len(scene.shapes(k)) == 1]
        q = f"what color is the {rng.choice(kinds)} ?" if kinds else None
    elif qtype == "exist":
        absent = [(k, c) for k in SHAPES for c in COLORS if (k, c) not in present]
        pool = present if present and (rng.random() < 0.5 or not absent) else absent
        kind, color = pool[int(rng.integers(len(pool)))]
        q = f"is there a {color} {kind} ?"
    elif qtype == "count":
        kinds = [k for k in SHAPES if len(scene.shapes(k)) <= 3]
        q = f"how many {PLURAL[str(rng.choice(kinds))]} are there ?" if kinds else None
    elif qtype == "position":
        clear = [o.kind for o in scene.shapes()
                 if len(scene.shapes(o.kind)) == 1 and abs(o.x - CANVAS / 2) >= MARGIN]
        q = f"is the {rng.choice(clear)} on the left or right ?" if clear else None
    elif qtype == "digit":
        q = "what digit is shown ?" if scene.digit else None
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return None if q is None else (q, answer_of(scene, qtype, q))
