"""HTTP retrieval server speaking both clients' APIs (SPEC section 5), with request batching.

  POST /queries  {"queries": [...], "k": 3}                  -> {"queries": [...], "answers": [[line, ...]]}
  POST /retrieve {"queries": [...], "topk": 3, "return_scores": true}
                 -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...]]}
  GET  /health   -> {"status": "ok", "num_passages": N}
Each answer line is "{id}\\t{passage}" as in the authors' TSV corpora (the store row stands in
for a non-numeric id, so the R1-Searcher client's `^\\d+\\s+` strip still applies).

Why Starlette on uvicorn (h11): the standard library's http.server gives each connection a
thread that a client can hold with a request it never finishes; uvicorn parses HTTP with h11
on one event loop (a malformed header is a prompt 400 and a closed connection, a slow client
holds nothing but its socket, and that only until `ServerLimits.request_read_timeout_s`), and
the search itself runs on one worker thread (each answer is encoded on another), so requests
that arrive together are answered by one search call (`BatchingSearcher`). Request bodies are
read up to `ServerLimits.max_body_bytes` (counted as read, whatever Content-Length says) and
validated by pydantic schemas; every error is a JSON {"error": message} naming the field or
limit. No answer holds a bare NaN or Infinity, which strict JSON parsers reject: a non-finite
score is a 500.
"""
import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import queue
import socket
import threading
from typing import Annotated, Sequence

import h11
import pydantic
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from searcher_jax.retrieval.hits import Hit

API_HINT = "the API is POST /queries, POST /retrieve and GET /health"


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_queries: int = 1024      # per request, and per batched search call
    max_k: int = 100
    max_query_chars: int = 4096
    max_body_bytes: int = 8 << 20
    max_connections: int = 1024  # open connections and requests; beyond it uvicorn answers 503
    request_read_timeout_s: float = 30.0  # to receive a whole request; then its connection is closed


class BadRequest(Exception):

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


PositiveInt = Annotated[int, pydantic.Field(gt=0)]


class QueriesRequest(pydantic.BaseModel):
    """POST /queries (R1-Searcher). Strict: "3" or true is not a k; unknown fields are ignored."""
    model_config = pydantic.ConfigDict(strict=True, extra="ignore")
    queries: list[str]
    k: PositiveInt = 3


class RetrieveRequest(pydantic.BaseModel):
    """POST /retrieve (Search-R1)."""
    model_config = pydantic.ConfigDict(strict=True, extra="ignore")
    queries: list[str]
    topk: PositiveInt = 3
    return_scores: bool = False


SCHEMAS = {"/queries": (QueriesRequest, "k"), "/retrieve": (RetrieveRequest, "topk")}
_FIELD_MEANS = {"queries": "a list of strings", "k": "a positive integer",
                "topk": "a positive integer", "return_scores": "true or false"}


@dataclasses.dataclass
class _Pending:
    queries: list[str]
    k: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class BatchingSearcher:
    """Runs one search for the requests waiting when the worker becomes free, at most
    `max_queries` queries in all (a request holds at most that many, parse_request checks).

    `submit` returns a future, so an async handler awaits it without holding a thread."""

    def __init__(self, retriever, max_queries: int):
        self._retriever = retriever
        self._max_queries = max_queries
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, daemon=True, name="retrieval-batcher")
        self._worker.start()

    def submit(self, queries: list[str], k: int) -> concurrent.futures.Future:
        """-> a future of [len(queries)] lists of k hits (or the search's exception)."""
        pending = _Pending(queries, k)
        self._queue.put(pending)
        return pending.future

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _loop(self) -> None:
        held = None  # the request that would have taken a batch over max_queries: the next's first
        while True:
            first, held = (held, None) if held is not None else (self._queue.get(), None)
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
                if total + len(item.queries) > self._max_queries:
                    held = item
                    break
                batch.append(item)
                total += len(item.queries)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        # One search per k in the batch (trainers all ask for the same k): a request whose k
        # the index cannot serve fails alone, never the other clients' requests beside it.
        by_k = collections.defaultdict(list)
        for p in batch:
            # A future cancelled while queued (its handler cancelled, as at shutdown) is
            # skipped: set_result on it would raise and end this thread, leaving every later
            # request waiting for ever. Once running, it can no longer be cancelled.
            if p.future.set_running_or_notify_cancel():
                by_k[p.k].append(p)
        for k, group in by_k.items():
            try:
                hits = self._retriever.search_hits([q for p in group for q in p.queries], k)
            except Exception as e:  # reported to each waiting request of this k as a 500
                for p in group:
                    p.future.set_exception(e)
                continue
            start = 0
            for p in group:
                p.future.set_result(hits[start:start + len(p.queries)])
                start += len(p.queries)


def _answer_line(hit: Hit) -> str:
    passage_id = hit.passage.id if hit.passage.id.isdigit() else str(hit.row)
    return f"{passage_id}\t{hit.passage.render()}"


def _document(hit: Hit) -> dict:
    return {"id": hit.passage.id, "contents": hit.passage.contents()}


def encode_body(payload: object) -> bytes:
    """payload -> a UTF-8 JSON body. Raises ValueError on a NaN or infinite float: json.dumps
    would otherwise write a bare NaN or Infinity, which strict JSON parsers reject."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _field_error(error: dict) -> str:
    """One pydantic error -> a message naming the field (and the item, for a list's)."""
    loc = error["loc"]
    name = str(loc[0]) if loc else ""
    where = name + "".join(f"[{i}]" for i in loc[1:])
    means = _FIELD_MEANS.get(name, "")
    if error["type"] == "missing":
        return f"missing field {name!r} ({means})"
    got = error.get("input")
    shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    return f"field {name!r} must be {means}: {where} is {shown} ({error['msg']})"


def parse_request(path: str, body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
    """A POST body -> (queries, k, return_scores). Raises BadRequest: 400 for a body that is
    not strict JSON, not an object or not the path's schema (the message names the field) or
    a query holding a lone surrogate (a "\\ud800" escape, not text), 413 for a request
    over a limit (too many queries, a query too long, k above max_k)."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN, huge int
        raise BadRequest(400, f"malformed JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, f"expected a JSON object, got {type(data).__name__}")
    schema, k_field = SCHEMAS[path]
    try:
        request = schema.model_validate(data)
    except pydantic.ValidationError as e:
        raise BadRequest(400, "; ".join(_field_error(err) for err in e.errors()[:3])) from None
    queries, k = request.queries, getattr(request, k_field)
    for i, query in enumerate(queries):
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no answer can encode
            query.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(400, f"field 'queries' must be a list of strings: queries[{i}] holds "
                                  f"{query[e.start]!r} at {e.start}, a lone surrogate, not a "
                                  f"Unicode character") from None
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"{len(queries)} queries exceed the limit of {limits.max_queries} per request")
    longest = max((len(q) for q in queries), default=0)
    if longest > limits.max_query_chars:
        raise BadRequest(413, f"a query of {longest} characters exceeds the limit of {limits.max_query_chars}")
    if k > limits.max_k:
        raise BadRequest(413, f"{k_field}={k} exceeds the limit of {limits.max_k}")
    return queries, k, getattr(request, "return_scores", False)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or BadRequest 413 once more than max_bytes are declared or read (a
    chunked body has no Content-Length, and a declared one is not trusted alone)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"a body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"the body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def encode_answer(path: str, queries: list[str], hits: Sequence[Sequence[Hit]], return_scores: bool) -> bytes:
    """The 200 answer to `queries` ([len(queries)] lists of hits) as a UTF-8 JSON body, encoded
    one query's hits at a time: run on a worker thread, it lets the event loop take the GIL
    between queries, so a large answer (1024 queries of 100 passages is some 50 MB, half a
    second to encode in one call) stalls no other connection. Raises ValueError as encode_body."""
    if path == "/queries":
        head = b'{"queries": ' + encode_body(queries) + b', "answers": ['
        rows = (encode_body([_answer_line(h) for h in hs]) for hs in hits)
    elif return_scores:
        head = b'{"result": ['
        rows = (encode_body([{"document": _document(h), "score": h.score} for h in hs]) for hs in hits)
    else:
        head = b'{"result": ['
        rows = (encode_body([_document(h) for h in hs]) for hs in hits)
    return head + b", ".join(rows) + b"]}"


def _unencodable(e: ValueError) -> Response:
    """The 500 for an answer encode_body refused: sent as is, no strict client could parse it."""
    what = ("text that is not valid Unicode" if isinstance(e, UnicodeEncodeError)  # a lone surrogate
            else "a non-finite score")
    return Response(encode_body({"error": f"retrieval returned {what} ({e})"}), status_code=500,
                    media_type="application/json")


def _json(status: int, payload: dict) -> Response:
    try:
        return Response(encode_body(payload), status_code=status, media_type="application/json")
    except ValueError as e:
        return _unencodable(e)


def make_app(searcher: BatchingSearcher, limits: ServerLimits, num_passages: int,
             added_latency_s: float = 0.0) -> Starlette:
    """The ASGI app: both POST APIs and /health; every error a JSON {"error": message}.

    added_latency_s: each search answered that much later, without holding the batching
    worker (concurrent requests wait at once), as a remote index across a network would
    (launch/bench_rollout.py)."""

    async def health(request: Request) -> Response:
        return _json(200, {"status": "ok", "num_passages": num_passages})

    async def search(request: Request) -> Response:
        path = request.url.path
        try:
            body = await read_body(request, limits.max_body_bytes)
            queries, k, return_scores = parse_request(path, body, limits)
        except BadRequest as e:
            return _json(e.status, {"error": str(e)})
        except ClientDisconnect:  # nobody is left to read an answer
            return _json(400, {"error": "the client disconnected before sending its body"})
        if added_latency_s > 0:
            await asyncio.sleep(added_latency_s)
        try:
            hits: Sequence[Sequence[Hit]] = (
                await asyncio.wrap_future(searcher.submit(queries, k)) if queries else [])
        except Exception as e:  # the server keeps serving; the client learns what failed
            return _json(500, {"error": f"retrieval failed: {type(e).__name__}: {e}"})
        try:
            body = await run_in_threadpool(encode_answer, path, queries, hits, return_scores)
        except ValueError as e:
            return _unencodable(e)
        return Response(body, status_code=200, media_type="application/json")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"unknown path {request.url.path!r}; {API_HINT}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}; {API_HINT}"
        else:
            message = str(exc.detail)
        response = _json(exc.status_code, {"error": message})
        response.headers.update(exc.headers or {})  # a 405's Allow, which RFC 9110 requires
        return response

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/queries", search, methods=["POST"]),
                             Route("/retrieve", search, methods=["POST"])],
                     exception_handlers={HTTPException: http_error})


class _ReadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request.

    uvicorn times out only an idle keep-alive connection: one that has sent half a request
    and waits (slowloris) is held for ever, and `max_connections` of them would have every
    later client answered 503. Here a request not wholly received within
    `request_read_timeout_s` of its connection opening, or of the previous answer, has its
    connection closed; a request received in time is answered however long its search takes.
    At shutdown, a request not wholly received is dropped at once."""
    request_read_timeout_s = ServerLimits.request_read_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline = self.loop.call_later(self.request_read_timeout_s, self._read_deadline_passed)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._read_deadline.cancel()
        self._read_deadline = self.loop.call_later(self.request_read_timeout_s, self._read_deadline_passed)

    def connection_lost(self, exc) -> None:
        self._read_deadline.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # A request still arriving has nothing to answer yet: dropped now, not waited for until
        # uvicorn's graceful-shutdown timeout cancels its handler (with a traceback).
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is not h11.DONE:
            self.transport.close()
        else:
            super().shutdown()

    def _read_deadline_passed(self) -> None:
        # DONE: the whole request is in (its answer may still be on its way).
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.transport.close()


class RetrievalServer:
    """uvicorn serving `make_app`, plus its batching worker. host 127.0.0.1 by default: loopback
    only. The socket is bound at construction, so `url` holds the port even for port=0."""

    def __init__(self, retriever, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits = ServerLimits(), num_passages: int = -1,
                 added_latency_s: float = 0.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=2048)
        self.searcher = BatchingSearcher(retriever, limits.max_queries)
        # h11 (with a read deadline) and loop="asyncio" whatever else is installed (uvloop,
        # httptools): h11's strict parsing is what refuses malformed requests. log_config=None
        # leaves the process's logging alone.
        protocol = type("RetrievalH11Protocol", (_ReadDeadlineH11Protocol,),
                        {"request_read_timeout_s": limits.request_read_timeout_s})
        self._server = uvicorn.Server(uvicorn.Config(
            make_app(self.searcher, limits, num_passages, added_latency_s), loop="asyncio",
            http=protocol,
            lifespan="off", log_config=None, log_level="warning", access_log=False,
            limit_concurrency=limits.max_connections, timeout_keep_alive=30,
            timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serves on this thread until SIGINT or SIGTERM (main thread) or `stop`."""
        self._server.run(sockets=[self._socket])

    def start(self) -> "RetrievalServer":
        """Serves on a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="retrieval-http")
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the retrieval server at {self.url} failed to start")
            self._thread.join(timeout=0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        self.searcher.close()

    def __enter__(self) -> "RetrievalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
