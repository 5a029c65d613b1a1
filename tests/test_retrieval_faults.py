"""Retrieval faults on a real tiny rollout (issue 20): the retrieval server stops mid-run, answers
slower than the timeout, or answers malformed JSON. After its bounded retries the http backend
either stops the run with an error naming the URL and the fault (on_failure="stop"), or gives
the affected rows the SPEC's "None" document and counts them (on_failure="none_document");
rows whose retrieval succeeded are exactly as in a run without the fault. Never a hang."""
import http.server
import json
import threading
import time

import dataclasses

import jax
import numpy as np
import pytest
import requests

from searcher_jax import llm_client
from searcher_jax import rollout as rollout_lib
from searcher_jax.data import prompts
from searcher_jax.retrieval import retriever as retriever_lib
from searcher_jax.retrieval.http_client import HttpRetriever, RetrievalServerError
from searcher_jax.retrieval.server import RetrievalServer
from searcher_jax.sampling import sampler as sampling
from searcher_jax.synthetic import world_files

ROWS = 6
TIMEOUT_S, RETRIES, BACKOFF_S = 0.5, 1, 0.05
ERROR_AFTER_S = 0.4
CONFIG = rollout_lib.RolloutConfig(max_retrievals=3, top_k=3)
NONE_BLOCK = f"{prompts.BEGIN_DOCUMENTS}\n{prompts.documents_text([])}{prompts.END_DOCUMENTS}"
FAULTS = ("down", "slow", "garbage")


class FaultyProxy:
    """A loopback server in front of the real retrieval server: calls before `fail_from` are
    forwarded; from it on, the fault: "down" drops the call and stops listening, "slow" answers
    after 3 timeouts, "garbage" answers 200 with a body that is not JSON, "error" answers 500
    after ERROR_AFTER_S. With fail_query, only calls that ask it fail."""

    def __init__(self, upstream: str, fault: str = "", fail_from: int = 0,
                 fail_query: str | None = None):
        self.calls, proxy = 0, self
        self.log = []  # (start, end, failed, body) of each call, in monotonic seconds

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                call, proxy.calls = proxy.calls, proxy.calls + 1
                start, queries = time.monotonic(), json.loads(body)["queries"]
                failing = bool(fault) and call >= fail_from and (
                    fail_query is None or fail_query in queries)
                if not failing:
                    answer = requests.post(upstream + self.path, data=body, timeout=30)
                    status, payload = answer.status_code, answer.content
                elif fault == "down":  # stops listening, then drops this call unanswered
                    proxy.stop()
                    self.close_connection = True
                    return
                elif fault == "slow":
                    time.sleep(3 * TIMEOUT_S)
                    status, payload = 200, b'{"answers": []}'
                elif fault == "error":
                    time.sleep(ERROR_AFTER_S)
                    status, payload = 500, b'{"error": "retrieval failed: the index is gone"}'
                else:
                    status, payload = 200, b'{"queries": ["q"], "answers": [["1\tTitle: x'
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                proxy.log.append((start, time.monotonic(), failing, queries))

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a slow answer's client has gone: a broken pipe is expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._stopped = threading.Event()
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        if not self._stopped.is_set():
            self._stopped.set()
            self.httpd.shutdown()
            self.httpd.server_close()


class HalvedRecording:
    """Sends each round's queries as two requests (first half, second half), so that a fault
    from the second request on leaves the first half's rows answered; records each request."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, k):
        half = (len(queries) + 1) // 2
        found = []
        for part in (queries[:half], queries[half:]):
            if part:
                found += self.inner.search(part, k)
                self.calls.append((list(part), found[-len(part):]))
        return found


@pytest.fixture(scope="module")
def world(world_paths, world_policy):
    tokenizer, eos_ids = world_policy["tokenizer"], world_policy["eos_ids"]
    sampler = sampling.Sampler(world_policy["copy"],
                               sampling.SamplerConfig(max_len=384, segment_len=64),
                               world_policy["table"])
    questions = world_files.read_jsonl(world_paths.eval_questions)[:ROWS]
    prompt_ids = [prompts.prompt_ids(tokenizer, q["question"], "base") for q in questions]
    bm25 = retriever_lib.make_retriever(retriever_lib.RetrieverConfig(
        backend="bm25", index_dir=str(world_paths.index_dir)))
    with RetrievalServer(bm25, port=0) as server:

        def run(proxy, on_failure):
            client = HttpRetriever(proxy.url, timeout_s=TIMEOUT_S, retries=RETRIES, backoff_s=BACKOFF_S,
                                   on_failure=on_failure)
            recording = HalvedRecording(client)
            start = time.monotonic()
            try:
                out = rollout_lib.rollout(sampler, tokenizer, recording, prompt_ids, CONFIG,
                                          jax.random.key(3), eos_ids=eos_ids)
            finally:
                proxy.stop()
            return out, recording.calls, client, time.monotonic() - start

        clean = run(FaultyProxy(server.url), "stop")
        yield dict(run=run, upstream=server.url, clean=clean, sampler=sampler,
                   tokenizer=tokenizer, prompt_ids=prompt_ids, eos_ids=eos_ids)


def test_the_clean_run_searches(world):
    out, calls, client, _ = world["clean"]
    assert len(calls) >= 2 and all(all(found) for _, found in calls)  # every query got passages
    assert client.take_metrics() == {"retrieval/failed_queries": 0.0}
    assert not any(NONE_BLOCK in r for r in out.responses)


@pytest.mark.parametrize("fault", FAULTS)
def test_none_document_for_the_failed_rows_only(world, fault):
    clean, clean_calls, _, _ = world["clean"]
    out, calls, client, elapsed = world["run"](FaultyProxy(world["upstream"], fault, fail_from=1),
                                               "none_document")
    # The first request is answered as in the clean run; every later one's queries get none.
    assert calls[0] == clean_calls[0]
    failed_queries = [q for queries, _ in calls[1:] for q in queries]
    assert failed_queries and all(found == [] for _, found_lists in calls[1:] for found in found_lists)
    assert client.take_metrics() == {"retrieval/failed_queries": float(len(failed_queries))}
    none_rows = [b for b in range(ROWS) if NONE_BLOCK in out.responses[b]]
    assert none_rows and sum(out.responses[b].count(NONE_BLOCK) for b in none_rows) == len(failed_queries)
    for b in range(ROWS):
        if b in none_rows:  # it searched in a failed request: it read "None" where documents were
            assert clean.queries[b] and out.queries[b][0] == clean.queries[b][0]
            assert out.responses[b].count(NONE_BLOCK) >= 1
        else:  # untouched by the fault: bitwise the clean row
            assert out.lengths[b] == clean.lengths[b]
            assert out.tokens[b, :out.lengths[b]].tolist() == clean.tokens[b, :clean.lengths[b]].tolist()
            assert out.responses[b] == clean.responses[b] and out.end_reasons[b] == clean.end_reasons[b]
    # Bounded: each failed round costs at most its tries' timeouts and backoff.
    assert elapsed < world["clean"][3] + (len(calls) - 1) * client.deadline_s


@pytest.mark.parametrize("fault, says", [("down", "unreachable or too slow"),
                                         ("slow", "unreachable or too slow"),
                                         ("garbage", "answered invalid JSON")])
def test_stop_raises_a_clear_error_within_the_bound(world, fault, says):
    start = time.monotonic()
    proxy = FaultyProxy(world["upstream"], fault, fail_from=1)
    with pytest.raises(RetrievalServerError, match=says) as raised:
        world["run"](proxy, "stop")
    assert f"{proxy.url}/queries" in str(raised.value)
    assert proxy.calls == (2 if fault == "down" else 2 + RETRIES * (fault == "slow"))
    assert time.monotonic() - start < world["clean"][3] + llm_client.request_bound_s(RETRIES, TIMEOUT_S, BACKOFF_S)


def test_continuous_failed_rows_end_as_configured_and_never_stall_the_others(world):
    """schedule=continuous: the search call holding the first query the rollout sends fails
    (500 after ERROR_AFTER_S, then again on its retry). Meanwhile the other rows keep decoding
    and their calls are answered; the failed call's rows read "None" (on_failure
    none_document) and go on; every row no failed call held is the clean run's, bit for bit.
    (The clean run is the barrier schedule's: a row's tokens do not depend on the schedule.)"""
    clean = world["clean"][0]
    config = dataclasses.replace(CONFIG, schedule="continuous", decode_steps=8)
    first_query = min(  # the query of the row whose first segment is shortest
        (int(np.flatnonzero(~clean.loss_mask[b, clean.prompt_lengths[b]:])[0]), b)
        for b in range(ROWS) if clean.queries[b])
    poisoned = clean.queries[first_query[1]][0]
    proxy = FaultyProxy(world["upstream"], "error", fail_query=poisoned)
    client = HttpRetriever(proxy.url, timeout_s=TIMEOUT_S, retries=RETRIES, backoff_s=BACKOFF_S,
                           on_failure="none_document")
    try:
        out = rollout_lib.rollout(world["sampler"], world["tokenizer"], client,
                                  world["prompt_ids"], config, jax.random.key(3),
                                  eos_ids=world["eos_ids"])
    finally:
        proxy.stop()
    failed = [entry for entry in proxy.log if entry[2]]
    assert len(failed) == 1 + RETRIES and all(entry[3] == failed[0][3] for entry in failed)
    failed_queries = set(failed[0][3])
    # Not stalled: other calls were answered while the failing call was still being retried.
    answered = [entry for entry in proxy.log if not entry[2]]
    assert any(failed[0][0] < end < failed[-1][1] for _, end, _, _ in answered), proxy.log
    assert client.take_metrics() == {"retrieval/failed_queries": float(len(failed_queries))}
    touched = [b for b in range(ROWS) if failed_queries & set(out.queries[b])]
    assert touched
    for b in range(ROWS):
        if b in touched:
            assert NONE_BLOCK in out.responses[b]
        else:
            assert out.tokens[b, :out.lengths[b]].tolist() == \
                clean.tokens[b, :clean.lengths[b]].tolist()
            assert out.queries[b] == clean.queries[b]
            assert out.end_reasons[b] == clean.end_reasons[b]
