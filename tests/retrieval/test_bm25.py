"""BM25 at a k above the corpus size: every matching passage once, best first."""
import numpy as np

from searcher_jax.retrieval import corpus_store
from searcher_jax.retrieval.bm25 import BM25Index
from searcher_jax.retrieval.passage import Passage
from searcher_jax.retrieval.retriever import BM25Retriever


def test_k_above_the_corpus_size_returns_each_matching_passage_once(tmp_path):
    # Six passages mention cats (one to six times), one mentions a dog.
    texts = [" the cat" * (i + 1) + " sat" for i in range(6)] + [" a dog ran"]
    corpus_store.write_store((Passage(str(i), f"P{i}", t, "hotpot_abstract") for i, t in enumerate(texts)),
                             tmp_path / "corpus", progress=False)
    store = corpus_store.CorpusStore(tmp_path / "corpus")
    index = BM25Index.build(store, progress=False)
    rows, scores = index.search(["cat", "cat dog", "zebra"], 100)
    assert sorted(rows[0].tolist()) == list(range(6))  # the dog passage scores 0: no match
    assert sorted(rows[1].tolist()) == list(range(7))
    assert len(rows[2]) == len(scores[2]) == 0
    for r, s in zip(rows, scores):
        assert r.dtype == np.int64 and s.dtype == np.float32 and len(r) == len(s)
        assert np.all(np.isfinite(s)) and np.all(s > 0) and np.all(np.diff(s) <= 0)
    hits = BM25Retriever(store, index).search_hits(["cat dog"], 100)[0]
    assert [h.row for h in hits] == rows[1].tolist()
    assert len({h.passage.id for h in hits}) == 7
