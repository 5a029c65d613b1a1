"""ScaNN layouts against exact search, the RAM plan, and resumable corpus encoding."""
import numpy as np
import pytest

from searcher_jax.retrieval import corpus_store, embeddings
from searcher_jax.retrieval.dense_index import (DenseIndex, IndexConfig, exact_search, layout_for_budget,
                                                planned_bytes_per_passage, real_neighbours, recall_at_k)
from searcher_jax.retrieval.encoder import EncoderSpec
from searcher_jax.retrieval.passage import Passage
from tests.retrieval.conftest import clustered_vectors


@pytest.fixture(scope="module")
def clustered():
    return clustered_vectors(30_000, 64, 0), clustered_vectors(300, 64, 1)


def test_tree_ah_recall_against_exact(clustered, tmp_path):
    base, queries = clustered
    cfg = IndexConfig()  # auto: 30k passages is above the brute-force threshold
    index = DenseIndex.build(base, cfg)
    assert index.built_type == "tree_ah_reorder"
    exact = exact_search(base, queries, 10)
    rows, scores = index.search(queries, 10)
    assert rows.shape == scores.shape == (300, 10)
    recall = recall_at_k(rows, exact)
    assert recall >= 0.95, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    written = index.save(tmp_path / "dense")
    assert abs(written / len(base) - planned_bytes_per_passage(64, cfg, len(base))) < 0.1 * written / len(base)
    loaded = DenseIndex.load(tmp_path / "dense")
    assert loaded.built_type == "tree_ah_reorder"
    np.testing.assert_array_equal(loaded.search(queries, 10)[0], rows)
    # The int8 reordering layout (a third of the fp32 bytes) on the same data.
    int8 = DenseIndex.build(base, IndexConfig(kind="tree_ah", reorder_dtype="int8"))
    assert recall_at_k(int8.search(queries, 10)[0], exact) >= 0.9


def test_adaptive_leaves_per_query(clustered, tmp_path):
    # Additive spilling: each query searches the leaves scoring within spill_threshold of its
    # best one (at most 20% of them here), so a tiny threshold searches far fewer leaves.
    base, queries = clustered
    exact = exact_search(base, queries, 10)

    def build(threshold):
        return DenseIndex.build(base, IndexConfig(kind="tree_ah", spill_threshold=threshold,
                                                  leaves_to_search_fraction=0.2))

    assert recall_at_k(build(0.001).search(queries, 10)[0], exact) < 0.93
    index = build(0.05)
    rows, _ = index.search(queries, 10)
    assert recall_at_k(rows, exact) >= 0.95
    index.save(tmp_path / "spill")
    np.testing.assert_array_equal(DenseIndex.load(tmp_path / "spill").search(queries, 10)[0], rows)
    with pytest.raises(ValueError, match="spill_threshold must be 0"):
        IndexConfig(spill_threshold=-0.1)


def test_tree_on_a_pca_projection(tmp_path):
    # Clusters whose spectrum decays as all-MiniLM-L6-v2's does: PCA to half the dims keeps
    # most of the variance, and exact reordering on the full vectors puts the neighbours back
    # in order.
    base, queries = clustered_vectors(30_000, 128, 0, decay=0.55), clustered_vectors(300, 128, 1, decay=0.55)
    cfg = IndexConfig(kind="tree_ah", pca_dims=64, reorder_dtype="int8")
    index = DenseIndex.build(base, cfg)
    assert index.built_type == "tree_pca_ah_reorder"
    # Recall alone barely tells the rotation's absence here (0.970 with it, 0.955 without).
    assert "pca_random_rotate_projection_matrix: true" in index._searcher.config()
    rows, _ = index.search(queries, 10)
    assert recall_at_k(rows, exact_search(base, queries, 10)) >= 0.95
    written = index.save(tmp_path / "pca")
    assert abs(written / len(base) - planned_bytes_per_passage(128, cfg, len(base))) < 0.15 * written / len(base)
    np.testing.assert_array_equal(DenseIndex.load(tmp_path / "pca").search(queries, 10)[0], rows)
    with pytest.raises(ValueError, match=r"pca_dims \(128\) must be below the embedding width \(128\)"):
        DenseIndex.build(base, IndexConfig(kind="tree_ah", pca_dims=128))


def test_brute_force_is_exact_below_threshold(clustered):
    base, queries = clustered
    index = DenseIndex.build(base[:5000], IndexConfig())
    assert index.built_type == "brute_force"
    exact = exact_search(base[:5000], queries, 10)
    assert recall_at_k(index.search(queries, 10)[0], exact) == 1.0
    rows, _ = index.search(queries[:2], 10_000)  # k above N is clipped
    assert rows.shape == (2, 5000)
    with pytest.raises(ValueError, match=r"queries must be \[B, 64\]"):
        index.search(queries[:, :10], 3)


def _assert_real_top_k(rows, scores, k, base, queries):
    """k distinct rows per query, best first, each scored by its exact inner product."""
    assert rows.shape == scores.shape == (len(queries), k)
    assert all(len(set(r)) == k for r in rows.tolist())
    assert rows.min() >= 0 and rows.max() < len(base)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, base[rows]), atol=1e-5)


@pytest.fixture(scope="module")
def small_tree():
    # 75 leaves of ~40 passages, 4 searched, and ScaNN's default reordering depth of 50:
    # k = 100 needs a deeper reordering, and for some queries more leaves.
    base, queries = clustered_vectors(3000, 32, 0, centers=50), clustered_vectors(20, 32, 1, centers=50)
    return base, queries, DenseIndex.build(base, IndexConfig(kind="tree_ah"))


@pytest.mark.parametrize("k", [100, 80, 51, 10])
def test_tree_index_returns_k_real_neighbours_past_its_reorder_depth(small_tree, k, tmp_path):
    base, queries, index = small_tree
    assert IndexConfig().reorder_neighbors < 100
    rows, scores = index.search(queries, k)
    _assert_real_top_k(rows, scores, k, base, queries)
    assert recall_at_k(rows[:, :10], exact_search(base, queries, 10)) >= 0.95
    index.save(tmp_path / "tree")  # the depth is read back from ScaNN's config, not our metadata
    np.testing.assert_array_equal(DenseIndex.load(tmp_path / "tree").search(queries, k)[0], rows)


@pytest.mark.parametrize("kind, n", [("tree_ah", 200), ("brute_force", 30)])
def test_k_above_the_corpus_size_returns_every_passage_once(kind, n):
    base, queries = clustered_vectors(n, 32, 0, centers=5), clustered_vectors(4, 32, 1, centers=5)
    index = DenseIndex.build(base, IndexConfig(kind=kind))
    assert index.built_type.startswith(kind.split("_")[0])
    rows, scores = index.search(queries, 500)
    _assert_real_top_k(rows, scores, n, base, queries)
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.broadcast_to(np.arange(n), rows.shape))


def test_a_spilling_tree_refuses_a_k_its_nearby_leaves_cannot_fill(small_tree):
    # Additive spilling stops at the leaves near a query's best one however many may be
    # searched; here they hold 30 to 120 passages, so k = 100 cannot be served.
    base, queries, _ = small_tree
    index = DenseIndex.build(base, IndexConfig(kind="tree_ah", spill_threshold=0.001,
                                               leaves_to_search_fraction=0.2))
    _assert_real_top_k(*index.search(queries, 10), 10, base, queries)
    with pytest.raises(RuntimeError, match=r"found only \d+ passages for a query, not k=100.*spill_threshold"):
        index.search(queries, 100)


def test_real_neighbours_drops_padding_repeats_and_out_of_range_rows():
    rows = np.array([[3, 1, 3, 0, 0, 9], [2, 0, 1, 4, 3, 0]])
    scores = np.array([[0.5, 0.9, 0.7, np.nan, np.nan, 1.0], [0.9, 0.8, 0.7, 0.6, 0.5, np.inf]])
    kept, kept_scores, found = real_neighbours(rows, scores, 4, num_passages=5)
    np.testing.assert_array_equal(kept, [[1, 3, -1, -1], [2, 0, 1, 4]])
    np.testing.assert_array_equal(kept_scores, np.array([[0.9, 0.7, -np.inf, -np.inf], [0.9, 0.8, 0.7, 0.6]],
                                                        np.float32))
    np.testing.assert_array_equal(found, [2, 4])


def test_exact_search_streams_in_chunks(clustered):
    base, queries = clustered
    full = np.argsort(-(queries @ base[:3000].T), axis=1)[:, :5]
    np.testing.assert_array_equal(exact_search(base[:3000], queries, 5, chunk=700), full)
    assert recall_at_k(full, full) == 1.0 and recall_at_k(full[:, ::-1], full) == 1.0


def test_layout_for_budget_plans_a_full_wikipedia():
    # 21M x 1024 float32 is 86 GB: a 40 GB budget gets AH codes with int8 reordering.
    cfg = layout_for_budget(21_000_000, 1024, 40e9)
    assert (cfg.kind, cfg.reorder_dtype) == ("tree_ah", "int8")
    assert planned_bytes_per_passage(1024, cfg, 21_000_000) * 21e6 <= 40e9
    assert layout_for_budget(21_000_000, 1024, 60e9).reorder_dtype == "bfloat16"
    assert layout_for_budget(21_000_000, 1024, 12e9).reorder_dtype == "none"
    assert layout_for_budget(5_000, 384, 1e9).kind == "brute_force"
    with pytest.raises(ValueError, match="no single-host layout fits 5.0 GB"):
        layout_for_budget(21_000_000, 1024, 5e9)


class _CountingEncoder:
    """Stands in for TextEncoder: a deterministic vector per text, counting calls."""
    dim = 4
    spec = EncoderSpec(pooling="mean")

    def __init__(self):
        self.calls = 0

    def encode_passages(self, texts, on_batch=None):
        self.calls += 1
        return np.array([[len(t), t.count("a"), i % 3, 1.0] for i, t in enumerate(texts)], np.float32)


def test_corpus_encoding_resumes_from_missing_shards(tmp_path):
    passages = [Passage(str(i), f"T{i}", "a" * i, "kilt_100w") for i in range(10)]
    corpus_store.write_store(iter(passages), tmp_path / "corpus", progress=False)
    store = corpus_store.CorpusStore(tmp_path / "corpus")
    encoder = _CountingEncoder()
    assert embeddings.encode_store(store, encoder, tmp_path / "emb", shard_size=4, progress=False) == 3
    first = embeddings.load_embeddings(tmp_path / "emb")
    assert first.shape == (10, 4) and first[9, 1] == 9
    (tmp_path / "emb" / "shard_000001.npy").unlink()  # as if killed while writing shard 1
    with pytest.raises(FileNotFoundError, match="1 of 3 shards missing"):
        embeddings.load_embeddings(tmp_path / "emb")
    assert embeddings.encode_store(store, encoder, tmp_path / "emb", shard_size=4, progress=False) == 1
    assert encoder.calls == 4
    np.testing.assert_array_equal(embeddings.load_embeddings(tmp_path / "emb"), first)
    with pytest.raises(ValueError, match="another corpus, encoder or shard size"):
        embeddings.encode_store(store, encoder, tmp_path / "emb", shard_size=5, progress=False)
