"""launch/build_index.py end to end on a small real corpus, and its error for a malformed line."""
import json

import pytest

from launch import build_index
from searcher_jax.retrieval.passage import strip_corpus_id
from searcher_jax.retrieval.retriever import RetrieverConfig, make_retriever


def test_build_dense_and_bm25_then_load_with_the_factory(tmp_path, reference_dir, capsys):
    corpus = reference_dir / "r1searcher" / "corpus_samples" / "train_np_title_abs_sample_100.tsv"
    out = tmp_path / "index"
    assert build_index.main(["--corpus", str(corpus), "--out", str(out), "--backends", "dense,bm25",
                             "--max_length", "64", "--batch_size", "16", "--no_progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["passages"] == 100 and summary["dim"] == 384
    assert summary["index_type"] == "brute_force"  # 100 passages: below the tree threshold
    assert summary["recall_at_10_vs_exact"] == 1.0
    assert summary["dense_bytes_per_million_passages"] >= 384 * 4 * 1e6
    assert summary["build_s"] > 0 and summary["corpus_bytes"] > 0 and summary["bm25_bytes"] > 0
    assert json.loads((out / "index.json").read_text())["encoder"]["family"] == "minilm"

    lines = corpus.read_text(encoding="utf-8-sig").splitlines()
    lucy = strip_corpus_id(lines[1])
    for backend in ("dense", "bm25"):
        retriever = make_retriever(RetrieverConfig(backend=backend, index_dir=str(out), encoder_batch_size=8))
        (top,) = retriever.search(["Lucy Mair British anthropologist"], 3)
        assert top[0].render() == lucy, backend
    with pytest.raises(ValueError, match="backend must be one of"):
        RetrieverConfig(backend="faiss")

    # The faster tree layout's flags reach the index (rebuilt over the same embedding shards).
    assert build_index.main(["--corpus", str(corpus), "--out", str(out), "--index_kind", "tree_ah",
                             "--pca_dims", "64", "--reorder_dtype", "int8", "--spill_threshold", "0.1",
                             "--leaves_to_search_fraction", "1.0", "--max_length", "64", "--no_progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["index_type"] == "tree_pca_ah_reorder"
    assert (summary["index_config"]["pca_dims"], summary["index_config"]["spill_threshold"]) == (64, 0.1)
    assert summary["recall_at_10_vs_exact"] >= 0.9


def test_malformed_corpus_line_is_reported_with_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "broken.jsonl"
    corpus.write_text('{"id": "1", "title": "A", "text": " a"}\n{"id": "2", "title": "B", "text": " b"\n')
    assert build_index.main(["--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--backends", "bm25",
                             "--no_progress"]) == 2
    assert f"{corpus}:2: invalid JSON" in capsys.readouterr().err
