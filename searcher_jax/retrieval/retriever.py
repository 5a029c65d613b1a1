"""The one interface the rollout calls, and its backends: dense (encoder + ScaNN), BM25, HTTP,
and web (online search summarised by an LLM: retrieval/web.py).

An index directory (written by launch/build_index.py) holds:
  corpus/      the memory-mapped corpus store
  dense/       the ScaNN searcher (if built)
  bm25/        the BM25 index (if built)
  index.json   which backends exist, the encoder used, and the build summary
"""
import dataclasses
import json
import logging
import pathlib
from typing import Protocol, Sequence

from searcher_jax.retrieval.bm25 import BM25Index
from searcher_jax.retrieval.corpus_store import CorpusStore
from searcher_jax.retrieval.dense_index import DenseIndex
from searcher_jax.retrieval.hits import Hit, HitRetriever, check_k
from searcher_jax.retrieval.http_client import ON_FAILURE, HttpRetriever
from searcher_jax.retrieval.passage import Passage

BACKENDS = ("dense", "bm25", "http", "web")
SEARCH_ON = ("every_process", "process_0")


class Retriever(Protocol):
    """`search` is called once per rollout round with every paused row's query."""

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        ...


class DenseRetriever(HitRetriever):

    def __init__(self, store: CorpusStore, encoder, index: DenseIndex, leaves_to_search: int | None = None):
        if len(store) != index.num_passages:
            raise ValueError(f"corpus has {len(store)} passages but the index {index.num_passages}")
        self.store, self.encoder, self.index = store, encoder, index
        self._leaves_to_search = leaves_to_search

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        if not queries:
            return []
        vectors = self.encoder.encode_queries(list(queries))  # [B, D]
        rows, scores = self.index.search(vectors, k, leaves_to_search=self._leaves_to_search)
        return [[Hit(int(r), self.store.get(int(r)), float(s)) for r, s in zip(rs, ss)]
                for rs, ss in zip(rows, scores)]


class BM25Retriever(HitRetriever):

    def __init__(self, store: CorpusStore, index: BM25Index):
        if len(store) != index.num_passages:
            raise ValueError(f"corpus has {len(store)} passages but the BM25 index {index.num_passages}")
        self.store, self.index = store, index

    def search_hits(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k)
        rows, scores = self.index.search(list(queries), k)
        return [[Hit(int(r), self.store.get(int(r)), float(s)) for r, s in zip(rs, ss)]
                for rs, ss in zip(rows, scores)]


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    backend: str = "dense"      # "dense" | "bm25" | "http" | "web"
    index_dir: str = ""         # for dense and bm25
    encoder_dir: str = ""       # dense: "" means the encoder recorded in index.json
    encoder_batch_size: int = 0  # 0: the encoder's default (16 per CPU device, 64 per accelerator)
    leaves_to_search: int = 0   # dense tree index: 0 means the value it was built with
    url: str = ""               # http: e.g. "http://127.0.0.1:8000"
    api: str = "r1searcher"     # http: "r1searcher" (POST /queries) | "searchr1" (POST /retrieve)
    timeout_s: float = 60.0
    retries: int = 4            # http: transient failures retried with backoff 1, 2, 4, 8 s
    # http: when a search fails (server down or too slow through all its retries, or an answer
    # that is not strict JSON of the API, which is not retried), "stop" raises
    # RetrievalServerError and the run stops; "none_document" gives the request's queries the
    # document "None" (SPEC section 5) and counts them in the step metrics as
    # retrieval/failed_queries (retrieval/http_client.py).
    on_failure: str = "stop"
    # Multi-host runs: "every_process" searches the same queries on every process (each holds
    # the index or calls the server); "process_0" searches on process 0 only and broadcasts
    # the passages, so only process 0 loads the index (retrieval/process_zero.py). The web
    # backend always searches on process 0: live search results differ between calls, and
    # every process must insert the same documents (make_retriever).
    search_on: str = "every_process"
    # web (retrieval/web.py; timeout_s and retries above apply to each request): a search
    # API of the Serper kind, restricted to web_site, and an OpenAI-compatible summariser.
    # The *_key_env fields name environment variables ("" : no key); keys are never config.
    web_search_url: str = "https://google.serper.dev/search"
    web_search_key_env: str = "SERPER_API_KEY"
    web_site: str = "en.wikipedia.org"
    web_pages: int = 3          # top results fetched and summarised per query
    web_documents: int = 1      # summaries kept per query (at most top_k)
    web_page_chars: int = 35000
    web_llm_url: str = ""
    web_llm_model: str = "gpt-4o-mini"
    web_llm_key_env: str = "OPENAI_API_KEY"
    web_concurrency: int = 8

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"retriever backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.search_on not in SEARCH_ON:
            raise ValueError(f"retriever search_on must be one of {SEARCH_ON}, got {self.search_on!r}")
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"retriever on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")


def read_index_meta(index_dir: str | pathlib.Path) -> dict:
    meta_file = pathlib.Path(index_dir) / "index.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: build the index with launch/build_index.py")
    return json.loads(meta_file.read_text())


def make_retriever(cfg: RetrieverConfig) -> Retriever:
    """The backend a config names; with search_on="process_0" in a multi-process run, that
    backend on process 0 behind a broadcast, and no index on the other processes.

    The web backend is always searched on process 0 (search_on is overridden): a live search
    API and an LLM summariser do not answer two processes' identical queries identically, and
    processes that inserted different documents would diverge (SPMD needs every process to
    hold the same tokens)."""
    if cfg.search_on == "process_0" or cfg.backend == "web":
        import jax
        if jax.process_count() > 1:
            from searcher_jax.retrieval.process_zero import ProcessZeroRetriever
            process = jax.process_index()
            logging.info("retrieval: process 0 of %d searches and broadcasts the passages",
                         jax.process_count())
            return ProcessZeroRetriever(make_backend(cfg) if process == 0 else None, process)
    return make_backend(cfg)


def make_backend(cfg: RetrieverConfig) -> HitRetriever:
    """The backend a config names, loaded from its index directory (or pointed at its URL)."""
    if cfg.backend == "http":
        return HttpRetriever(cfg.url, api=cfg.api, timeout_s=cfg.timeout_s, retries=cfg.retries,
                             on_failure=cfg.on_failure)
    if cfg.backend == "web":
        from searcher_jax.retrieval import web  # pylint: disable=import-outside-toplevel
        return web.WebRetriever(web.WebConfig(
            search_url=cfg.web_search_url, search_key_env=cfg.web_search_key_env,
            site=cfg.web_site, pages=cfg.web_pages, documents=cfg.web_documents,
            page_chars=cfg.web_page_chars, llm_url=cfg.web_llm_url, llm_model=cfg.web_llm_model,
            llm_key_env=cfg.web_llm_key_env, timeout_s=cfg.timeout_s, retries=cfg.retries,
            concurrency=cfg.web_concurrency))
    if not cfg.index_dir:
        raise ValueError(f"backend {cfg.backend!r} needs index_dir")
    index_dir = pathlib.Path(cfg.index_dir)
    meta = read_index_meta(index_dir)
    if cfg.backend not in meta["backends"]:
        raise ValueError(f"{index_dir} was built with backends {meta['backends']}, not {cfg.backend!r}")
    store = CorpusStore(index_dir / "corpus")
    if cfg.backend == "bm25":
        return BM25Retriever(store, BM25Index.load(index_dir / "bm25", len(store)))
    from searcher_jax.retrieval.encoder import TextEncoder  # imports JAX only when needed
    encoder_meta = meta["encoder"]
    encoder = TextEncoder.load(cfg.encoder_dir or encoder_meta["dir"] or None, family=encoder_meta["family"],
                               max_length=encoder_meta["max_length"], batch_size=cfg.encoder_batch_size)
    return DenseRetriever(store, encoder, DenseIndex.load(index_dir / "dense", len(store)),
                          leaves_to_search=cfg.leaves_to_search or None)
