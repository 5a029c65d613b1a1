"""QA metrics of the paper: answer extraction, normalisation, EM, cover EM and F1.

Every metric takes one prediction and a list of gold answers and keeps the best
match, as the released evaluation does (SPEC section 3). A gold that normalises to
the empty string is never matched: it would credit every prediction under CEM.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_PUNCTUATION = set(string.punctuation) | {"‘", "’", "´", "`"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_YES_NO = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation with the released code's extras, in its order (SPEC section 3).

    Returns "" for text made only of articles, punctuation and spaces ("The", "A.", "").
    """
    if text == "True":
        text = "yes"
    elif text == "False":
        text = "no"
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_span(response: str) -> str | None:
    """The text between the last `<answer>` and the `</answer>` after it, unstripped: the
    released evaluation's `pred_ans`, on which its published numbers were computed (" False "
    is not the exact string "False", so it does not become "no" there)."""
    start = response.rfind("<answer>")
    if start < 0:
        return None
    end = response.find("</answer>", start)
    if end < 0:
        return None
    return response[start + len("<answer>"):end]


def extract_answer(response: str) -> str | None:
    """answer_span, stripped (what the rewards score)."""
    span = answer_span(response)
    return None if span is None else span.strip()


def _scorable_golds(golds: str | Sequence[str]) -> list[str]:
    """The normalised golds (a str is one gold), less those that normalise to "" ("The", "A.").

    An empty gold has no tokens, so CEM's "every gold token is in the prediction" holds for any
    prediction and EM would credit an empty one; such a gold says nothing about correctness and
    is skipped. Question files refuse them (data/questions.py); this also guards direct callers.
    """
    return [gold for gold in map(normalize_answer, [golds] if isinstance(golds, str) else golds)
            if gold]


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """EM (SPEC section 3): 1.0 if the normalised prediction equals some normalised gold, else 0.0.

    Golds that normalise to "" are skipped, so an empty prediction, or no gold left, scores 0.0.
    """
    return float(normalize_answer(prediction) in _scorable_golds(golds))


def cover_exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """CEM, the paper's ACC_R (SPEC section 3): 1.0 if every token of some normalised gold occurs
    among the prediction's tokens, else 0.0.

    Golds that normalise to "" are skipped (they would cover any prediction), so an empty
    prediction, or no gold left, scores 0.0.
    """
    pred_tokens = set(normalize_answer(prediction).split())
    return float(any(pred_tokens.issuperset(gold.split()) for gold in _scorable_golds(golds)))


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 (SPEC section 3), the max over the golds, in [0.0, 1.0].

    Golds that normalise to "" are skipped; with none left (an empty list too) the score is 0.0,
    as for EM and CEM, rather than max()'s error on an empty sequence.
    """
    pred = normalize_answer(prediction)
    return max((_f1(pred, gold) for gold in _scorable_golds(golds)), default=0.0)


def _f1(pred: str, gold: str) -> float:
    if (pred in _YES_NO or gold in _YES_NO) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
