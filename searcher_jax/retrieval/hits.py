"""What every retriever backend returns: a passage with its corpus row and score.

Its own module so that the backends (http_client) and the factory that builds them
(retriever) both import it without importing each other.
"""
import dataclasses
from typing import Sequence

import numpy as np

from searcher_jax.retrieval.passage import Passage


@dataclasses.dataclass(frozen=True)
class Hit:
    row: int  # the corpus-store row (-1 when unknown, e.g. from a remote server)
    passage: Passage
    score: float  # NaN when unknown: the R1-Searcher API sends no scores


class HitRetriever:
    """search() from search_hits(); backends implement search_hits (the server needs rows and scores)."""

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        raise NotImplementedError

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        return [[h.passage for h in hits] for hits in self.search_hits(queries, k)]


def check_k(k: int) -> None:
    """Raises ValueError unless k is a positive integer."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
