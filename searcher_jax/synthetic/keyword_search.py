"""A small keyword retriever, only for writing the pretraining demonstrations.

Scores a passage by the query words it shares, a title word counting twice.
It is not the project's retriever (that is searcher_jax/retrieval); it only
has to put the passage a good query names first, and something plausible but
unhelpful first for a poor query.
"""
import collections
import re

from searcher_jax.synthetic import passages

_TITLE_WEIGHT = 2


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


class KeywordSearch:
    """Top-k passages by shared words; ties keep corpus order."""

    def __init__(self, rows: list[dict]):
        self._rendered = [passages.render_passage(row["title"], row["text"]) for row in rows]
        self._postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for index, row in enumerate(rows):
            title_words = _words(row["title"])
            for word in title_words | _words(row["text"]):
                weight = _TITLE_WEIGHT if word in title_words else 1
                self._postings[word].append((index, weight))

    def search(self, query: str, k: int) -> list[str]:
        """Rendered passages ("Title: X Text: Y"), best first; [] when no word matches."""
        scores: dict[int, int] = collections.Counter()
        for word in _words(query):
            for index, weight in self._postings.get(word, ()):
                scores[index] += weight
        best = sorted(scores, key=lambda index: (-scores[index], index))[:k]
        return [self._rendered[index] for index in best]
