"""The server's request handling at the byte level: malformed and unfinished requests hold no
worker, bodies over the limit are refused however they are sent, and (hypothesis) any method,
path, headers and body get a 2xx or a 4xx with a JSON message, never a 5xx or a hang."""
import http.client
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from searcher_jax.retrieval.hits import Hit
from searcher_jax.retrieval.passage import Passage
from searcher_jax.retrieval.server import BatchingSearcher, RetrievalServer, ServerLimits

LIMITS = ServerLimits(max_queries=8, max_k=5, max_query_chars=64, max_body_bytes=16384)
TIMEOUT_S = 10.0  # a reply slower than this on loopback is a hung connection


class _EchoRetriever:
    """k hits per query, each naming its query, so an answer shows which request it serves."""

    def search_hits(self, queries, k):
        return [[Hit(i, Passage(str(i), q, f" passage {i}", "hotpot_abstract"), 1.0 / (i + 1))
                 for i in range(k)] for q in queries]


class _HeldRetriever(_EchoRetriever):
    """Records each search's size, says it is searching, then waits until released, so the
    test controls what queues up behind that search."""

    def __init__(self):
        self.searching, self.release, self.batches = threading.Event(), threading.Event(), []

    def search_hits(self, queries, k):
        self.batches.append(len(queries))
        self.searching.set()
        self.release.wait(timeout=TIMEOUT_S)
        return super().search_hits(queries, k)


@pytest.fixture(scope="module")
def server():
    with RetrievalServer(_EchoRetriever(), port=0, limits=LIMITS, num_passages=10) as running:
        yield running


def _address(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _exchange(server, raw: bytes) -> tuple[int | None, dict, bytes]:
    """Sends raw bytes, reads to the server's close -> (status or None if it closed without
    a reply, headers, body). Fails the test if the server neither answers nor closes in time."""
    with socket.create_connection(_address(server), timeout=TIMEOUT_S) as sock:
        sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                pytest.fail(f"no answer and no close within {TIMEOUT_S} s to {raw[:200]!r}")
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            assert time.monotonic() < deadline, f"the answer to {raw[:200]!r} never ended"
    if not data:
        return None, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def _request(method: str, path: str, body: bytes = b"", headers: tuple = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Length: " + str(len(body)).encode(), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _good(server):
    status, _, body = _exchange(server, _request("POST", "/queries", json.dumps({"queries": ["x"], "k": 2}).encode()))
    return status, json.loads(body)


@pytest.mark.parametrize("raw", [
    b"POST /queries HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",        # a space in a name
    b"POST /queries HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",  # a length not a number
    b"POST /queries HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",             # a NUL in a value
    b"GARBAGE\r\n\r\n",
])
def test_a_malformed_header_is_refused_at_once_and_holds_nothing(server, raw):
    start = time.monotonic()
    status, _, _ = _exchange(server, raw)
    assert status in (400, None) and time.monotonic() - start < 2.0
    assert _good(server) == (200, {"queries": ["x"], "answers": [["0\tTitle: x Text:  passage 0",
                                                                    "1\tTitle: x Text:  passage 1"]]})


def test_unfinished_requests_do_not_hold_the_server(server):
    """Clients that send half a header, or half a body, and wait (slowloris) do not delay
    anyone else."""
    held = [socket.create_connection(_address(server), timeout=TIMEOUT_S) for _ in range(20)]
    try:
        for i, sock in enumerate(held):
            sock.sendall(b"POST /queries HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else
                         b'POST /queries HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"queries": [')
        start = time.monotonic()
        assert _good(server)[0] == 200 and time.monotonic() - start < 2.0
    finally:
        for sock in held:
            sock.close()


def test_an_oversized_body_is_refused_whether_declared_or_chunked(server):
    big = json.dumps({"queries": ["y" * 60] * 300}).encode()  # over 16384 bytes
    status, headers, body = _exchange(server, _request("POST", "/queries", big))
    assert status == 413 and "exceeds the limit of 16384" in json.loads(body)["error"]
    assert headers["content-type"].startswith("application/json")
    # Chunked: no Content-Length to trust, so the bytes are counted as they are read.
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000]) for i in range(0, len(big), 1000))
    raw = (b"POST /retrieve HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunks + b"0\r\n\r\n")
    status, _, body = _exchange(server, raw)
    assert status == 413 and "the body exceeds the limit of 16384 bytes" in json.loads(body)["error"]
    assert _good(server)[0] == 200


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/queries", 405, "method GET not allowed on /queries"),
    ("POST", "/health", 405, "method POST not allowed on /health"),
    ("DELETE", "/nowhere", 404, "unknown path '/nowhere'"),
])
def test_wrong_methods_and_paths_get_json_messages(server, method, path, status, message):
    got, headers, body = _exchange(server, _request(method, path))
    assert got == status and message in json.loads(body)["error"]
    assert headers["content-type"].startswith("application/json")


def test_health(server):
    status, _, body = _exchange(server, _request("GET", "/health"))
    assert status == 200 and json.loads(body) == {"status": "ok", "num_passages": 10}


# Hypothesis: requests made of likely-bad parts. Header names from the token alphabet are
# valid HTTP; names or values with other bytes may be refused by h11 (a 400 or a close).
_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~", min_size=1, max_size=12)
_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(min_value=10**20), st.floats(),
    st.text(max_size=80), st.lists(st.text(max_size=70), max_size=10),
    st.lists(st.one_of(st.integers(), st.none(), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_FIELDS = st.dictionaries(st.sampled_from(["queries", "k", "topk", "return_scores", "extra"]), _VALUE, max_size=4)


_NASTY = [b"[" * 5000, b'{"queries": ["\xff\xfe"]}', b'{"queries": ["a"], "k": NaN}',
          b'{"queries": ["a"], "topk": 1e400}', b'{"queries": ["a"], "k": ' + b"9" * 5000 + b"}",
          b'{"queries": [' + b'"q",' * 3000 + b'"q"]}', b"null", b'"text"', b"",
          b'{"queries": ["a"], "k": -3}', b'{"queries": [""], "k": 1}', b'{"queries": []}']
_BODY = st.one_of(
    _FIELDS.map(lambda fields: json.dumps(fields).encode()),  # a NaN float goes bare
    st.binary(max_size=300),                                  # invalid JSON, non-UTF-8 bytes
    st.lists(st.text(max_size=20), max_size=5).map(lambda q: json.dumps({"queries": q}).encode()),
    st.integers(1, 10**9).map(lambda k: json.dumps({"queries": ["q"], "k": k, "topk": -k}).encode()),
    st.sampled_from(_NASTY))
_HEADER = st.one_of(
    st.tuples(_TOKEN, st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)).map(
        lambda kv: (True, f"{kv[0]}: {kv[1]}".encode())),
    st.tuples(st.binary(min_size=1, max_size=10), st.binary(max_size=20)).map(lambda kv: (False, kv[0] + b": " + kv[1])))


def _with_nasty_bodies(test):
    """Every nasty body on both POST paths, whatever hypothesis draws besides."""
    for body in _NASTY:
        for path in ("/queries", "/retrieve"):
            test = example(method="POST", path=path, body=body, headers=[])(test)
    return test


@_with_nasty_bodies
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["POST", "POST", "GET", "PUT", "OPTIONS"]),
       path=st.sampled_from(["/queries", "/retrieve", "/health", "/", "/queries/x", "/%ff"]),
       body=_BODY, headers=st.lists(_HEADER, max_size=3))
def test_any_request_gets_a_2xx_or_a_4xx_with_a_message(server, method, path, body, headers):
    reserved = (b"content-length", b"transfer-encoding", b"connection", b"host", b"expect")
    headers = [(valid, h) for valid, h in headers if not h.lower().startswith(reserved)]
    status, response_headers, response_body = _exchange(
        server, _request(method, path, body, tuple(h for _, h in headers)))
    if status is None or (status == 400 and "json" not in response_headers.get("content-type", "")):
        # h11 refused the request line or a header: only a request with a raw-bytes header may be.
        assert not all(valid for valid, _ in headers), (method, path, headers, body[:100])
        return
    assert 200 <= status < 500, (status, response_body[:300])
    answer = json.loads(response_body)
    if status >= 400:
        assert isinstance(answer["error"], str) and answer["error"]
    elif path == "/queries":
        assert len(answer["answers"]) == len(answer["queries"])
        assert all(line.partition("\t")[2].startswith(f"Title: {q} ") for q, lines in
                   zip(answer["queries"], answer["answers"]) for line in lines)
    elif path == "/retrieve":
        assert isinstance(answer["result"], list)


@pytest.mark.parametrize("path", ["/queries", "/retrieve"])
def test_a_lone_surrogate_in_a_query_is_a_400_naming_it(server, path):
    # json.dumps writes "\ud800" as an escape, which json.loads decodes to a str no answer can
    # encode as UTF-8: refused with the query's place, not searched and answered 500.
    status, _, body = _exchange(server, _request("POST", path, b'{"queries": ["ok", "a\\ud800b"]}'))
    assert status == 400 and "queries[1] holds '\\ud800' at 1, a lone surrogate" in json.loads(body)["error"]
    assert _good(server)[0] == 200


def test_a_405_names_the_allowed_methods(server):
    status, headers, _ = _exchange(server, _request("GET", "/queries"))
    assert status == 405 and headers["allow"] == "POST"


class _SlowRetriever(_EchoRetriever):
    def search_hits(self, queries, k):
        time.sleep(0.6)  # longer than the read deadline below: only reading is bounded
        return super().search_hits(queries, k)


def test_unfinished_requests_are_dropped_at_the_read_deadline():
    """Half-sent requests filling every connection the server allows are closed after
    request_read_timeout_s, so the server serves again (uvicorn alone holds them for ever and
    answers everyone else 503)."""
    limits = ServerLimits(max_connections=4, request_read_timeout_s=0.3)
    with RetrievalServer(_SlowRetriever(), port=0, limits=limits) as slow:
        # Three held and the fourth, any client's, is one too many (uvicorn counts connections).
        held = [socket.create_connection(_address(slow), timeout=TIMEOUT_S) for _ in range(3)]
        try:
            for i, sock in enumerate(held):
                sock.sendall(b"POST /queries HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else
                             b'POST /queries HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"queries": [')
            for sock in held:  # the server closes each: an empty read, not a timeout
                try:
                    assert sock.recv(1024) == b""
                except socket.timeout:
                    pytest.fail(f"a half-sent request was still held after {TIMEOUT_S} s")
        finally:
            for sock in held:
                sock.close()
        # A request sent whole is answered, though its search outlasts the deadline; and twice
        # on one kept-alive connection, the deadline starting again after each answer.
        conn = http.client.HTTPConnection(*_address(slow), timeout=TIMEOUT_S)
        try:
            for _ in range(2):
                conn.request("POST", "/queries", body=json.dumps({"queries": ["x"], "k": 1}))
                response = conn.getresponse()
                assert response.status == 200 and json.loads(response.read())["queries"] == ["x"]
        finally:
            conn.close()


class _GatedPassage(Passage):
    """A passage whose rendering waits for a gate: an answer being written, held open."""
    entered = gate = None  # threading.Events, set per test

    def render(self) -> str:
        self.entered.set()
        assert self.gate.wait(timeout=TIMEOUT_S), "the gate was never opened"
        return super().render()


class _GatedRetriever:
    def search_hits(self, queries, k):
        return [[Hit(0, _GatedPassage("0", q, " t", "hotpot_abstract"), 1.0)] for q in queries]


def test_an_answer_being_written_does_not_stall_other_connections(monkeypatch):
    """The answer is encoded off the event loop (a 50 MB one takes seconds): while one is being
    written, /health is answered."""
    entered, gate = threading.Event(), threading.Event()
    monkeypatch.setattr(_GatedPassage, "entered", entered)
    monkeypatch.setattr(_GatedPassage, "gate", gate)
    with RetrievalServer(_GatedRetriever(), port=0) as gated:
        answer = {}
        writer = threading.Thread(target=lambda: answer.update(
            status=_exchange(gated, _request("POST", "/queries", b'{"queries": ["q"], "k": 1}'))[0]))
        writer.start()
        try:
            assert entered.wait(timeout=TIMEOUT_S), "the answer was never written"
            with socket.create_connection(_address(gated), timeout=2.0) as sock:
                sock.sendall(_request("GET", "/health"))
                assert sock.recv(1024).startswith(b"HTTP/1.1 200 "), "/health waited for the answer"
        finally:
            gate.set()
            writer.join(timeout=TIMEOUT_S)
        assert answer == {"status": 200}


def test_a_request_cancelled_while_queued_does_not_end_the_batcher():
    held = _HeldRetriever()
    searcher = BatchingSearcher(held, max_queries=8)
    try:
        first = searcher.submit(["a"], 1)
        assert held.searching.wait(timeout=TIMEOUT_S)  # the worker took `first` alone and waits in its search
        queued = searcher.submit(["b"], 1)
        assert queued.cancel()  # as asyncio.wrap_future does when the handler is cancelled
        held.release.set()
        assert first.result(timeout=TIMEOUT_S)[0][0].passage.title == "a"
        assert searcher.submit(["c"], 1).result(timeout=TIMEOUT_S)[0][0].passage.title == "c"
    finally:
        held.release.set()
        searcher.close()


def test_a_batch_never_holds_more_than_max_queries():
    held = _HeldRetriever()
    searcher = BatchingSearcher(held, max_queries=8)
    try:
        first = searcher.submit(["a"], 1)
        assert held.searching.wait(timeout=TIMEOUT_S)
        sizes = [5, 5, 3, 8]
        queued = [searcher.submit([f"q{i}.{j}" for j in range(n)], 1) for i, n in enumerate(sizes)]
        held.release.set()
        assert first.result(timeout=TIMEOUT_S)[0][0].passage.title == "a"
        for i, (future, n) in enumerate(zip(queued, sizes)):
            assert [hits[0].passage.title for hits in future.result(timeout=TIMEOUT_S)] == [f"q{i}.{j}" for j in range(n)]
        assert held.batches == [1, 5, 8, 8]  # 5 + 5 would be 10: the second 5 waits and takes the 3 beside it
    finally:
        held.release.set()
        searcher.close()


def test_stop_drops_a_request_still_arriving_at_once():
    stopping = RetrievalServer(_EchoRetriever(), port=0).start()
    with socket.create_connection(_address(stopping), timeout=TIMEOUT_S) as sock:
        sock.sendall(b'POST /queries HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"queries": [')
        time.sleep(0.1)  # the handler is waiting for the rest of the body
        start = time.monotonic()
        stopping.stop()
        # Not held to uvicorn's 5 s graceful-shutdown timeout, then cancelled.
        assert time.monotonic() - start < 2.0
        assert sock.recv(1024) == b""  # closed, unanswered
