"""Multi-host retrieval from one process: process 0 searches, every process gets the passages.

With `retriever.search_on="process_0"` only process 0 loads the index (a 21M-passage
index need not sit in every host's RAM) or calls the HTTP server (one request per round,
not one per host). Every process still calls `search` with the same queries at the same
point of the rollout (DESIGN.md, point 5), so the broadcast is a collective all enter.
A failure on process 0 is broadcast too, and every process raises it: none is left
waiting in a collective the others have abandoned.
"""
import concurrent.futures
import dataclasses
import json
from typing import Any, Callable, Sequence

import numpy as np

from searcher_jax.retrieval.passage import Passage


def _encode(value: Any, error: str = "") -> bytes:
    """Process 0's outcome as JSON: its result (None when it failed) and the error, if any."""
    return json.dumps({"value": value, "error": error}).encode("utf-8")


def _decode(payload: bytes, what: str) -> Any:
    """The result `_encode` carried; raises RuntimeError naming `what` when process 0 failed."""
    message = json.loads(payload.decode("utf-8"))
    if message["error"]:
        raise RuntimeError(f"{what} on process 0 failed: {message['error']}")
    return message["value"]


def encode_results(results: list[list[Passage]] | None, error: str = "") -> bytes:
    rows = None if results is None else [[dataclasses.asdict(p) for p in row] for row in results]
    return _encode(rows, error)


def decode_results(payload: bytes) -> list[list[Passage]]:
    return [[Passage(**p) for p in row] for row in _decode(payload, "retrieval")]


def broadcast_bytes(payload: bytes) -> bytes:
    """Process 0's payload, on every process (the others' payloads are ignored)."""
    from jax.experimental import multihost_utils
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    # A power-of-two buffer: each new shape compiles a new broadcast program.
    buffer = np.zeros(1 << max(10, (size - 1).bit_length()), np.uint8)  # [bucket]
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)[:size]
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size].tobytes()


def agreed_call(fn: Callable[[], Any], process_index: int,
                broadcast: Callable[[bytes], bytes],
                encode: Callable[[Any, str], bytes], decode: Callable[[bytes], Any]):
    """fn() on process 0 only, its outcome on every process: process 0 returns fn's result
    (or raises its own error); the others get `decode` of what process 0 broadcast, which
    raises when it carries process 0's error. encode(result, error): the payload, with
    result None and error "Type: message" when fn raised. Every process enters the
    broadcast, so none is left waiting in a collective the others have abandoned."""
    result, payload, failure = None, b"", None
    if process_index == 0:
        try:
            result = fn()
            payload = encode(result, "")
        except Exception as e:  # noqa: BLE001 - every process must learn of it, then raise
            payload, failure = encode(None, f"{type(e).__name__}: {e}"), e
    received = broadcast(payload)
    if failure is not None:
        raise failure  # process 0 keeps its own traceback
    return result if process_index == 0 else decode(received)


class ProcessZeroRetriever:
    """`search` runs `inner` on process 0 (None on the others) and broadcasts its result."""

    def __init__(self, inner, process_index: int, broadcast=broadcast_bytes):
        if (inner is None) != (process_index != 0):
            raise ValueError("process 0, and only process 0, needs the inner retriever")
        self.inner, self.process_index, self._broadcast = inner, process_index, broadcast

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        return agreed_call(lambda: self.inner.search(queries, k), self.process_index,
                           self._broadcast, encode_results, decode_results)

    def take_metrics(self) -> dict[str, float]:
        """The inner retriever's `take_metrics` on process 0 (e.g. the http backend's failed
        queries; {} for a backend without it), the same on every process: the trainer logs
        them from every process at the same point, and this is a broadcast all enter."""
        take = None
        if self.process_index == 0:
            take = getattr(self.inner, "take_metrics", dict)
        return agreed_call(take, self.process_index, self._broadcast, _encode,
                           lambda payload: _decode(payload, "retrieval metrics"))

    def submit(self, pool: concurrent.futures.Executor, queries: Sequence[str],
               k: int) -> concurrent.futures.Future | None:
        """Starts `inner.search` on a thread of `pool` on process 0 (None on the others); every
        process then calls `collect` with it, in the same order (the continuous rollout)."""
        return pool.submit(self.inner.search, queries, k) if self.process_index == 0 else None

    def collect(self, future: concurrent.futures.Future | None) -> list[list[Passage]]:
        """The result of a `submit`, on every process (process 0 waits for it)."""
        return agreed_call(future.result if self.process_index == 0 else None,
                           self.process_index, self._broadcast, encode_results, decode_results)
