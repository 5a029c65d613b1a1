"""A client of any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`).

The LLM judge (judge.py, the paper's ACC_L) and the online search backend's page summaries
(retrieval/web.py, SPEC section 5) call one through it. HTTP is `requests`, and the bounded
retries are urllib3's `Retry` mounted on the session: a dropped connection, a read timeout,
a 429 or a 5xx is retried with exponential backoff (honouring Retry-After) up to `retries`
times; anything else, or a reply that is not a chat completion, raises ChatError at once.

The API key is read from an environment variable named by the caller, held only in the
session's headers, and never appears in a repr, an error message or anything written.
"""
from __future__ import annotations

import os

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = (429, 500, 502, 503, 504)


class ChatError(RuntimeError):
    """A chat request that failed after its retries, or whose reply was not a completion."""


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


def retrying_session(retries: int, backoff_s: float, pool_size: int = 10) -> requests.Session:
    """A requests Session that retries connection errors, read timeouts and 429/5xx answers
    (POST included) `retries` times, sleeping backoff_s * 2**(n-1) between tries."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                  backoff_factor=backoff_s, status_forcelist=RETRY_STATUSES,
                  allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ChatClient:
    """One model behind one OpenAI-compatible endpoint; thread-safe (one pooled session).

    Args:
      base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
      model: the model name sent with every request.
      key_env: the environment variable holding the API key ("" for none).
      timeout_s: connect and read timeout of one try.
      retries, backoff_s: see `retrying_session`.
      max_tokens, temperature: sent with every request (greedy by default).
      pool_size: connections kept open (at least the caller's concurrency).
    Raises:
      ValueError: an empty base_url or model, or a named key variable that is unset.
    """

    def __init__(self, base_url: str, model: str, key_env: str = "", timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_tokens: int = 1024,
                 temperature: float = 0.0, pool_size: int = 10):
        if not base_url or not model:
            raise ValueError(f"a chat endpoint needs a base URL and a model name, got "
                             f"{base_url!r} and {model!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s = model, timeout_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self._session = retrying_session(retries, backoff_s, pool_size)
        key = api_key(key_env, f"chat endpoint {base_url}")
        if key is not None:
            self._session.headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def complete(self, prompt: str) -> str:
        """The assistant's reply to one user message.

        Raises ChatError (never with the key in it) when the endpoint stays unreachable or
        failing through the retries, answers 4xx, or sends no `choices[0].message.content`.
        """
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        try:
            response = self._session.post(self.url, json=body, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise ChatError(f"{self.url}: {type(e).__name__}: {_first_line(e)}") from None
        if response.status_code != 200:
            raise ChatError(f"{self.url} answered {response.status_code}: "
                            f"{response.text[:200]!r}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ChatError(f"{self.url}: not a chat completion ({type(e).__name__}: {e}): "
                            f"{response.text[:200]!r}") from None
        if not isinstance(content, str):
            raise ChatError(f"{self.url}: message content is {type(content).__name__}, not text")
        return content

    def close(self) -> None:
        self._session.close()


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300] if str(error) else ""
