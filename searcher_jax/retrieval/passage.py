"""A corpus passage and the exact text the authors' retriever gave the model."""
import dataclasses
import re
from typing import Sequence

from searcher_jax.data import prompts

# How a passage turns into the text the model reads. The authors' corpora are
# TSV lines "{id}\t{passage}" and the client strips the id (SPEC section 5):
#   hotpot_abstract: the HotpotQA abstracts, "Title: X Text: Y" (Y usually starts with a space);
#   kilt_100w: a 100-word KILT chunk, "{title}   {chunk}" (three spaces);
#   raw: the passage text exactly as stored (e.g. CSV-quoted abstract lines, which the
#        authors served with their quotes);
#   flashrag: a FlashRAG/Search-R1 row, whose "contents" ('"Title"\ntext') is kept verbatim.
FORMATS = ("hotpot_abstract", "kilt_100w", "raw", "flashrag")

_CORPUS_ID_PREFIX = re.compile(r"^\d+\s+")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable passage. `text` holds the whole passage for `raw` and `flashrag`."""
    id: str
    title: str
    text: str
    format: str

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"passage {self.id!r}: unknown format {self.format!r}; expected one of {FORMATS}")

    def render(self) -> str:
        """The passage text as the authors' retriever returned it (corpus id stripped)."""
        if self.format == "hotpot_abstract":
            return f"Title: {self.title} Text: {self.text}"
        if self.format == "kilt_100w":
            return f"{self.title}   {self.text}"
        return self.text

    def contents(self) -> str:
        """The Search-R1 / FlashRAG `contents` field: '"Title"\\ntext'."""
        if self.format == "flashrag":
            return self.text
        return f'"{self.title}"\n{self.text}'


def strip_corpus_id(line: str) -> str:
    """What the R1-Searcher client does to each returned corpus line."""
    return _CORPUS_ID_PREFIX.sub("", line, count=1)


def documents_text(passages: Sequence[Passage]) -> str:
    """The inside of a document block: "(1)p1\\n(2)p2\\n..."; "None" when nothing was found."""
    return prompts.documents_text([p.render() for p in passages])


def documents_block(passages: Sequence[Passage]) -> str:
    """The whole text the environment appends after a query (SPEC section 2)."""
    return prompts.documents_block([p.render() for p in passages])
