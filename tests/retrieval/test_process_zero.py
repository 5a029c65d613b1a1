"""Process-0 retrieval: the passages and failures every process receives (two processes
simulated by a shared broadcast; tests/test_multihost.py runs it over jax.distributed)."""
import concurrent.futures

import pytest

from searcher_jax.retrieval.passage import Passage
from searcher_jax.retrieval.process_zero import (ProcessZeroRetriever, broadcast_bytes, decode_results,
                                                 encode_results)
from searcher_jax.retrieval.retriever import RetrieverConfig, make_retriever

PASSAGES = [[Passage("7", "Zürich", " A city — on the Limmat.", "hotpot_abstract")],
            [Passage("9", "", '"Fezeith"\nAcademy', "flashrag"), Passage("1", "T", "x", "raw")]]


class Fixed:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        if self.error:
            raise self.error
        return PASSAGES[:len(queries)]


def _two_processes(inner):
    sent = {}

    def broadcast(payload):  # process 0 calls first; the other process gets its payload
        return sent.setdefault("payload", payload)

    return ProcessZeroRetriever(inner, 0, broadcast), ProcessZeroRetriever(None, 1, broadcast)


def test_round_trip_keeps_every_field():
    assert decode_results(encode_results(PASSAGES)) == PASSAGES


def test_broadcast_pads_to_a_bucket_and_returns_the_payload():
    payload = encode_results(PASSAGES) * 40  # 4-8 KB: not a power of two
    assert broadcast_bytes(payload) == payload  # one process: its own payload, unpadded


def test_only_process_zero_searches_and_both_get_its_passages():
    inner = Fixed()
    zero, one = _two_processes(inner)
    assert zero.search(["q1", "q2"], 3) == PASSAGES
    assert one.search(["q1", "q2"], 3) == PASSAGES
    assert inner.calls == [(["q1", "q2"], 3)]


def test_a_threaded_search_runs_on_process_zero_only_and_both_collect_it():
    """The continuous rollout's path: submit starts the search on a pool thread of process 0
    (nothing on the others), collect gives every process its passages or its error."""
    inner = Fixed()
    zero, one = _two_processes(inner)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        future = zero.submit(pool, ["q1", "q2"], 3)
        assert one.submit(pool, ["q1", "q2"], 3) is None
        assert zero.collect(future) == PASSAGES and one.collect(None) == PASSAGES
    assert inner.calls == [(["q1", "q2"], 3)]
    zero, one = _two_processes(Fixed(error=ConnectionError("server down")))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = zero.submit(pool, ["q"], 3)
        with pytest.raises(ConnectionError, match="server down"):
            zero.collect(future)
    with pytest.raises(RuntimeError, match="process 0 failed: ConnectionError: server down"):
        one.collect(None)


class Counting(Fixed):
    """A backend with take_metrics, as the http one (its failed queries since the last take)."""

    def __init__(self):
        super().__init__()
        self.failed = 3

    def take_metrics(self):
        failed, self.failed = self.failed, 0
        return {"retrieval/failed_queries": float(failed)}


def test_every_process_logs_process_zeros_retrieval_metrics():
    zero, one = _two_processes(Counting())
    assert zero.take_metrics() == {"retrieval/failed_queries": 3.0}
    assert one.take_metrics() == {"retrieval/failed_queries": 3.0}
    zero, one = _two_processes(Fixed())  # a backend without metrics: none on any process
    assert zero.take_metrics() == {} and one.take_metrics() == {}


def test_a_failure_on_process_zero_is_raised_everywhere():
    zero, one = _two_processes(Fixed(error=ConnectionError("server down")))
    with pytest.raises(ConnectionError, match="server down"):
        zero.search(["q"], 3)
    with pytest.raises(RuntimeError, match="retrieval on process 0 failed: ConnectionError: server down"):
        one.search(["q"], 3)


def test_config_checks():
    with pytest.raises(ValueError, match="process 0, and only process 0"):
        ProcessZeroRetriever(None, 0)
    with pytest.raises(ValueError, match="search_on must be one of"):
        RetrieverConfig(search_on="host_0")
    # One process: no broadcast, the backend itself.
    retriever = make_retriever(RetrieverConfig(backend="http", url="http://127.0.0.1:9", search_on="process_0"))
    assert not isinstance(retriever, ProcessZeroRetriever)


@pytest.mark.parametrize("process", [0, 1])
def test_web_backend_always_searches_on_process_0(monkeypatch, process):
    """Live web results differ between calls: with several processes the web backend is behind
    the broadcast even under search_on="every_process", so every process inserts the same
    documents."""
    import jax
    from searcher_jax.retrieval import web
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    config = RetrieverConfig(backend="web", search_on="every_process",
                             web_search_url="http://127.0.0.1:9/search", web_search_key_env="",
                             web_llm_url="http://127.0.0.1:9/v1", web_llm_key_env="")
    retriever = make_retriever(config)
    assert isinstance(retriever, ProcessZeroRetriever)
    assert (retriever.inner is None) == (process != 0)
    if process == 0:
        assert isinstance(retriever.inner, web.WebRetriever)
        retriever.inner.close()
    # Another backend keeps search_on="every_process": its own search on every process.
    http = make_retriever(RetrieverConfig(backend="http", url="http://127.0.0.1:9"))
    assert not isinstance(http, ProcessZeroRetriever)
