"""Scoring of one answer against its reference: exact match, yes/no, multiple choice.

One module so that ``tokprune eval`` and the lmms-eval task files shipped for local data score identically (the
bridge test compares their accuracies). Normalisation is deliberately small and documented: lower case, collapse
white space, strip surrounding punctuation; no stemming, no synonym lists.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SCORINGS = ("exact_match", "yes_no", "multiple_choice")
_PUNCT = " \t\n.,;:!?\"'`()[]{}"


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: ``"  Red. "`` -> ``"red"``."""
    return re.sub(r"\s+", " ", str(text)).strip(_PUNCT).lower()


def exact_match(prediction: str, answer: str) -> bool:
    """The normalised prediction equals the normalised answer."""
    return normalize(prediction) == normalize(answer)


def yes_no(prediction: str, answer: str) -> bool:
    """The first word of the prediction that is "yes" or "no" equals the answer (POPE / MME style); a
    prediction with neither word is wrong."""
    for word in normalize(prediction).replace(",", " ").split():
        word = word.strip(_PUNCT)
        if word in ("yes", "no"):
            return word == normalize(answer)
    return False


def choice_index(answer: str, choices: Sequence[str]) -> int:
    """Index of ``answer`` among ``choices``: the choice text itself, a letter (A, B, ...) or a 0-based index."""
    norm = [normalize(c) for c in choices]
    a = normalize(answer)
    if a in norm:
        return norm.index(a)
    if len(a) == 1 and a.isalpha() and ord(a) - ord("a") < len(choices):
        return ord(a) - ord("a")
    if a.isdigit() and int(a) < len(choices):
        return int(a)
    raise ValueError(f"answer {answer!r} is none of the choices {list(choices)} (nor a letter or index of one)")


def pick_scoring(answers: Sequence[str], has_choices: bool) -> str:
    """The scoring a dataset gets when none is asked for: multiple_choice with choices, yes_no when every answer
    is yes or no, else exact_match."""
    if has_choices:
        return "multiple_choice"
    if answers and all(normalize(a) in ("yes", "no") for a in answers):
        return "yes_no"
    return "exact_match"


def is_correct(scoring: str, prediction: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """Score one prediction; for ``multiple_choice`` the prediction is the chosen choice's text and the answer
    may also be a letter or an index (see :func:`choice_index`)."""
    if scoring == "yes_no":
        return yes_no(prediction, answer)
    if scoring == "exact_match":
        return exact_match(prediction, answer)
    if scoring == "multiple_choice":
        if not choices:
            raise ValueError("multiple_choice scoring needs the choices")
        return choice_index(prediction, choices) == choice_index(answer, choices)
    raise ValueError(f"unknown scoring {scoring!r}; scorings: {', '.join(SCORINGS)}")
