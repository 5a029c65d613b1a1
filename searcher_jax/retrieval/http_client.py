"""A retriever backend that calls a retrieval server (ours, R1-Searcher's or Search-R1's).

HTTP is a pooled `requests` Session with urllib3's bounded `Retry` (llm_client.retrying_session,
shared with the judge and the web backend): a refused or dropped connection, a read timeout or
a 5xx before the answer's headers is retried `retries` times with exponential backoff, so a
retrieval host restarting does not end a training run; a 4xx, a connection that breaks while
the answer's body is read, or an answer that is not strict JSON of the API's shape, is not
retried. One search then takes at most about `deadline_s` (every try's timeout and backoff),
unless a server trickles its answer: `timeout_s` bounds each read, not the whole body.

When the tries are spent, `on_failure` decides (SPEC section 5: "an empty list becomes the text
`None`"):
  "stop"           RetrievalServerError naming the URL and what went wrong: the run stops.
  "none_document"  every query of the failed request gets no passages, so the policy reads the
                   document block "None"; the queries are counted in `failed_queries` (a
                   trainer logs the count of each step as `retrieval/failed_queries`).
"""
import json
import logging
import re
import threading
import urllib.parse
from typing import Sequence

import requests

from searcher_jax import llm_client
from searcher_jax.retrieval.hits import Hit, HitRetriever, check_k
from searcher_jax.retrieval.passage import Passage

_LINE_ID = re.compile(r"^(\d+)\s+")
APIS = ("r1searcher", "searchr1")
ON_FAILURE = ("stop", "none_document")


class RetrievalServerError(RuntimeError):
    pass


def parse_strict_json(body: bytes) -> dict:
    """A response body -> its JSON value. Raises ValueError on malformed JSON and on a bare
    NaN, Infinity or -Infinity, which Python's json module would otherwise accept."""
    def reject(constant: str):
        raise ValueError(f"{constant} is not a JSON number")
    return json.loads(body, parse_constant=reject)


class HttpRetriever(HitRetriever):
    """api "r1searcher": POST /queries, each answer a corpus line "{id}\\t{passage}", kept as a raw
    passage with the id stripped as the authors' client did. api "searchr1": POST /retrieve with
    scores, each document's "contents" kept verbatim (format flashrag).

    timeout_s bounds each try's connect and each read; retries (>= 0) the tries after the first;
    backoff_s the first retry's sleep (doubling after). Raises ValueError on a bad argument (a
    url without http:// or https:// and a host among them)."""

    def __init__(self, url: str, api: str = "r1searcher", timeout_s: float = 60.0,
                 retries: int = 4, backoff_s: float = 1.0, on_failure: str = "stop"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            # requests refuses such a URL on every try: with "none_document" a run would search
            # nothing, every query counted as failed, instead of stopping at once.
            raise ValueError(f"the http backend needs an http:// or https:// url with a host, "
                             f"e.g. http://127.0.0.1:8000; got {url!r}")
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.url, self.api, self.timeout_s = url.rstrip("/"), api, timeout_s
        self.retries, self.backoff_s, self.on_failure = retries, backoff_s, on_failure
        self._session = llm_client.retrying_session(retries, backoff_s)
        self._lock = threading.Lock()
        self.failed_queries = 0  # queries given no passages after a failure (none_document)

    @property
    def deadline_s(self) -> float:
        """About the longest one search takes, through all its retries."""
        return llm_client.request_bound_s(self.retries, self.timeout_s, self.backoff_s)

    def take_metrics(self) -> dict[str, float]:
        """{"retrieval/failed_queries": n}: the queries that failed since the last call."""
        with self._lock:
            failed, self.failed_queries = self.failed_queries, 0
        return {"retrieval/failed_queries": float(failed)}

    def _post(self, path: str, body: dict) -> dict:
        """One request through the retrying session -> the answer's JSON object. Raises
        RetrievalServerError naming the URL and what went wrong."""
        where = self.url + path
        try:
            response = self._session.post(where, json=body, timeout=self.timeout_s, stream=True)
        except requests.RequestException as e:
            raise RetrievalServerError(f"{where} unreachable or too slow (timeout {self.timeout_s} s) "
                                       f"after {self.retries} retries: {e}") from None
        try:
            # urllib3's Retry ends with the answer's headers: a connection that breaks, or a
            # read that times out, in the body is not retried.
            answer = response.content
        except requests.RequestException as e:
            raise RetrievalServerError(f"{where}: the connection broke or timed out (timeout "
                                       f"{self.timeout_s} s) while the answer was read, which is "
                                       f"not retried: {e}") from None
        if response.status_code >= 400:
            retried = f" (after {self.retries} retries)" if response.status_code >= 500 else ""
            raise RetrievalServerError(f"{where} answered {response.status_code}{retried}: "
                                       f"{answer[:500].decode(errors='replace')}")
        try:
            value = parse_strict_json(answer)
        except ValueError as e:
            raise RetrievalServerError(f"{where} answered invalid JSON: {e}") from None
        if not isinstance(value, dict):
            raise RetrievalServerError(f"{where} answered a JSON {type(value).__name__}, not an object")
        return value

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """[len(queries)] lists of at most k hits. Raises RetrievalServerError when the server
        fails after its retries and on_failure is "stop" (with "none_document": empty lists)."""
        check_k(k)
        if not queries:
            return []
        try:
            return self._search(list(queries), int(k))
        except RetrievalServerError as e:
            if self.on_failure == "stop":
                raise
            with self._lock:
                self.failed_queries += len(queries)
            logging.warning("retrieval failed for %d queries, which get the document 'None': %s",
                            len(queries), e)
            return [[] for _ in queries]

    def _search(self, queries: list[str], k: int) -> list[list[Hit]]:
        path = "/queries" if self.api == "r1searcher" else "/retrieve"
        try:
            if self.api == "r1searcher":
                answers = self._post(path, {"queries": queries, "k": k})["answers"]
                hits = [[self._hit_from_line(line) for line in lines] for lines in answers]
            else:
                result = self._post(path, {"queries": queries, "topk": k, "return_scores": True})["result"]
                hits = [[self._hit_from_document(item["document"], item["score"]) for item in items]
                        for items in result]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise RetrievalServerError(f"{self.url}{path} answered JSON not of the {self.api} API: "
                                       f"{type(e).__name__}: {e}") from None
        if len(hits) != len(queries):
            raise RetrievalServerError(f"{self.url}{path} answered {len(hits)} results for "
                                       f"{len(queries)} queries")
        return hits

    @staticmethod
    def _hit_from_line(line: str) -> Hit:
        match = _LINE_ID.match(line)
        passage_id = match.group(1) if match else ""
        text = line[match.end():] if match else line
        return Hit(-1, Passage(passage_id, "", text, "raw"), float("nan"))

    @staticmethod
    def _hit_from_document(document: dict, score: float) -> Hit:
        contents = document["contents"]
        title = contents.partition("\n")[0].strip('"')
        return Hit(-1, Passage(str(document.get("id", "")), title, contents, "flashrag"), float(score))
