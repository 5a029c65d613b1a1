"""The HTTP server: both clients' request formats, 4xx answers, batching, and the client backend."""
import contextlib
import http.client
import http.server
import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from searcher_jax.retrieval import corpus_store
from searcher_jax.retrieval.dense_index import DenseIndex, IndexConfig
from searcher_jax.retrieval.hits import Hit
from searcher_jax.retrieval.http_client import HttpRetriever, RetrievalServerError
from searcher_jax.retrieval.passage import Passage, strip_corpus_id
from searcher_jax.retrieval.retriever import DenseRetriever, RetrieverConfig, make_retriever
from searcher_jax.retrieval.server import RetrievalServer, ServerLimits
from tests.retrieval.conftest import clustered_vectors

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
QUERIES = ["Irish Home Rule movement party campaigned", "Mad City 1997 film director", "zzzz qqqq"]


def _reject_constant(name):
    raise ValueError(f"the body holds a bare {name}, which strict JSON parsers reject")


@contextlib.contextmanager
def _serving(handler):
    """A stand-in HTTP server on loopback with the given handler class; yields its URL."""
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _answering(*bodies: bytes):
    """A stand-in handler answering each POST 200 with the next of `bodies`."""
    pending = list(bodies)

    class Answering(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            body = pending.pop(0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    return Answering


def _post(url, path, payload, raw=None):
    """A plain HTTP client: (status, JSON body decoded as strictly as JSON.parse would)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = raw if raw is not None else json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read(), parse_constant=_reject_constant)
    conn.close()
    return status, data


@pytest.fixture(scope="module")
def dense_server(hotpot_subset_dense):
    with RetrievalServer(hotpot_subset_dense, port=0, limits=ServerLimits(max_queries=16, max_k=10),
                         num_passages=len(hotpot_subset_dense.store)) as server:
        yield server


def test_binds_loopback_by_default(dense_server):
    assert dense_server.url.startswith("http://127.0.0.1:")


def test_r1searcher_queries_format(dense_server, hotpot_subset_dense):
    status, data = _post(dense_server.url, "/queries", {"queries": QUERIES, "k": 3})
    assert status == 200 and set(data) == {"queries", "answers"}
    assert data["queries"] == QUERIES
    expected = hotpot_subset_dense.search_hits(QUERIES, 3)
    assert [len(a) for a in data["answers"]] == [3, 3, 3]
    for lines, hits in zip(data["answers"], expected):
        for line, hit in zip(lines, hits):
            assert re.match(r"^\d+\t", line)  # the R1-Searcher client strips `^\d+\s+`
            assert strip_corpus_id(line) == hit.passage.render()
    status, data = _post(dense_server.url, "/queries", {"queries": QUERIES[:1]})  # k defaults to 3
    assert status == 200 and len(data["answers"][0]) == 3


def test_searchr1_retrieve_format(dense_server, hotpot_subset_dense):
    status, data = _post(dense_server.url, "/retrieve", {"queries": QUERIES, "topk": 2, "return_scores": True})
    assert status == 200 and set(data) == {"result"}
    hits = hotpot_subset_dense.search_hits(QUERIES, 2)
    for items, expected in zip(data["result"], hits):
        assert [set(i) for i in items] == [{"document", "score"}] * 2
        assert [i["document"] for i in items] == [{"id": h.passage.id, "contents": h.passage.contents()}
                                                  for h in expected]
        assert [i["score"] for i in items] == pytest.approx([h.score for h in expected], abs=1e-5)
        title, _, text = items[0]["document"]["contents"].partition("\n")  # how Search-R1 splits it
        assert title == f'"{expected[0].passage.title}"' and text == expected[0].passage.text
    status, data = _post(dense_server.url, "/retrieve", {"queries": QUERIES[:1], "topk": 2})
    assert status == 200 and [set(d) for d in data["result"][0]] == [{"id", "contents"}] * 2


@pytest.mark.parametrize("path, payload, raw, status, message", [
    ("/queries", None, b"{not json", 400, "malformed JSON"),
    ("/queries", None, b"\xff\xfe", 400, "malformed JSON"),
    ("/queries", [1, 2], None, 400, "expected a JSON object"),
    ("/queries", {"k": 3}, None, 400, "missing field 'queries'"),
    ("/queries", {"queries": "one string"}, None, 400, "list of strings"),
    ("/queries", {"queries": ["a", 3]}, None, 400, "list of strings"),
    ("/queries", {"queries": ["a"], "k": 0}, None, 400, "'k' must be a positive integer"),
    ("/queries", {"queries": ["a"], "k": "3"}, None, 400, "'k' must be a positive integer"),
    ("/queries", {"queries": ["a"], "k": 11}, None, 413, "k=11 exceeds the limit of 10"),
    ("/retrieve", {"queries": ["a"], "topk": True}, None, 400, "'topk' must be a positive integer"),
    ("/retrieve", {"queries": ["a"], "topk": 80}, None, 413, "topk=80 exceeds the limit of 10"),
    ("/retrieve", {"queries": ["a"], "return_scores": "yes"}, None, 400, "return_scores"),
    ("/queries", {"queries": ["a"] * 17}, None, 413, "17 queries exceed the limit of 16"),
    ("/queries", {"queries": ["a" * 5000]}, None, 413, "5000 characters"),
    ("/search", {"queries": ["a"]}, None, 404, "unknown path"),
])
def test_malformed_requests_get_4xx(dense_server, path, payload, raw, status, message):
    got, data = _post(dense_server.url, path, payload, raw)
    assert got == status and message in data["error"]


def test_server_survives_bad_requests_and_oversize_bodies(dense_server):
    host, port = dense_server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/queries")
    conn.putheader("Content-Length", str(100 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "exceeds the limit" in json.loads(response.read())["error"]
    conn.close()
    assert _post(dense_server.url, "/queries", {"queries": QUERIES[:1], "k": 1})[0] == 200


def test_client_backend_matches_in_process(dense_server, hotpot_subset_dense):
    in_process = hotpot_subset_dense.search(QUERIES, 3)
    r1 = make_retriever(RetrieverConfig(backend="http", url=dense_server.url)).search(QUERIES, 3)
    assert [[p.render() for p in ps] for ps in r1] == [[p.render() for p in ps] for ps in in_process]
    s1 = HttpRetriever(dense_server.url, api="searchr1").search(QUERIES, 3)
    assert [[(p.id, p.text) for p in ps] for ps in s1] == [[(p.id, p.contents()) for p in ps] for ps in in_process]
    with pytest.raises(RetrievalServerError, match="413"):
        HttpRetriever(dense_server.url).search(QUERIES, 50)


class _RowEncoder:
    """Stands in for TextEncoder: the query "i" is the i-th of fixed query vectors."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_queries(self, texts):
        return self.vectors[[int(t) for t in texts]]


@pytest.fixture(scope="module")
def tree_server(tmp_path_factory):
    """The default limits (k up to 100) over a 3,000-passage tree index that reorders 50."""
    vectors = clustered_vectors(3000, 32, 0, centers=50)
    directory = tmp_path_factory.mktemp("tree_corpus")
    corpus_store.write_store((Passage(str(i), f"T{i}", f" text {i}", "hotpot_abstract") for i in range(3000)),
                             directory, progress=False)
    index = DenseIndex.build(vectors, IndexConfig(kind="tree_ah"))
    assert index.built_type == "tree_ah_reorder"
    retriever = DenseRetriever(corpus_store.CorpusStore(directory),
                               _RowEncoder(clustered_vectors(8, 32, 1, centers=50)), index)
    with RetrievalServer(retriever, port=0, num_passages=3000) as server:
        yield server


@pytest.mark.parametrize("k", [80, ServerLimits().max_k])
def test_a_tree_index_serves_every_k_the_server_accepts(tree_server, k):
    queries = [str(i) for i in range(8)]
    status, data = _post(tree_server.url, "/retrieve", {"queries": queries, "topk": k, "return_scores": True})
    assert status == 200
    for items in data["result"]:
        assert len({i["document"]["id"] for i in items}) == len(items) == k
        scores = [i["score"] for i in items]
        assert all(math.isfinite(x) for x in scores) and scores == sorted(scores, reverse=True)
    status, data = _post(tree_server.url, "/queries", {"queries": queries, "k": k})
    assert status == 200 and all(len(set(lines)) == k for lines in data["answers"])
    for hits in HttpRetriever(tree_server.url, api="searchr1").search_hits(queries, k):
        assert len({h.passage.id for h in hits}) == k and all(math.isfinite(h.score) for h in hits)


class _ScoreRetriever:
    """One hit per query, scored `score`."""

    def __init__(self, score):
        self.score = score

    def search_hits(self, queries, k):
        return [[Hit(0, Passage("0", "T", " t", "hotpot_abstract"), self.score)] for _ in queries]


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_server_never_writes_a_non_finite_number(score):
    with RetrievalServer(_ScoreRetriever(score), port=0) as server:
        status, data = _post(server.url, "/retrieve", {"queries": ["q"], "topk": 1, "return_scores": True})
        assert status == 500 and "non-finite score" in data["error"]
        assert _post(server.url, "/queries", {"queries": ["q"], "k": 1})[0] == 200  # scores not sent


def test_client_rejects_an_answer_with_a_bare_nan():
    nan = b'{"result": [[{"document": {"id": "0", "contents": "T"}, "score": NaN}]]}'
    with _serving(_answering(nan)) as url:
        client = HttpRetriever(url, api="searchr1", retries=0)
        with pytest.raises(RetrievalServerError, match="invalid JSON: NaN is not a JSON number"):
            client.search(["q"], 1)


class _GatedRetriever:
    """Blocks its first call until released, so the test controls what queues up behind it."""

    def __init__(self, max_k=None):
        self.release = threading.Event()
        self.batches = []
        self.max_k = max_k

    def search_hits(self, queries, k):
        self.batches.append((list(queries), k))
        self.release.wait(timeout=30)
        if self.max_k is not None and k > self.max_k:
            raise RuntimeError(f"this index serves k <= {self.max_k}, not {k}")
        return [[Hit(i, Passage(str(i), q, " t", "hotpot_abstract"), 1.0) for i in range(k)] for q in queries]


def _queue_behind_a_blocked_search(retriever, server, ks):
    """Posts one request, waits until its search blocks, queues one request per k in ks behind
    it, then releases: -> {name: (status, body)} with names q0, q1, ..."""
    results = {}

    def ask(name, k):
        results[name] = _post(server.url, "/queries", {"queries": [name, name + "2"], "k": k})

    threads = [threading.Thread(target=ask, args=("first", 1))]
    threads[0].start()
    deadline = time.monotonic() + 30
    while not retriever.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    threads += [threading.Thread(target=ask, args=(f"q{i}", k)) for i, k in enumerate(ks)]
    for t in threads[1:]:
        t.start()
    while server.searcher._queue.qsize() < len(ks) and time.monotonic() < deadline:
        time.sleep(0.01)
    retriever.release.set()
    for t in threads:
        t.join(timeout=30)
    return results


def test_concurrent_requests_of_one_k_share_one_search_call():
    retriever = _GatedRetriever()
    ks = [1 + i % 2 for i in range(5)]
    with RetrievalServer(retriever, port=0) as server:
        results = _queue_behind_a_blocked_search(retriever, server, ks)
    # Behind the first call: one call for the three k=1 requests, one for the two k=2 ones.
    assert sorted((k, len(queries)) for queries, k in retriever.batches[1:]) == [(1, 6), (2, 4)]
    for i, k in enumerate(ks):
        status, data = results[f"q{i}"]
        assert status == 200 and data["queries"] == [f"q{i}", f"q{i}2"]
        assert [len(a) for a in data["answers"]] == [k] * 2  # each request gets its own k
        assert data["answers"][0][0] == f"0\tTitle: q{i} Text:  t"


def test_a_k_the_index_cannot_serve_fails_only_its_own_request():
    retriever = _GatedRetriever(max_k=2)
    with RetrievalServer(retriever, port=0) as server:
        results = _queue_behind_a_blocked_search(retriever, server, [3, 1, 2])
    assert results["q0"][0] == 500 and "serves k <= 2" in json.dumps(results["q0"][1])
    assert [results[name][0] for name in ("q1", "q2")] == [200, 200]


def test_serve_retriever_cli(tmp_path, reference_dir, capsys):
    from launch import build_index, serve_retriever
    corpus = reference_dir / "r1searcher" / "corpus_samples" / "train_np_title_abs_sample_100.tsv"
    assert build_index.main(["--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--backends", "bm25",
                             "--no_progress"]) == 0
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "serve_retriever.py"),
                                "--index_dir", str(tmp_path / "idx"), "--backend", "bm25", "--port", "0"],
                               stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        line = process.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
        status, data = _post(url, "/queries", {"queries": ["Lucy Mair anthropologist"], "k": 1})
        assert status == 200
        assert data["answers"][0][0].startswith("1\tTitle: Lucy Mair Text:  Lucy Philip Mair")
        # The port taken: a message, not a traceback.
        port = url.rpartition(":")[2]
        with pytest.raises(SystemExit) as exited:
            serve_retriever.main(["--index_dir", str(tmp_path / "idx"), "--backend", "bm25", "--port", port])
        assert exited.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        process.terminate()  # SIGTERM: a graceful stop, status 0, the port free again
        assert process.wait(timeout=30) == 0
    socket.create_server(("127.0.0.1", int(port))).close()
    # An index without the backend asked for, or no index at all: a message, not a traceback.
    for index_dir, says in ((tmp_path / "idx", "built with backends ['bm25'], not 'dense'"),
                            (tmp_path / "none", "index.json not found")):
        with pytest.raises(SystemExit) as exited:
            serve_retriever.main(["--index_dir", str(index_dir), "--backend", "dense"])
        assert exited.value.code == 2 and says in capsys.readouterr().err


def test_client_retries_transient_failures_but_not_bad_requests():
    """A 503 or a dropped connection is retried with backoff; a 400 fails at once."""

    replies = [503, 200]
    seen = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            seen.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            code = replies.pop(0) if replies else 400
            body = (json.dumps({"queries": ["q"], "answers": [["12\tTitle: A Text: b"]]})
                    if code == 200 else "no").encode()
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with _serving(Flaky) as url:
        client = HttpRetriever(url, retries=2, backoff_s=0.01)
        assert client.search(["q"], 1)[0][0].render() == "Title: A Text: b"
        assert len(seen) == 2
        with pytest.raises(RetrievalServerError, match="answered 400"):
            client.search(["q"], 1)
        assert len(seen) == 3  # no retry of a 4xx
    unreachable = HttpRetriever(url, retries=1, backoff_s=0.01, timeout_s=1)
    with pytest.raises(RetrievalServerError, match="after 1 retries"):
        unreachable.search(["q"], 1)


def test_client_says_a_connection_broken_mid_answer_was_not_retried():
    """urllib3 retries up to the answer's headers; a body cut short fails the one try, and the
    message says so rather than claiming the retries were spent."""
    seen = []

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            seen.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"queries": ')  # and the connection closes

        def log_message(self, *args):
            pass

    with _serving(Cut) as url:
        with pytest.raises(RetrievalServerError, match="broke or timed out .* while the answer was read, "
                                                       "which is not retried: .*IncompleteRead"):
            HttpRetriever(url, retries=2, backoff_s=0.01).search(["q"], 1)
    assert len(seen) == 1


def test_client_rejects_answers_not_of_its_api_and_a_bad_on_failure():
    bodies = [b'{"queries": ["a", "b"], "answers": [["1\\tTitle: A Text: a"]]}', b'{"result": 3}', b"[1]"]
    with _serving(_answering(*bodies)) as url:
        with pytest.raises(RetrievalServerError, match=r"/queries answered 1 results for 2 queries"):
            HttpRetriever(url, retries=0).search(["a", "b"], 1)
        with pytest.raises(RetrievalServerError, match=r"/retrieve answered JSON not of the searchr1 API"):
            HttpRetriever(url, api="searchr1", retries=0).search(["a"], 1)
        none_document = HttpRetriever(url, retries=0, on_failure="none_document")
        assert none_document.search(["a", "b"], 1) == [[], []]  # a JSON list, not an object
        assert none_document.take_metrics() == {"retrieval/failed_queries": 2.0}
        assert none_document.take_metrics() == {"retrieval/failed_queries": 0.0}  # counted once
    with pytest.raises(ValueError, match="on_failure must be one of"):
        RetrieverConfig(backend="http", url="http://127.0.0.1:1", on_failure="skip")
    # A url requests refuses on every try is refused at once: with none_document it searched
    # nothing all run, every query counted failed.
    for url in ("", "127.0.0.1:8000", "localhost:8000", "htp://x", "http://"):
        with pytest.raises(ValueError, match=f"needs an http:// or https:// url with a host.*got {url!r}"):
            HttpRetriever(url, on_failure="none_document")
