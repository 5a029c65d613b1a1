"""The retrieval server under load from a second process (launch/load_test_retrieval.py), a few
seconds of it: every request answered once with its own answer, bad ones refused with a message;
and the load test's answer check catches a batcher that deals one request's hits to another."""
import time

import pytest

from launch import build_index, load_test_retrieval
from searcher_jax.retrieval import server as server_module
from searcher_jax.retrieval.retriever import RetrieverConfig, make_backend
from searcher_jax.retrieval.server import RetrievalServer, ServerLimits


@pytest.fixture(scope="module")
def corpus(reference_dir):
    return reference_dir / "r1searcher" / "corpus_samples" / "train_np_title_abs_sample_100.tsv"


def test_a_few_seconds_of_load_lose_nothing(corpus):
    report = load_test_retrieval.main(["--clients", "6", "--seconds", "3", "--bad_every", "5",
                                       "--pool", "64", "--corpus", str(corpus)])
    assert report["errors"] == 0, report["first_errors"]
    assert report["lost"] == 0
    assert report["answered"] == report["requests"] >= 6
    # Each kind of bad request was sent and refused as expected (400, 413, 413) with a message.
    assert set(report["bad_requests_refused"]) == {"malformed_json", "oversized", "oversized_chunked"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]


def test_the_check_catches_hits_dealt_to_the_wrong_request(corpus, tmp_path, monkeypatch):
    assert build_index.main(["--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--backends", "bm25",
                             "--no_progress"]) == 0
    retriever = make_backend(RetrieverConfig(backend="bm25", index_dir=str(tmp_path / "idx")))

    def misdeal(self, batch):
        # Slow enough that requests queue up behind it, then every request of a batch is given
        # the first one's hits (a slicing fault); alone, a request gets its own.
        time.sleep(0.05)
        hits = self._retriever.search_hits(batch[0].queries, batch[0].k)
        for pending in batch:
            pending.future.set_result(hits)

    monkeypatch.setattr(server_module.BatchingSearcher, "_run", misdeal)
    with RetrievalServer(retriever, port=0, limits=ServerLimits(max_body_bytes=65536)) as server:
        report = load_test_retrieval.main(["--url", server.url, "--clients", "4", "--seconds", "1.5",
                                           "--bad_every", "0", "--pool", "64", "--corpus", str(corpus)])
    assert report["errors_by_kind"].get("wrong_answer", 0) > 0, report
    assert report["lost"] == report["errors"] == report["requests"] - report["answered"] > 0


def test_more_queries_per_request_than_the_pool_holds_is_a_usage_error(corpus):
    # It crashed every client thread unseen: no request sent, no error, status 0.
    with pytest.raises(SystemExit) as exited:  # 4 queries per request from a pool of 2
        load_test_retrieval.main(["--url", "http://127.0.0.1:9", "--pool", "2", "--corpus", str(corpus)])
    assert exited.value.code == 2
