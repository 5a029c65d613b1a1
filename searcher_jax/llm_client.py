"""A client of any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`).

The LLM judge (judge.py, the paper's ACC_L) and the online search backend's page summaries
(retrieval/web.py, SPEC section 5) call one through it. HTTP is `requests`, and the bounded
retries are urllib3's `Retry` mounted on the session (`BoundedRetry`): a dropped connection,
a read timeout, a 429 or a 5xx is retried with exponential backoff up to `retries` times,
honouring a server's Retry-After only up to `max_retry_after_s` (30 s by default; urllib3
alone would wait up to 6 hours); a 401 or 403 raises AuthError at once (a bad key: nothing
later can succeed, so a run stops rather than failing every row); anything else, or a reply
that is not a chat completion, raises ChatError at once.

Each try is bounded by its connect and read timeouts, so one `complete` ends within about
`ChatClient.deadline_s`; a server that trickles its reply a byte at a time can outlast the
read timeout, so callers that must not wait longer (the judge, the web backend) run requests
under `map_with_deadline`, which gives up on an item at its deadline.

The API key is read from an environment variable named by the caller, held only in the
session's headers, and never appears in a repr or an error message (a server that echoes it
in an error body has it replaced by "[API key]"), so nothing written or printed holds it.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504)
AUTH_STATUSES = (401, 403)
MAX_RETRY_AFTER_S = 30.0  # the longest a server's Retry-After may make one retry wait
BACKOFF_MAX_S = 120.0     # urllib3's cap on one exponential backoff sleep
REDACTED = "[API key]"


class ChatError(RuntimeError):
    """A chat request that failed after its retries, or whose reply was not a completion."""


class AuthError(ChatError):
    """The endpoint refused the API key (401 or 403): fatal, never retried or counted."""


def api_key(key_env: str, what: str) -> str | None:
    """The key in environment variable `key_env` ("" names none: a local server needs none).

    Raises ValueError naming the variable (never a value) when it is named but unset or empty.
    """
    if not key_env:
        return None
    key = os.environ.get(key_env, "")
    if not key:
        raise ValueError(f"{what}: environment variable {key_env} is not set; export the API "
                         f"key there (or pass an empty key_env for a server that needs none)")
    return key


class BoundedRetry(Retry):
    """urllib3's Retry with a server's Retry-After capped at `max_retry_after_s` seconds (an
    unparsable one falls back to the exponential backoff), so no answer can stall a run."""

    def __init__(self, *args, max_retry_after_s: float = MAX_RETRY_AFTER_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_retry_after_s = max_retry_after_s

    def new(self, **kw: Any) -> "BoundedRetry":
        retry = super().new(**kw)
        retry.max_retry_after_s = self.max_retry_after_s
        return retry

    def get_retry_after(self, response) -> float | None:
        try:
            after = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if after is None else min(after, self.max_retry_after_s)


def retrying_session(retries: int, backoff_s: float, pool_size: int = 10,
                     max_retry_after_s: float = MAX_RETRY_AFTER_S) -> requests.Session:
    """A requests Session that retries connection errors, read timeouts and 429/5xx answers
    (POST included) `retries` times, sleeping backoff_s * 2**(n-1) between tries (a server's
    Retry-After instead, capped at max_retry_after_s)."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if max_retry_after_s < 0:
        raise ValueError(f"max_retry_after_s must be >= 0, got {max_retry_after_s}")
    retry = BoundedRetry(total=retries, connect=retries, read=retries, status=retries, other=0,
                         backoff_factor=backoff_s, backoff_max=BACKOFF_MAX_S,
                         status_forcelist=RETRY_STATUSES, allowed_methods=None,
                         raise_on_status=False, respect_retry_after_header=True,
                         max_retry_after_s=max_retry_after_s)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def request_bound_s(retries: int, timeout_s: float, backoff_s: float,
                    max_retry_after_s: float = MAX_RETRY_AFTER_S) -> float:
    """About the longest one request through `retrying_session` takes: every try's connect and
    read timeouts, and the longest sleep before each retry (backoff or capped Retry-After)."""
    sleep = max(max_retry_after_s, min(backoff_s * 2 ** max(retries - 1, 0), BACKOFF_MAX_S))
    return (retries + 1) * 2 * timeout_s + retries * sleep + 1.0


class DeadlineExceeded(ChatError):
    """An item of `map_with_deadline` still running at its deadline."""


def map_with_deadline(pool: concurrent.futures.Executor, fn: Callable[[Any], Any],
                      items: Sequence[Any], deadline_s: float, concurrency: int) -> list[Any]:
    """[fn(item) for item in items], run on `pool`, each item given `deadline_s` from its own
    start; an item still running then (or not finished within deadline_s * ceil(len(items) /
    concurrency) of the call, when the workers are held up) is given up: its future cancelled
    (a running worker thread is left to its own timeouts) and its result a DeadlineExceeded.

    An exception fn raises is fatal: every pending item is cancelled and it is raised at once
    (fn catches what it counts as an item's failure itself).
    """
    if deadline_s <= 0 or concurrency < 1:
        raise ValueError(f"deadline_s ({deadline_s}) must be > 0 and concurrency "
                         f"({concurrency}) >= 1")
    starts: list[float | None] = [None] * len(items)
    failed = threading.Event()

    def run(i):
        # Set in the worker, before it takes the next item: a fatal error (a refused key)
        # must not be followed by one more request while the caller polls.
        if failed.is_set():
            return None  # never returned: the failure is raised from its own future
        starts[i] = time.monotonic()
        try:
            return fn(items[i])
        except BaseException:
            failed.set()
            raise

    futures = [pool.submit(run, i) for i in range(len(items))]
    overall = time.monotonic() + deadline_s * math.ceil(len(items) / concurrency)
    results: list[Any] = [None] * len(items)
    pending = set(range(len(items)))
    while pending:
        now = time.monotonic()
        for i in sorted(pending):
            future = futures[i]
            if future.done() and not future.cancelled():
                if future.exception() is not None:
                    for j in pending:
                        futures[j].cancel()
                    raise future.exception()
                results[i] = future.result()
                pending.discard(i)
            elif now >= overall or (starts[i] is not None and now - starts[i] >= deadline_s):
                future.cancel()
                results[i] = DeadlineExceeded(f"still running after {deadline_s:.0f} s; given up")
                pending.discard(i)
        if pending:
            wake = min([overall] + [starts[i] + deadline_s for i in pending
                                    if starts[i] is not None])
            concurrent.futures.wait([futures[i] for i in pending],
                                    timeout=min(max(wake - now, 0.01), 0.5),
                                    return_when=concurrent.futures.FIRST_COMPLETED)
    return results


class ChatClient:
    """One model behind one OpenAI-compatible endpoint; thread-safe (one pooled session).

    Args:
      base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
      model: the model name sent with every request.
      key_env: the environment variable holding the API key ("" for none).
      timeout_s: connect and read timeout of one try.
      retries, backoff_s, max_retry_after_s: see `retrying_session`.
      max_tokens, temperature: sent with every request (greedy by default).
      pool_size: connections kept open (at least the caller's concurrency).
    Raises:
      ValueError: an empty base_url or model, or a named key variable that is unset.
    """

    def __init__(self, base_url: str, model: str, key_env: str = "", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_tokens: int = 1024,
                 temperature: float = 0.0, pool_size: int = 10,
                 max_retry_after_s: float = MAX_RETRY_AFTER_S):
        if not base_url or not model:
            raise ValueError(f"a chat endpoint needs a base URL and a model name, got "
                             f"{base_url!r} and {model!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s = model, timeout_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self.deadline_s = request_bound_s(retries, timeout_s, backoff_s, max_retry_after_s)
        self._key_env = key_env
        self._session = retrying_session(retries, backoff_s, pool_size, max_retry_after_s)
        self._key = api_key(key_env, f"chat endpoint {base_url}")
        if self._key is not None:
            self._session.headers["Authorization"] = f"Bearer {self._key}"

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def scrub(self, text: str) -> str:
        """`text` with the API key (should a server echo it) replaced by "[API key]"."""
        return scrub(text, self._key)

    def complete(self, prompt: str) -> str:
        """The assistant's reply to one user message.

        Raises AuthError when the endpoint refuses the key (401/403), ChatError when it stays
        unreachable or failing through the retries, answers another 4xx, or sends no
        `choices[0].message.content`; never with the key in the message.
        """
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        try:
            response = self._session.post(self.url, json=body, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise ChatError(self.scrub(f"{self.url}: {type(e).__name__}: {_first_line(e)}")
                            ) from None
        if response.status_code in AUTH_STATUSES:
            where = (f"the API key in ${self._key_env}" if self._key_env
                     else "the request (no API key was sent: key_env is empty)")
            raise AuthError(self.scrub(
                f"{self.url} answered {response.status_code}: it refused {where}; check the "
                f"key and the endpoint. Reply: {self._body(response)!r}"))
        if response.status_code != 200:
            raise ChatError(f"{self.url} answered {response.status_code}: "
                            f"{self._body(response)!r}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ChatError(self.scrub(f"{self.url}: not a chat completion ({type(e).__name__}: "
                                       f"{e}): {self._body(response)!r}")) from None
        if not isinstance(content, str):
            raise ChatError(f"{self.url}: message content is {type(content).__name__}, not text")
        return content

    def _body(self, response: requests.Response) -> str:
        """The start of a reply's body for an error message, the key scrubbed before it is
        cut (a cut key would leave a prefix of it)."""
        return self.scrub(response.text)[:200]

    def close(self) -> None:
        self._session.close()


def scrub(text: str, key: str | None) -> str:
    """`text` with every occurrence of `key` replaced by "[API key]" (None or "": unchanged)."""
    return text.replace(key, REDACTED) if key else text


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300] if str(error) else ""
