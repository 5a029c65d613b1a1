"""Reading question files, and the `DIR:SPLIT` splits of a question_records dataset.

Formats read (one JSON object per line in .jsonl, or a .json file holding a list):
    R1-Searcher training/eval sets and the synthetic world:  idx, question, answer, ...
    reference/corpus/*.questions.jsonl:                      qidx, question, answer, ...
    FlashRAG / Search-R1:                                    id, question, golden_answers
`answer` may be a string or a list of strings; other keys are bookkeeping and ignored.

The piece both ends share: data/question_records.py builds a dataset with this reader and
data/questions.py (the training order) reads through it, so neither imports the other.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from etils import epath

from searcher_jax.rl import metrics


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]  # gold answers; the rewards score against each and keep the max


def read_questions(path) -> list[Question]:
    """Reads a question file (local or gs://), or `DIR:SPLIT` of a question_records dataset.

    Raises ValueError naming file and line (1-based; the item number in a .json list) for a
    malformed row, including a gold answer that normalises to nothing (SPEC section 3), text
    that is not UTF-8, and a string holding a lone surrogate (a `\\ud800` JSON escape: no
    tokenizer can encode it).
    """
    spec = split_spec(path)
    if spec is not None:
        return _read_split(*spec)
    path = epath.Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 (byte 0x{data[error.start]:02x})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json question file must hold a list, "
                             f"got {type(rows).__name__}")
        # In a .json list the natural "line number" is the 1-based item number.
        numbered = [(f"item {n}", n, row) for n, row in enumerate(rows, start=1)]
    else:
        numbered = []
        # split("\n"), not splitlines(): that also splits at U+2028 etc. inside JSON strings.
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue  # trailing newlines and blank separators are harmless
            try:
                numbered.append((f"line {n}", n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON: {e}") from None
    if not numbered:
        raise ValueError(f"{path}: no questions in file")
    return [_parse_row(row, f"{path}, {where}", default_id=str(n))
            for where, n, row in numbered]


def split_spec(path) -> tuple[str, str] | None:
    """(directory, split) for `DIR:SPLIT` naming a question_records dataset, else None."""
    head, _, last = str(path).rstrip("/").rpartition("/")
    if ":" not in last:  # gs:// has its colon before the last "/"
        return None
    name, _, split = last.rpartition(":")
    directory = epath.Path(f"{head}/{name}" if head else name)
    return (str(directory), split) if (directory / "dataset_info.json").exists() else None


def _read_split(directory: str, split: str) -> list[Question]:
    """A question_records split's questions, in the dataset's stored order.

    Raises ValueError for an unknown split, or for a gold that normalises to nothing (a dataset
    built before read_questions refused them), naming the dataset, split and question id.
    """
    import tensorflow_datasets as tfds  # slow to import: only for DIR:SPLIT

    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        raise ValueError(f"{directory}: no split {split!r} (has {sorted(builder.info.splits)})")
    return [_record_question(record, f"{directory}:{split}")
            for record in builder.as_data_source(split=split)]


def _record_question(record, where: str) -> Question:
    id_ = _text(record["id"])
    answers = _checked_golds([_text(a) for a in record["answers"]], f"{where}, question id {id_}",
                             key="answers")
    return Question(id=id_, question=_text(record["question"]), answers=answers)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _parse_row(row, where: str, default_id: str) -> Question:
    if not isinstance(row, dict):
        message = f"{where}: expected a JSON object, got {type(row).__name__}"
        raise ValueError(message)  # noqa: TRY004 - a bad file is a ValueError, whatever the cause
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: missing or non-string 'question' (got {question!r})")
    _check_encodable(question, where, "question")
    # FlashRAG calls the golds "golden_answers"; the authors' files call them "answer".
    key = "golden_answers" if "golden_answers" in row else "answer"
    answer = row.get(key)
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of strings "
                         f"(got {answer!r})")
    # `is not None`, not truthiness: the corpus files number their questions from qidx 0.
    ids = [row[k] for k in ("idx", "qidx", "id") if row.get(k) is not None]
    return Question(id=str(ids[0]) if ids else default_id, question=question,
                    answers=_checked_golds(answers, where, key=key))


def _checked_golds(golds: Sequence, where: str, key: str) -> tuple[str, ...]:
    """The golds as a tuple, each a string that normalises (SPEC section 3) to some text.

    Raises ValueError naming `where`, `key` and the gold otherwise: a gold such as "The", "A" or
    "" normalises to nothing, and would match every prediction under cover EM.
    """
    for gold in golds:
        if not isinstance(gold, str):
            raise ValueError(f"{where}: {key!r} has a non-string answer {gold!r}")
        _check_encodable(gold, where, key)
        if not metrics.normalize_answer(gold):
            raise ValueError(f"{where}: {key!r} has an answer that normalises to nothing "
                             f"(articles, punctuation or spaces only): {gold!r}")
    return tuple(golds)


def _check_encodable(text: str, where: str, key: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{where}: {key!r} holds a lone surrogate "
                         f"({text[error.start]!r}), not text") from None
