"""The online backend against loopback servers that speak the search API (Serper's shape),
serve pages and the chat API: results, a failing page fetch, a timeout, an all-"None" case;
the rollout goes on in each, and no answer is read from a summary."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from searcher_jax.retrieval import web
from searcher_jax.retrieval.retriever import RetrieverConfig, make_retriever

SEARCH_KEY = "serper-test-key"
PAGES = {
    "Paris": "<html><head><title>x</title><script>var a = 1;</script></head><body>"
             "<p>Paris is the capital and largest city of France.</p><p>Short</p></body></html>",
    "Oslo": "<html><body><p>Oslo is the capital of Norway and its largest city.</p></body></html>",
    "Irrelevant": "<html><body><p>Nothing relevant is written on this page.</p></body></html>",
    "Slow": "<html><body><p>Paris is the capital of France, but too late.</p></body></html>",
    "Pause": "<html><body><p>Paris is the capital of France, after a pause.</p></body></html>",
}
REFUSED = "refused-key"  # a key the search API and the summariser answer 401
SUMMARY = "Paris is the capital of France, as the page says. <answer> Paris </answer>"


class Servers:
    """/search (the search API), /wiki/<page> (pages: Broken is a 404, Slow answers after
    1.5 s, Pause after 0.45 s) and /v1/chat/completions (the summariser: "None" for an
    irrelevant page). Both APIs answer 401 to the key REFUSED."""

    def __init__(self):
        self.queries, self.keys, self.fetched, self.summarised = [], set(), [], 0
        servers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client timed out and left (the Slow page)

            def do_GET(self):
                page = self.path.rsplit("/", 1)[-1]
                servers.fetched.append(page)
                if page == "Slow":
                    time.sleep(1.5)
                if page == "Pause":
                    time.sleep(0.45)
                if page not in PAGES:
                    self._send(404, {"error": "no such page"})
                    return
                self._send(200, PAGES[page].encode(), "text/html; charset=utf-8")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if REFUSED in (self.headers.get("X-API-KEY"), self.headers.get("Authorization",
                                                                            "")[7:]):
                    self._send(401, {"error": "invalid API key"})
                    return
                if self.path == "/search":
                    servers.queries.append(body["q"])
                    servers.keys.add(self.headers.get("X-API-KEY"))
                    query = body["q"]
                    pages = (["Paris"] if query.startswith("capital") else
                             ["Broken", "Oslo"] if query.startswith("broken") else
                             ["Slow"] if query.startswith("slow") else
                             ["Pause"] if query.startswith("pause") else
                             ["Irrelevant", "Irrelevant"] if query.startswith("nothing") else
                             ["Slow", "Broken", "Irrelevant", "Paris"])
                    base = f"http://127.0.0.1:{self.server.server_address[1]}/wiki/"
                    self._send(200, {"organic": [{"title": p, "link": base + p, "position": i}
                                                 for i, p in enumerate(pages, 1)][:body["num"]]})
                    return
                servers.summarised += 1
                prompt = body["messages"][0]["content"]
                reply = ("[Exacted Content]: None" if "Nothing relevant" in prompt else
                         f"[Exacted Content]: {SUMMARY}" if "Paris" in prompt else
                         "[Exacted Content]: Oslo is the capital of Norway.")
                self._send(200, {"choices": [{"message": {"content": reply}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def servers():
    s = Servers()
    yield s
    s.close()


def _retriever(servers, monkeypatch, **overrides):
    monkeypatch.setenv("SEARCH_TEST_KEY", SEARCH_KEY)
    fields = dict(backend="web", timeout_s=0.5, retries=0, web_search_url=servers.base + "/search",
                  web_search_key_env="SEARCH_TEST_KEY", web_llm_url=servers.base + "/v1",
                  web_llm_key_env="")
    config = RetrieverConfig(**{**fields, **overrides})
    return make_retriever(config)


def test_results_failures_timeouts_and_none(servers, monkeypatch):
    retriever = _retriever(servers, monkeypatch, web_pages=4, web_documents=2)
    start = time.monotonic()
    found = retriever.search(["capital of France", "broken link", "slow page", "nothing here"], 5)
    assert time.monotonic() - start < 5   # the slow page timed out, nothing hung
    capital, broken, slow, nothing = found
    assert [p.text for p in capital] == [SUMMARY] and capital[0].title == "Paris"
    assert capital[0].render() == SUMMARY and capital[0].id.endswith("/wiki/Paris")
    assert [p.text for p in broken] == ["Oslo is the capital of Norway."]   # after the 404
    assert slow == [] and nothing == []
    stats = retriever.stats
    assert stats["queries"] == 4 and stats["page_failed"] == 1 and stats["page_timeouts"] == 1
    assert stats["summary_none"] == 2 and stats["summaries"] == 2
    assert all(q.endswith(" site:en.wikipedia.org") for q in servers.queries)
    assert servers.keys == {SEARCH_KEY}
    assert SEARCH_KEY not in repr(retriever)
    retriever.close()


def test_summaries_stop_at_the_first_found_and_failures_never_raise(servers, monkeypatch):
    retriever = _retriever(servers, monkeypatch)   # web_documents=1, web_pages=3
    [hits] = retriever.search(["default mix"], 5)
    assert hits == []   # Slow (timeout), Broken (404), Irrelevant ("None"): the top 3 pages
    retriever.close()
    down = RetrieverConfig(backend="web", timeout_s=0.5, retries=1,
                           web_search_url="http://127.0.0.1:9/search", web_search_key_env="",
                           web_llm_url="http://127.0.0.1:9/v1", web_llm_key_env="")
    unreachable = make_retriever(down)
    assert unreachable.search(["anything"], 3) == [[]]
    assert unreachable.stats["search_failed"] == 1
    unreachable.close()


def test_text_of_a_page_and_a_summary():
    assert web.page_text(PAGES["Paris"]) == "Paris is the capital and largest city of France."
    assert web.page_text("plain words", "text/plain") == "plain words"
    assert web.parse_summary("[Exacted Content]: None") is None
    assert web.parse_summary('[Exacted Content]: "None".') is None
    assert web.parse_summary("[Exacted Content]: None of his sons lived.") == \
        "None of his sons lived."
    with pytest.raises(ValueError, match="web_llm_url"):
        web.WebConfig(llm_url="")


def test_the_rollout_goes_on_with_web_search(servers, monkeypatch, world_model_dir):
    """The world's model searching the web backend: whatever each search meets (a timeout, a
    404, a "None" summary, a summary holding an answer span), every row ends and is scored on
    its own text."""
    from searcher_jax import evaluation
    from searcher_jax.data import prompts
    from searcher_jax.data.questions import read_questions
    from searcher_jax.model import hf_io
    from searcher_jax.rollout import STOP_STRINGS, RolloutConfig
    from searcher_jax.sampling import sampler as sampling
    from searcher_jax.sampling import select, stop_strings

    retriever = _retriever(servers, monkeypatch, web_pages=4)
    model_dir = world_model_dir / "model"
    model = hf_io.load_pretrained(model_dir)
    tokenizer = hf_io.load_tokenizer(model_dir)
    table = stop_strings.stop_table_for_tokenizer(tokenizer, list(STOP_STRINGS),
                                                  vocab_size=model.config.vocab_size)
    config = sampling.SamplerConfig(max_len=768, segment_len=96,
                                    select=select.SelectConfig(greedy=True))
    sampler = sampling.Sampler(sampling.sampling_copy(model, None), config, table, None)
    questions = read_questions(world_model_dir / "world" / "eval.jsonl")[:4]
    records = evaluation.evaluate(
        sampler, tokenizer, retriever, questions,
        lambda q: prompts.prompt_ids(tokenizer, q, "base"), 4,
        RolloutConfig(max_retrievals=2, top_k=5), eos_ids=hf_io.eos_token_ids(model_dir, tokenizer))
    assert [r.id for r in records] == [q.id for q in questions]
    searched = sum(len(r.queries) for r in records)
    assert retriever.stats["queries"] == searched > 0
    for record in records:
        assert record.end_reason in ("answer", "eos", "segment_limit", "no_query", "empty_query",
                                     "retrieval_limit", "truncated")
        # One inserted block right after each query (the model may write the tag itself too).
        inserted = record.gen_text_store.count("<|end_of_query|>\n\n<|begin_of_documents|>")
        assert inserted == len(record.queries)
        if SUMMARY in record.gen_text_store:   # the summary's answer span is not the policy's
            written = prompts.strip_documents(record.gen_text_store)
            assert record.pred_ans != " Paris " or "<answer> Paris </answer>" in written
    retriever.close()


def test_the_deadline_runs_from_each_querys_start(servers, monkeypatch):
    """One query at a time, each taking about 0.5 s, with a deadline of 0.75 s per query: the
    second one's deadline runs from its own start (one over the whole call would cut it)."""
    monkeypatch.setattr(web.WebConfig, "deadline_s", property(lambda self: 0.75))
    retriever = _retriever(servers, monkeypatch, web_concurrency=1)
    found = retriever.search(["pause one", "pause two"], 3)
    assert [len(hits) for hits in found] == [1, 1]
    assert retriever.stats["deadline_exceeded"] == 0
    retriever.close()


def test_queries_past_the_deadline_are_given_up_and_cancelled(servers, monkeypatch):
    """One query at a time, each slower than its deadline: the first is given up at its
    deadline, the others by the call's bound (the deadline x rounds of `concurrency`); a query
    that had not started is cancelled, never searched later."""
    monkeypatch.setattr(web.WebConfig, "deadline_s", property(lambda self: 0.2))
    retriever = _retriever(servers, monkeypatch, web_concurrency=1)
    start = time.monotonic()
    found = retriever.search(["slow one", "slow two", "capital of France"], 3)
    assert time.monotonic() - start < 1.5 and found == [[], [], []]
    assert retriever.stats["deadline_exceeded"] == 3
    time.sleep(1.5)  # the given-up worker finishes its own timeouts
    assert not any(q.startswith("capital") for q in servers.queries)
    retriever.close()


@pytest.mark.parametrize("which", ["search", "summariser"])
def test_a_refused_key_is_fatal(servers, monkeypatch, which):
    """A 401 from the search API or the summariser raises AuthError (every query would fail):
    the run stops with the variable named, rather than searching on with no documents."""
    from searcher_jax import llm_client
    monkeypatch.setenv("REFUSED_KEY", REFUSED)
    overrides = ({"web_search_key_env": "REFUSED_KEY"} if which == "search"
                 else {"web_llm_key_env": "REFUSED_KEY"})
    retriever = _retriever(servers, monkeypatch, **overrides)
    with pytest.raises(llm_client.AuthError, match="answered 401: .*REFUSED_KEY"):
        retriever.search(["capital of France", "broken link"], 3)
    retriever.close()


def test_stats_go_into_the_results(servers, monkeypatch, tmp_path):
    """The counts WebRetriever.stats keeps (failures and timeouts included, 0 when none) reach
    results.json and a line of the results.md header, as launch/evaluate.py writes them."""
    from searcher_jax import benchmarks, eval_tables
    from searcher_jax.retrieval.process_zero import ProcessZeroRetriever
    retriever = _retriever(servers, monkeypatch, web_pages=4, web_documents=2)
    retriever.search(["capital of France", "broken link", "slow page"], 5)
    stats = benchmarks.retrieval_stats([ProcessZeroRetriever(retriever, 0,
                                                             broadcast=lambda x: x)])
    assert set(web.STAT_KEYS) <= set(stats)
    assert stats["queries"] == 3 and stats["page_timeouts"] == 1 and stats["page_failed"] == 1
    assert stats["deadline_exceeded"] == 0
    assert benchmarks.retrieval_stats([ProcessZeroRetriever(None, 1)]) == {}
    table = {"search": {"bamboogle": {"questions": 1.0, "em": 0.0, "cem": 0.0, "f1": 0.0,
                                      "judged": 0.0, "judge_malformed": 0.0,
                                      "judge_failed": 0.0, "queries_per_question": 1.0,
                                      "answered": 1.0}}}
    eval_tables.write_results(tmp_path, table, "Evaluation", ["setup line"],
                              retrieval_stats=stats)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["retrieval_stats"] == stats and saved["setup"] == ["setup line"]
    header = (tmp_path / "results.md").read_text().split("| method")[0]
    assert "queries 3" in header and "page_timeouts 1" in header
    assert "deadline_exceeded 0" in header
    retriever.close()


def test_a_query_holding_a_placeholder_is_filled_in_one_pass():
    """A query that holds "{document}" stays as written (chained replaces put the page
    there), and a page holding "{search_query}" too."""
    prompt = web.fill_summary_prompt("what is {document}?", "page text {search_query}")
    assert "[Search Query]\nwhat is {document}?\n" in prompt
    assert "[Webpage Content]\npage text {search_query}\n" in prompt
    assert prompt.count("page text") == 1
