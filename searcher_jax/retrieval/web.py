"""Online search (SPEC section 5; the paper's Bamboogle-online row): a web search API of the
Serper kind restricted to Wikipedia, its top pages fetched, each summarised by an LLM
(OpenAI-compatible chat endpoint) into one paragraph relevant to the query, or "None".

For one query (the released evaluation, RUCAIBox/R1-Searcher evaluation/eval_search_online.py):

    POST search_url {"q": "<query> site:en.wikipedia.org", "num": pages}   (X-API-KEY header)
      -> {"organic": [{"title", "link", ...}, ...]}
    for each of the top `pages` links, in rank order: GET the page, keep its text (HTML tags
    dropped, at most page_chars characters), ask the LLM for the summary (the released
    prompt); stop once `documents` summaries are not "None".

The summaries found are the query's passages (format "raw": the document block shows them as
written); none found gives the usual "None" block. Nothing here hangs: every request has a
timeout and bounded retries (llm_client.retrying_session, a server's Retry-After capped), a
query that fails at any step gets the summaries it has so far, and a query still running
`deadline_s` after its own start is given up (its future cancelled if it has not started,
a running worker thread left to its own timeouts). Only a refused key is fatal: a 401/403
from the search API or the summariser raises llm_client.AuthError (every query would fail).
`stats` counts queries, pages, summaries, "None" summaries, and each kind of failure and
timeout; launch/evaluate.py writes them into results.json and the results.md header.
The API keys are read from environment variables and kept only in request headers.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import html.parser
import logging
import re
import threading
from typing import Sequence

import requests
from urllib3.exceptions import ReadTimeoutError

from searcher_jax import llm_client
from searcher_jax.retrieval.hits import Hit, HitRetriever, check_k
from searcher_jax.retrieval.passage import Passage

# Verbatim (its "[Exacted Content]" included: the summariser answers in that shape).
SUMMARY_PROMPT = """## Task Description:
Given the search query and the content of the searched webpage.
Your task is to extract information from the webpage content that is relevant to the search query and return a summary paragraph.

## **Guidelines**:
(1) The extracted content should be relevant to the query.
(2) The form of the extracted content **must be a summary paragraph** rather than a direct answer to the query.
(3) You **must extract content according to this webpage**. If the webpage content is unrelated to the query, no extraction is required.

## Output Format:
[Exacted Content]: If the webpage content contains information related to the query, output the relevant summary paragraph (not a direct answer to the query); if not, output "None".

## Inputs:
[Search Query]
{search_query}

[Webpage Content]
{document}

## Output:
"""
_SKIPPED_TAGS = {"script", "style", "noscript", "head", "template", "svg"}
# WebRetriever.stats' counts, each present from the start (0 until it happens), so a report of
# them shows the failures and timeouts that did not happen too.
STAT_KEYS = ("queries", "pages", "summaries", "summary_none", "search_empty", "search_failed",
             "search_timeouts", "page_empty", "page_failed", "page_timeouts", "summary_failed",
             "deadline_exceeded", "unexpected_errors")


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """The online backend (RetrieverConfig's web_* fields, with its timeout_s and retries)."""
    search_url: str = "https://google.serper.dev/search"
    search_key_env: str = "SERPER_API_KEY"   # "" for a search server that needs no key
    site: str = "en.wikipedia.org"           # "" : no site restriction
    pages: int = 3                           # top results fetched and summarised
    documents: int = 1                       # summaries kept per query (the released code: 1)
    page_chars: int = 35000                  # page text given to the summariser
    llm_url: str = ""                        # OpenAI-compatible base URL of the summariser
    llm_model: str = "gpt-4o-mini"
    llm_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 20.0                  # one request's connect and read timeout
    retries: int = 2
    backoff_s: float = 1.0
    concurrency: int = 8                     # queries of a round searched at once

    def __post_init__(self):
        if not self.search_url or not self.llm_url:
            raise ValueError("the web backend needs a search URL (web_search_url) and a "
                             "summariser's OpenAI-compatible base URL (web_llm_url)")
        for name in ("pages", "documents", "page_chars", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"web {name} must be >= 1, got {getattr(self, name)}")

    @property
    def deadline_s(self) -> float:
        """The longest one query may take, timed from its own start: every request of it (a
        search, then a page and a summary per result) through all its retries."""
        requests_per_query = 1 + 2 * self.pages
        return requests_per_query * llm_client.request_bound_s(self.retries, self.timeout_s,
                                                               self.backoff_s)


def _timed_out(error: requests.RequestException) -> bool:
    """A timeout, raised as such or (a read timeout after urllib3's read retries) as the reason
    of a MaxRetryError inside a ConnectionError; a refused connection is not one."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(error, requests.Timeout) or isinstance(reason, ReadTimeoutError)


class _TextOf(html.parser.HTMLParser):
    """The visible text of an HTML page, one line per text node."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in _SKIPPED_TAGS

    def handle_endtag(self, tag):
        self._skip -= tag in _SKIPPED_TAGS and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))


def page_text(body: str, content_type: str = "text/html") -> str:
    """A page's text: HTML without tags, scripts and styles (lines of fewer than 3 words
    dropped, as the released code did), or plain text as it is."""
    if "html" not in content_type.lower():
        return body
    parser = _TextOf()
    parser.feed(body)
    parser.close()
    return " ".join(line for line in parser.parts if len(line.split()) >= 3)


def parse_summary(reply: str) -> str | None:
    """The summary paragraph of the summariser's reply, or None when it says "None" (or
    nothing). The released code took the text after "[Exacted Content]", and treated any reply
    containing "none" as none; here only a reply that IS "None" is (a summary may say "none of")."""
    text = reply.split("[Exacted Content]")[-1].lstrip(":").strip()
    bare = text.strip(" \"'*.`").lower()
    return None if not bare or bare == "none" else text


def fill_summary_prompt(query: str, document: str) -> str:
    """SUMMARY_PROMPT with both placeholders filled in one pass: a query that holds
    "{document}" (or a page that holds "{search_query}") stays as written."""
    values = {"{search_query}": query, "{document}": document}
    return re.sub(r"\{search_query\}|\{document\}", lambda m: values[m.group(0)], SUMMARY_PROMPT)


class WebRetriever(HitRetriever):
    """The online backend: `search(queries, k)` gives each query at most min(k, documents)
    summaries (module docstring). Thread-safe; never raises for a network or API failure;
    raises llm_client.AuthError when the search API or the summariser refuses its key."""

    def __init__(self, config: WebConfig):
        self.config = config
        self.stats: collections.Counter = collections.Counter(dict.fromkeys(STAT_KEYS, 0))
        self._lock = threading.Lock()
        pool = config.concurrency * 2
        self._session = llm_client.retrying_session(config.retries, config.backoff_s, pool)
        key = llm_client.api_key(config.search_key_env, f"web search {config.search_url}")
        self._search_headers = {"X-API-KEY": key} if key else {}
        self._llm = llm_client.ChatClient(config.llm_url, config.llm_model,
                                          key_env=config.llm_key_env,
                                          timeout_s=config.timeout_s, retries=config.retries,
                                          backoff_s=config.backoff_s, max_tokens=1024,
                                          pool_size=pool)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.concurrency,
                                                           thread_name_prefix="web-search")

    def __repr__(self) -> str:
        return f"WebRetriever(search={self.config.search_url!r}, llm={self._llm!r})"

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        wanted = min(k, self.config.documents)
        results = llm_client.map_with_deadline(self._pool, lambda q: self._one(q, wanted),
                                               list(queries), self.config.deadline_s,
                                               self.config.concurrency)
        out = []
        for query, result in zip(queries, results):
            if isinstance(result, llm_client.DeadlineExceeded):
                self._count("deadline_exceeded")
                logging.warning("web search: %r still running after %.0f s; no documents",
                                query, self.config.deadline_s)
                out.append([])
            else:
                out.append(result)
        return out

    def _one(self, query: str, wanted: int) -> list[Hit]:
        """Never raises: a failure is counted and the query keeps the summaries it has."""
        self._count("queries")
        hits = []
        try:
            for title, link in self._results(query):
                text = self._page(link)
                if text is None:
                    continue
                summary = self._summary(query, text)
                if summary is not None:
                    hits.append(Hit(-1, Passage(link, title, summary, "raw"), float("nan")))
                    if len(hits) >= wanted:
                        break
        except llm_client.AuthError:
            raise  # a refused key: fatal, as documented
        except Exception:  # pylint: disable=broad-except  # never fatal, as documented
            self._count("unexpected_errors")
            logging.exception("web search: %r failed unexpectedly", query)
        return hits

    def _get_json(self, response: requests.Response, what: str) -> dict | None:
        try:
            value = response.json()
        except ValueError:
            self._count(f"{what}_failed")
            return None
        return value if isinstance(value, dict) else None

    def _results(self, query: str) -> list[tuple[str, str]]:
        cfg = self.config
        q = f"{query} site:{cfg.site}" if cfg.site else query
        try:
            response = self._session.post(cfg.search_url, json={"q": q, "num": cfg.pages},
                                          headers=self._search_headers, timeout=cfg.timeout_s)
        except requests.RequestException as e:
            self._count("search_timeouts" if _timed_out(e) else "search_failed")
            return []
        if response.status_code in llm_client.AUTH_STATUSES:
            key = (f"the key in ${cfg.search_key_env}" if cfg.search_key_env
                   else "the request (no key was sent: web_search_key_env is empty)")
            raise llm_client.AuthError(f"web search {cfg.search_url} answered "
                                       f"{response.status_code}: it refused {key}")
        if response.status_code != 200:
            self._count("search_failed")
            return []
        body = self._get_json(response, "search") or {}
        organic = body.get("organic") or []
        results = [(str(r.get("title", "")), str(r["link"])) for r in organic
                   if isinstance(r, dict) and r.get("link")]
        if not results:
            self._count("search_empty")
        return results[:cfg.pages]

    def _page(self, url: str) -> str | None:
        self._count("pages")
        try:
            response = self._session.get(url, timeout=self.config.timeout_s)
        except requests.RequestException as e:
            self._count("page_timeouts" if _timed_out(e) else "page_failed")
            return None
        if response.status_code != 200:
            self._count("page_failed")
            return None
        text = page_text(response.text, response.headers.get("Content-Type", "text/html"))
        if not text.strip():
            self._count("page_empty")
            return None
        return text[:self.config.page_chars]

    def _summary(self, query: str, text: str) -> str | None:
        prompt = fill_summary_prompt(query, text)
        try:
            reply = self._llm.complete(prompt)
        except llm_client.AuthError:
            raise
        except llm_client.ChatError:
            self._count("summary_failed")
            return None
        summary = parse_summary(reply)
        self._count("summaries" if summary is not None else "summary_none")
        return summary

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()
        self._llm.close()
