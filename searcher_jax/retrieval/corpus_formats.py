"""Readers for the authors' corpus formats; each yields Passages in file order.

- HotpotQA abstracts TSV: `id<TAB>Title: X Text: Y` (some lines CSV-quoted; served raw)
- KILT TSV already split by the authors: `id<TAB>{title}   {100 words}`
- KILT JSON pages `{"wikipedia_title", "text": [paragraphs]}`: split into 100-word passages
  exactly as the authors' split_kilt_to_100.py did
- FlashRAG jsonl `{"id", "contents": '"Title"\\ntext'}`
- plain jsonl `{"id", "title", "text"[, "format"]}` (format defaults to hotpot_abstract)
"""
import json
import pathlib
import re
from typing import Iterator

from searcher_jax.retrieval.passage import FORMATS, Passage

_ABSTRACT = re.compile(r"Title: (.*?) Text: (.*)", re.DOTALL)
# Files are read with errors="surrogateescape": a byte that is not UTF-8 becomes one of these
# lone surrogates, so a bad byte is reported with its line instead of a bare UnicodeDecodeError.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
KILT_WORDS_PER_PASSAGE = 100


class CorpusFormatError(ValueError):
    """A malformed corpus line; the message names the file and line."""


def _error(path, line_no: int, what: str) -> CorpusFormatError:
    return CorpusFormatError(f"{path}:{line_no}: {what}")


def passage_from_tsv_body(passage_id: str, body: str) -> Passage:
    """The text after `id<TAB>`, classified so that render() gives it back unchanged."""
    match = _ABSTRACT.fullmatch(body)
    if match:
        return Passage(passage_id, match.group(1), match.group(2), "hotpot_abstract")
    if "   " in body and not body.startswith('"'):
        title, text = body.split("   ", 1)
        return Passage(passage_id, title, text, "kilt_100w")
    return Passage(passage_id, "", body, "raw")


def _check_utf8(path, line_no: int, line: str) -> None:
    bad = _UNDECODABLE.search(line)
    if bad:
        raise _error(path, line_no, f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                                    f"character {bad.start() + 1})")


def read_tsv(path: pathlib.Path) -> Iterator[Passage]:
    """Passages of `id<TAB>passage` lines. Raises CorpusFormatError (file:line) for a line
    without exactly one tab (e.g. DPR's three-column id/text/title file), an empty id or bytes
    that are not UTF-8."""
    # utf-8-sig: the authors' abstracts file starts with a byte-order mark. Universal
    # newlines, as the authors' server read the file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            _check_utf8(path, line_no, line)
            fields = line.count("\t") + 1
            if fields != 2:
                raise _error(path, line_no, f"expected `id<TAB>passage` (2 tab-separated "
                                            f"fields), found {fields}")
            passage_id, body = line.split("\t", 1)
            if not passage_id.strip():
                raise _error(path, line_no, "empty passage id")
            yield passage_from_tsv_body(passage_id, body)


def split_kilt_page(title: str, paragraphs: list[str], first_id: int) -> list[Passage]:
    """One KILT page -> 100-word passages (markers removed, whitespace collapsed, as the authors)."""
    words = "".join(paragraphs).replace("BULLET::::", "").replace("Section::::", "").split()
    return [Passage(str(first_id + n), title, " ".join(words[i:i + KILT_WORDS_PER_PASSAGE]), "kilt_100w")
            for n, i in enumerate(range(0, len(words), KILT_WORDS_PER_PASSAGE))]


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            _check_utf8(path, line_no, line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _error(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise _error(path, line_no, f"expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _require_str(path, line_no: int, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _error(path, line_no, f"field {key!r} must be a string, got {type(value).__name__}"
                     f" (keys: {sorted(row)})")
    return _encodable(path, line_no, key, value)


def _encodable(path, line_no: int, key: str, value: str) -> str:
    """`value`, if it is text UTF-8 can hold: JSON's `\\ud800` escapes give lone surrogates,
    which the corpus store could not write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _error(path, line_no, f"field {key!r} holds a lone surrogate "
                                    f"({value[error.start]!r}), not text") from None
    return value


def read_jsonl(path: pathlib.Path) -> Iterator[Passage]:
    """Any of the jsonl layouts, chosen per line from its keys. Raises CorpusFormatError
    (file:line) for invalid JSON, bytes that are not UTF-8, or a missing or mistyped field."""
    next_kilt_id = 0
    for line_no, row in _jsonl_rows(path):
        if "wikipedia_title" in row:
            title = _require_str(path, line_no, row, "wikipedia_title")
            paragraphs = row.get("text")
            if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
                raise _error(path, line_no, "KILT page field 'text' must be a list of strings")
            for paragraph in paragraphs:
                _encodable(path, line_no, "text", paragraph)
            passages = split_kilt_page(title, paragraphs, next_kilt_id)
            next_kilt_id += len(passages)
            yield from passages
        elif "contents" in row:
            contents = _require_str(path, line_no, row, "contents")
            title, _, _ = contents.partition("\n")
            passage_id = _encodable(path, line_no, "id", str(row.get("id", line_no - 1)))
            yield Passage(passage_id, title.strip('"'), contents, "flashrag")
        else:
            text = _require_str(path, line_no, row, "text")
            title = row.get("title", "")
            fmt = row.get("format", "hotpot_abstract")
            if not isinstance(title, str):
                raise _error(path, line_no, "field 'title' must be a string")
            _encodable(path, line_no, "title", title)
            if fmt not in FORMATS:
                raise _error(path, line_no, f"unknown format {fmt!r}; expected one of {FORMATS}")
            if "id" not in row:
                raise _error(path, line_no, "missing field 'id'")
            if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
                raise _error(path, line_no, f"field 'id' must be a string or an integer, got "
                                            f"{type(row['id']).__name__}")
            yield Passage(_encodable(path, line_no, "id", str(row["id"])), title, text, fmt)


def read_corpus(path: str | pathlib.Path) -> Iterator[Passage]:
    """Passages of one corpus file, the reader picked by its extension (.tsv or .jsonl/.json)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found")
    if path.suffix == ".tsv":
        return read_tsv(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise ValueError(f"{path}: unknown corpus extension {path.suffix!r}; expected .tsv or .jsonl")
