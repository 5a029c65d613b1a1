"""Shared, expensive set-up for the retrieval tests (built once per session)."""
import dataclasses

import numpy as np
import pytest

from searcher_jax.retrieval import corpus_formats, corpus_store, reference_eval
from searcher_jax.retrieval.bm25 import BM25Index
from searcher_jax.retrieval.dense_index import DenseIndex, IndexConfig
from searcher_jax.retrieval.retriever import BM25Retriever, DenseRetriever

# Encoding all 4,750 HotpotQA abstracts takes minutes on 2 CPU cores, so the dense tests use
# the passages the authors retrieved for the first questions that searched (their top-5 of
# each query) and those queries: a smaller, easier corpus than the full one (see
# launch/bench_retrieval.py --real_eval for the full-corpus numbers).
DENSE_SUBSET_QUERIES = 120
DENSE_MAX_LENGTH = 128


def clustered_vectors(n, dim, seed, centers=200, decay=0.0):
    """-> [n, dim] float32 unit vectors around `centers` centres (the same for every seed)."""
    # Real embeddings are clustered; on uniform random vectors every ANN index loses recall.
    # decay > 0: the spread falls as i^-decay along the i-th of random orthogonal directions
    # (all-MiniLM-L6-v2's variance falls about as 1/i: decay 0.55).
    rng, center_rng = np.random.default_rng(seed), np.random.default_rng(99)
    rotation = np.linalg.qr(center_rng.normal(size=(dim, dim)))[0].astype(np.float32) if decay else None
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -decay
    c = center_rng.normal(size=(centers, dim)).astype(np.float32) * scale
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32) * scale
    if decay:
        x = x @ rotation
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclasses.dataclass
class RealCorpus:
    store: corpus_store.CorpusStore
    by_id: dict
    queries: list


def _real_corpus(reference_dir, directory, keep_ids=None) -> RealCorpus:
    passages = corpus_formats.read_corpus(reference_dir / "corpus" / "hotpotqa_qwen.corpus.jsonl")
    if keep_ids is not None:
        passages = (p for p in passages if p.id in keep_ids)
    corpus_store.write_store(passages, directory, progress=False)
    store = corpus_store.CorpusStore(directory)
    queries = reference_eval.load_reference_queries(reference_dir / "corpus" / "hotpotqa_qwen.questions.jsonl")
    return RealCorpus(store, {p.id: p for p in store}, queries)


@pytest.fixture(scope="session")
def hotpot_full(reference_dir, tmp_path_factory) -> RealCorpus:
    return _real_corpus(reference_dir, tmp_path_factory.mktemp("hotpot_full"))


@pytest.fixture(scope="session")
def hotpot_bm25(hotpot_full) -> BM25Retriever:
    return BM25Retriever(hotpot_full.store, BM25Index.build(hotpot_full.store, progress=False))


@pytest.fixture(scope="session")
def minilm_encoder():
    from searcher_jax.retrieval.encoder import TextEncoder
    return TextEncoder.load(max_length=DENSE_MAX_LENGTH, batch_size=32)


@pytest.fixture(scope="session")
def hotpot_subset(reference_dir, tmp_path_factory) -> RealCorpus:
    queries = reference_eval.load_reference_queries(reference_dir / "corpus" / "hotpotqa_qwen.questions.jsonl")
    queries = queries[:DENSE_SUBSET_QUERIES]
    keep = {i for q in queries for i in q.authors_doc_ids}
    subset = _real_corpus(reference_dir, tmp_path_factory.mktemp("hotpot_subset"), keep)
    return dataclasses.replace(subset, queries=queries)


@pytest.fixture(scope="session")
def hotpot_subset_dense(hotpot_subset, minilm_encoder) -> DenseRetriever:
    vectors = minilm_encoder.encode_passages(hotpot_subset.store.rendered())  # [N, 384]
    index = DenseIndex.build(vectors, IndexConfig(kind="brute_force"))
    return DenseRetriever(hotpot_subset.store, minilm_encoder, index)
