"""ScaNN's AVX2 switch: found in the installed wheel, on where the CPU has AVX2, same results."""
import numpy as np

from searcher_jax.retrieval import scann_kernels
from searcher_jax.retrieval.dense_index import DenseIndex, IndexConfig, exact_search, recall_at_k


def test_cpu_flags_are_those_every_processor_lists():
    text = ("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
            "processor\t: 1\nflags\t\t: fpu sse4_2 avx fma\n")
    assert scann_kernels.cpu_flags(text) == {"fpu", "sse4_2", "avx", "fma"}
    assert scann_kernels.cpu_flags("processor\t: 0\n") == set()


def test_switch_is_found_and_follows_the_cpu():
    assert scann_kernels._avx2_switch() is not None, f"{scann_kernels.AVX2_FLAG} not exported by this scann"
    DenseIndex.build(np.eye(4, dtype=np.float32), IndexConfig(kind="brute_force"))  # any index turns it on
    assert scann_kernels.avx2_enabled() == scann_kernels.cpu_has_avx2()


def test_opt_out_keeps_the_wheels_choice(monkeypatch):
    monkeypatch.setenv("SEARCHER_SCANN_AVX2", "0")
    try:
        assert scann_kernels.enable_default.__wrapped__() is False
        assert not scann_kernels.avx2_enabled()
    finally:
        scann_kernels.set_avx2(True)


def test_avx2_kernels_return_the_same_neighbours():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 48)).astype(np.float32)
    base = centers[rng.integers(0, 50, 8000)] + 0.4 * rng.normal(size=(8000, 48)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[:200] + 0.1 * rng.normal(size=(200, 48)).astype(np.float32)
    index = DenseIndex.build(base, IndexConfig(kind="tree_ah", num_leaves=80, reorder_dtype="int8"))
    with scann_kernels.avx2(False):
        assert not scann_kernels.avx2_enabled()
        rows_baseline, scores_baseline = index.search(queries, 10)
    assert scann_kernels.avx2_enabled() == scann_kernels.cpu_has_avx2()  # restored
    with scann_kernels.avx2(True):
        rows, scores = index.search(queries, 10)
    assert np.mean(rows == rows_baseline) >= 0.999
    np.testing.assert_allclose(scores, scores_baseline, atol=1e-5)
    assert recall_at_k(rows, exact_search(base, queries, 10)) >= 0.9
