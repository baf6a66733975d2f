"""Few-shot Shapes-VQA: episodes of demonstrations and a query, for measuring in-context learning offline.

An episode's demonstrations ask the same question type as its query (so they show the answer format), about other
scenes of the same split; they are drawn from indices disjoint from every query's, deterministically by seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tokprune.data.shapes import QUESTION_TYPES, Sample, make_sample

#: demonstrations come from this index range of the split, queries from below it, so the two never share a scene
POOL_START = 1_000_000


@dataclass
class Episode:
    """``shots``: demonstrations (each a full sample with its answer); ``query``: the sample to answer."""

    shots: list[Sample]
    query: Sample

    def triples(self, size: int | None = None) -> tuple[list[tuple], tuple]:
        """(image, question, answer) per shot and (image, question) for the query, as :func:`tokprune.prompts.icl`
        takes them; ``size`` is the image side in pixels (default: the generator's canvas)."""
        img = (lambda s: s.image()) if size is None else (lambda s: s.image(size))
        return [(img(s), s.question, s.answer) for s in self.shots], (img(self.query), self.query.question)


@dataclass
class ShapesICL:
    """``ShapesICL("test", shots=4, n=100)[i]``: query ``i`` of Shapes-VQA's split with ``shots`` demonstrations."""

    split: str = "test"
    shots: int = 4
    n: int = 100
    seed: int = 0
    types: tuple[str, ...] = field(default=QUESTION_TYPES)

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        self.types = tuple(self.types)
        make_sample(0, self.split, self.seed, self.types)  # validate arguments early

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self.n:
            raise IndexError(index)
        query = make_sample(index, self.split, self.seed, self.types)
        rng = np.random.default_rng([self.seed, index])
        shots: list[Sample] = []
        while len(shots) < self.shots:
            cand = make_sample(POOL_START + int(rng.integers(0, 10 * max(self.n, 100))), self.split, self.seed,
                               (query.qtype,))
            if all(c.index != cand.index for c in shots):
                shots.append(cand)
        return Episode(shots=shots, query=query)

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.n):
            yield self[i]
