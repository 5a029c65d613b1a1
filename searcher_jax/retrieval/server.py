"""HTTP retrieval server speaking both clients' APIs (SPEC section 5), with request batching.

  POST /queries  {"queries": [...], "k": 3}                  -> {"queries": [...], "answers": [[line, ...]]}
  POST /retrieve {"queries": [...], "topk": 3, "return_scores": true}
                 -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...]]}
  GET  /health   -> {"status": "ok", "num_passages": N}
Each answer line is "{id}\\t{passage}" as in the authors' TSV corpora (the store row stands in
for a non-numeric id, so the R1-Searcher client's `^\\d+\\s+` strip still applies). Requests that
arrive together are answered by one search call. Bad requests get a 4xx with a message. No
answer holds a bare NaN or Infinity, which strict JSON parsers reject: a non-finite score is a 500.
"""
import collections
import dataclasses
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from searcher_jax.retrieval.hits import Hit


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_queries: int = 1024      # per request, and per batched search call
    max_k: int = 100
    max_query_chars: int = 4096
    max_body_bytes: int = 8 << 20


class BadRequest(Exception):

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class _Pending:
    queries: list
    k: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    hits: list | None = None
    error: Exception | None = None


class BatchingSearcher:
    """Runs one search for all requests waiting when the worker becomes free."""

    def __init__(self, retriever, max_queries: int):
        self._retriever = retriever
        self._max_queries = max_queries
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="retrieval-batcher")
        self._worker.start()

    def search(self, queries: list, k: int) -> list[list[Hit]]:
        pending = _Pending(queries, k)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.hits

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, total = [first], len(first.queries)
            while total < self._max_queries:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
                total += len(item.queries)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        # One search per k in the batch (trainers all ask for the same k): a request whose k
        # the index cannot serve fails alone, never the other clients' requests beside it.
        by_k = collections.defaultdict(list)
        for p in batch:
            by_k[p.k].append(p)
        for k, group in by_k.items():
            try:
                hits = self._retriever.search_hits([q for p in group for q in p.queries], k)
                start = 0
                for p in group:
                    p.hits = hits[start:start + len(p.queries)]
                    start += len(p.queries)
            except Exception as e:  # reported to each waiting request of this k as a 500
                for p in group:
                    p.error = e
        for p in batch:
            p.done.set()


def _answer_line(hit: Hit) -> str:
    passage_id = hit.passage.id if hit.passage.id.isdigit() else str(hit.row)
    return f"{passage_id}\t{hit.passage.render()}"


def _document(hit: Hit) -> dict:
    return {"id": hit.passage.id, "contents": hit.passage.contents()}


def encode_body(payload: dict) -> bytes:
    """payload -> a UTF-8 JSON body. Raises ValueError on a NaN or infinite float: json.dumps
    would otherwise write a bare NaN or Infinity, which strict JSON parsers reject."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse_request(path: str, body: bytes, limits: ServerLimits) -> tuple[list, int, bool]:
    """-> (queries, k, return_scores), or BadRequest naming what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"expected a JSON object, got {type(data).__name__}")
    queries = data.get("queries")
    if queries is None:
        raise BadRequest(400, "missing field 'queries' (a list of strings)")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest(400, "field 'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"{len(queries)} queries exceed the limit of {limits.max_queries} per request")
    longest = max((len(q) for q in queries), default=0)
    if longest > limits.max_query_chars:
        raise BadRequest(413, f"a query of {longest} characters exceeds the limit of {limits.max_query_chars}")
    k_field = "k" if path == "/queries" else "topk"
    k = data.get(k_field, 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(400, f"field {k_field!r} must be a positive integer, got {k!r}")
    if k > limits.max_k:
        raise BadRequest(413, f"{k_field}={k} exceeds the limit of {limits.max_k}")
    return_scores = data.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(400, "field 'return_scores' must be true or false")
    return queries, k, return_scores


def make_handler(searcher: BatchingSearcher, limits: ServerLimits, num_passages: int):

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: one line per request is too much at scale
            pass

        def _send(self, status: int, payload: dict) -> None:
            try:
                body = encode_body(payload)
            except ValueError as e:  # sent as is, no strict client could parse the answer
                status, body = 500, encode_body({"error": f"retrieval returned a non-finite score ({e})"})
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok", "num_passages": num_passages})
            else:
                self._send(404, {"error": f"unknown path {self.path!r}; POST /queries or /retrieve"})

        def do_POST(self):
            if self.path not in ("/queries", "/retrieve"):
                self._send(404, {"error": f"unknown path {self.path!r}; POST /queries or /retrieve"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(411, {"error": "a Content-Length header is required"})
                self.close_connection = True
                return
            if length > limits.max_body_bytes:
                self._send(413, {"error": f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}"})
                self.close_connection = True
                return
            body = self.rfile.read(length)
            try:
                queries, k, return_scores = parse_request(self.path, body, limits)
            except BadRequest as e:
                self._send(e.status, {"error": str(e)})
                return
            try:
                hits = searcher.search(queries, k)
            except Exception as e:  # the server keeps serving; the client learns what failed
                self._send(500, {"error": f"retrieval failed: {type(e).__name__}: {e}"})
                return
            if self.path == "/queries":
                self._send(200, {"queries": queries, "answers": [[_answer_line(h) for h in hs] for hs in hits]})
            elif return_scores:
                self._send(200, {"result": [[{"document": _document(h), "score": h.score} for h in hs]
                                            for hs in hits]})
            else:
                self._send(200, {"result": [[_document(h) for h in hs] for hs in hits]})

    return Handler


class RetrievalServer:
    """A ThreadingHTTPServer plus its batching worker. host 127.0.0.1 by default: loopback only."""

    def __init__(self, retriever, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits = ServerLimits(), num_passages: int = -1):
        self.searcher = BatchingSearcher(retriever, limits.max_queries)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.searcher, limits, num_passages))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> "RetrievalServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="retrieval-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.searcher.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
