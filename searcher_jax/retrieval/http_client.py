"""A retriever backend that calls a retrieval server (ours, R1-Searcher's or Search-R1's)."""
import json
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Sequence

from searcher_jax.retrieval.hits import Hit, HitRetriever, check_k
from searcher_jax.retrieval.passage import Passage

_LINE_ID = re.compile(r"^(\d+)\s+")
APIS = ("r1searcher", "searchr1")


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
    scores, each document's "contents" kept verbatim (format flashrag)."""

    def __init__(self, url: str, api: str = "r1searcher", timeout_s: float = 60.0,
                 retries: int = 4, backoff_s: float = 1.0):
        if not url:
            raise ValueError("the http backend needs a url, e.g. http://127.0.0.1:8000")
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        self.url, self.api, self.timeout_s = url.rstrip("/"), api, timeout_s
        self.retries, self.backoff_s = retries, backoff_s

    def _post(self, path: str, body: dict) -> dict:
        """One request; a dropped connection, a timeout or a 5xx is retried with exponential
        backoff (a retrieval host restarting must not end a training run), a 4xx or an answer
        that is not strict JSON is not: RetrievalServerError."""
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = response.read()
                try:
                    return parse_strict_json(answer)
                except ValueError as e:
                    raise RetrievalServerError(f"{self.url}{path} answered invalid JSON: {e}") from None
            except urllib.error.HTTPError as e:
                message = e.read().decode(errors="replace")
                error = RetrievalServerError(f"{self.url}{path} answered {e.code}: {message}")
                if e.code < 500:
                    raise error from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = RetrievalServerError(f"{self.url}{path} unreachable: {e}")
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** attempt
                logging.warning("%s; retrying in %.1f s (%d/%d)", error, delay, attempt + 1,
                                self.retries)
                time.sleep(delay)
        raise RetrievalServerError(f"{error} (after {self.retries} retries)")

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        if not queries:
            return []
        if self.api == "r1searcher":
            answers = self._post("/queries", {"queries": list(queries), "k": int(k)})["answers"]
            return [[self._hit_from_line(line) for line in lines] for lines in answers]
        result = self._post("/retrieve", {"queries": list(queries), "topk": int(k), "return_scores": True})["result"]
        return [[self._hit_from_document(item["document"], item["score"]) for item in items] for items in result]

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
