"""QA metrics of the paper: answer extraction, normalisation, EM, cover EM and F1.

Every metric takes one prediction and a list of gold answers and keeps the best
match, as the released evaluation does.
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
    """SQuAD-style normalisation with the released code's extras, in its order."""
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


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def cover_exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """ACC_R: every token of some gold answer occurs among the prediction's tokens."""
    pred_tokens = set(normalize_answer(prediction).split())
    return float(any(all(t in pred_tokens for t in normalize_answer(g).split())
                     for g in _golds(golds)))


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    return max(_f1(normalize_answer(prediction), normalize_answer(g)) for g in _golds(golds))


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
