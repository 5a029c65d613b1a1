"""Property-based fuzzing (issue 20, item 5) of the corpus and question readers: any file gives
either its rows, read back unchanged through the corpus store, or the documented error naming
the file (and the line), never another exception."""
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from searcher_jax.data.question_reader import Question, read_questions
from searcher_jax.retrieval import corpus_formats, corpus_store
from searcher_jax.rl import metrics

# Deterministic (the same examples on every run and machine), no example database written.
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

TAGS = ["\t", "\n", "\r", '"', "Title: ", " Text: ", "   ", "\ufeff", "é", "\\ud800", "{", "}"]
# Text with the characters that matter to the readers, and raw bytes that need not be UTF-8.
TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(TAGS)), max_size=8).map("".join)
RAW = st.binary(max_size=40)
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), TEXT, st.lists(TEXT, max_size=3),
                  st.dictionaries(TEXT, st.integers(), max_size=2))


def _line_of(message: str, path: Path, lines: int) -> None:
    """The error names the file, then a line within it."""
    found = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
    assert found, message
    assert 1 <= int(found.group(1)) <= lines


def _lines(content: bytes) -> int:
    """Lines as the readers count them (universal newlines)."""
    return len(re.split(rb"\r\n|\r|\n", content))


def _read_back(passages):
    """The passages written to a corpus store and read back: the store loses nothing."""
    with tempfile.TemporaryDirectory() as directory:
        corpus_store.write_store(iter(passages), directory, progress=False)
        return list(corpus_store.CorpusStore(directory))


def _check_corpus(content: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"corpus{suffix}"
        path.write_bytes(content)
        try:
            passages = list(corpus_formats.read_corpus(path))
        except corpus_formats.CorpusFormatError as error:
            _line_of(str(error), path, _lines(content))
            return
        assert _read_back(passages) == passages


@FUZZ
@given(st.lists(st.one_of(st.tuples(TEXT, TEXT).map(lambda t: f"{t[0]}\t{t[1]}".encode()),
                          TEXT.map(str.encode), RAW), max_size=5))
def test_tsv_corpus_files(lines):
    _check_corpus(b"\n".join(lines), ".tsv")


ROW_KEYS = ["id", "title", "text", "format", "contents", "wikipedia_title"]


@FUZZ
@given(st.lists(st.one_of(
    st.dictionaries(st.sampled_from(ROW_KEYS), st.one_of(VALUE, st.sampled_from(
        ["hotpot_abstract", "kilt_100w", "raw", "flashrag", "html"])), max_size=5)
    .flatmap(lambda row: st.booleans().map(lambda ascii_: json.dumps(row, ensure_ascii=ascii_)))
    .map(str.encode),
    RAW), max_size=5))
def test_jsonl_corpus_files(lines):
    _check_corpus(b"\n".join(lines), ".jsonl")


QUESTION_KEYS = ["question", "answer", "golden_answers", "idx", "qidx", "id"]
QUESTION_ROW = st.one_of(st.dictionaries(st.sampled_from(QUESTION_KEYS), VALUE, max_size=5), VALUE)


def _check_questions(content: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"questions{suffix}"
        path.write_bytes(content)
        try:
            questions = read_questions(path)
        except ValueError as error:
            assert str(error).startswith(str(path)), error
            return
        assert questions
        for q in questions:
            assert type(q) is Question and isinstance(q.id, str) and q.question.strip()
            assert q.answers and all(metrics.normalize_answer(a) for a in q.answers)
            (q.question + "".join(q.answers) + q.id).encode("utf-8")  # tokenizable text


@FUZZ
@given(st.lists(st.one_of(QUESTION_ROW.map(lambda r: json.dumps(r).encode()), RAW), max_size=5))
def test_jsonl_question_files(lines):
    _check_questions(b"\n".join(lines), ".jsonl")


@FUZZ
@given(st.one_of(st.lists(QUESTION_ROW, max_size=4).map(lambda rows: json.dumps(rows).encode()),
                 QUESTION_ROW.map(lambda r: json.dumps(r).encode()), RAW))
def test_json_question_files(content):
    _check_questions(content, ".json")
