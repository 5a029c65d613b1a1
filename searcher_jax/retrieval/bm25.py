"""BM25 (bm25s) over the rendered passages of a corpus store.

bm25s is imported on first use: importing it runs a JAX computation (its backend
probe), which would start the XLA backend before a multi-host run has called
jax.distributed.initialize.
"""
from __future__ import annotations

import importlib
import logging
import pathlib
from typing import Sequence

import numpy as np

from searcher_jax.retrieval.corpus_store import CorpusStore

STOPWORDS = "en"


def _bm25s():
    # bm25s logs "The query is empty" at INFO for each such query: expected, and handled in
    # BM25Index.search, so it is not news in a run's log.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return importlib.import_module("bm25s")


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return _bm25s().tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class BM25Index:
    """Lexical index; rows are corpus-store rows."""

    def __init__(self, model, num_passages: int):  # model: a bm25s.BM25
        self._model = model
        self.num_passages = num_passages

    @classmethod
    def build(cls, store: CorpusStore, progress: bool = True, chunk: int = 100_000) -> "BM25Index":
        tokens = []
        for start in range(0, len(store), chunk):
            tokens.extend(_tokenize(store.rendered(start, start + chunk)))
        model = _bm25s().BM25()
        model.index(tokens, show_progress=progress)
        return cls(model, len(store))

    def search(self, queries: Sequence[str], k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """-> (rows, scores): per query, int64 [m] and float32 [m], best first, m <= min(k, N).

        The passages are distinct and each shares a term with the query (score > 0), so a
        query sharing terms with fewer than min(k, N) passages gets fewer.
        """
        k = min(k, self.num_passages)
        if not queries or k == 0:
            return [np.zeros(0, np.int64)] * len(queries), [np.zeros(0, np.float32)] * len(queries)
        # A query whose terms are all stopwords or unknown gets an empty token list; bm25s
        # then scores every passage 0, which the filter below drops.
        rows, scores = self._model.retrieve(_tokenize(queries), k=k, show_progress=False,
                                            backend_selection="numpy", n_threads=0)
        keep = scores > 0
        return ([r[m].astype(np.int64) for r, m in zip(rows, keep)],
                [s[m].astype(np.float32) for s, m in zip(scores, keep)])

    def save(self, directory: str | pathlib.Path) -> None:
        self._model.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: str | pathlib.Path, num_passages: int) -> "BM25Index":
        """The index `save` wrote, for a corpus of `num_passages` passages. Raises
        FileNotFoundError (no params.index.json) or ValueError naming the directory: bm25s
        cannot read its files (truncated, garbage), or they index another number of
        documents than the corpus holds."""
        directory = pathlib.Path(directory)
        if not (directory / "params.index.json").is_file():
            raise FileNotFoundError(f"{directory} holds no BM25 index (build one with launch/build_index.py)")
        try:
            model = _bm25s().BM25.load(str(directory), mmap=True, show_progress=False)
            indexed = int(model.scores["num_docs"])
        except (ValueError, OSError, EOFError, KeyError, TypeError) as error:
            raise ValueError(f"{directory}: bm25s cannot read the BM25 index "
                             f"({type(error).__name__}: {error}); rebuild it with "
                             f"launch/build_index.py") from None
        if indexed != num_passages:
            raise ValueError(f"{directory}: the BM25 index covers {indexed} documents, but the "
                             f"corpus holds {num_passages} passages (an index of another corpus)")
        return cls(model, num_passages)
