"""The LLM judge (ACC_L) against an OpenAI-format chat server on loopback: verdicts, a
malformed reply (counted), a 500 then success (retried), a server that keeps failing (counted,
not fatal), a rerun served from the cache with no request, and the API key in no file."""
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from searcher_jax import judge, llm_client
from tests.conftest import REPO_ROOT

KEY = "sk-test-4f1c9a-never-written"


class ChatServer:
    """An OpenAI-format /v1/chat/completions on 127.0.0.1 whose reply depends on the
    prediction in the prompt: "Paris" -> "True", "Rome" -> "False.", "Lyon" -> a malformed
    reply, "Nice" -> 500 on the first request then "True", "Oslo" -> always 500."""

    def __init__(self):
        self.requests, self.auth, self.seen = [], set(), {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                server.requests.append(body)
                server.auth.add(self.headers.get("Authorization"))
                prediction = prompt.split("Predicted Answer: ")[1].strip()
                server.seen[prediction] = server.seen.get(prediction, 0) + 1
                if prediction == "Oslo" or (prediction == "Nice" and server.seen["Nice"] == 1):
                    self._send(500, {"error": "overloaded"})
                    return
                reply = {"Paris": "True", "Rome": "False.", "Nice": "**True**"}.get(
                    prediction, "It depends on the context.")
                self._send(200, {"choices": [{"message": {"role": "assistant",
                                                          "content": reply}}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def chat_server():
    server = ChatServer()
    yield server
    server.close()


def _rows():
    return [{"question": f"Q{i}?", "answer": ["Paris"], "pred_ans": p}
            for i, p in enumerate(["Paris", "Rome", "Lyon", "Nice", "Oslo"])]


def test_parse_verdict():
    assert judge.parse_verdict("True") is True and judge.parse_verdict(" false.\n") is False
    assert judge.parse_verdict("**TRUE**") is True
    for reply in ("", "Maybe", "True or False?", "Truely"):
        assert judge.parse_verdict(reply) is None


def test_judge_prompt_is_the_released_one():
    prompt = judge.judge_prompt("Who?", ["Ada", "Ada Lovelace"], " Ada ")
    assert prompt.startswith("Given a Question and its Golden Answer, verify whether the "
                             "Predicted Answer is correct.")
    assert prompt.endswith("Question: Who?\nGolden Answer: Ada | Ada Lovelace\n"
                           "Predicted Answer:  Ada \n    ")


def test_openai_judge_verdicts_retries_failures_and_cache(chat_server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    config = judge.JudgeConfig(backend="openai", url=chat_server.url, model="judge-mini",
                               key_env="JUDGE_TEST_KEY", concurrency=3, retries=2,
                               backoff_s=0.0, timeout_s=5)
    verdicts = judge.make_judge(config)
    cache = judge.VerdictCache(tmp_path / judge.CACHE_FILE)
    rows = _rows()
    counts = judge.judge_rows(rows, verdicts, cache)
    assert [r["judge"] for r in rows] == [True, False, None, True, None]
    assert counts == {"asked": 5, "cached": 0, "malformed": 1, "failed": 1}
    assert rows[2]["judge_reply"] == "It depends on the context."
    assert "500" in rows[4]["judge_error"]
    assert chat_server.seen == {"Paris": 1, "Rome": 1, "Lyon": 1, "Nice": 2, "Oslo": 3}
    assert chat_server.auth == {f"Bearer {KEY}"}
    assert {r["model"] for r in chat_server.requests} == {"judge-mini"}
    # A rerun: the three verdicts from the cache (a new cache object reads the file), the
    # malformed and the failed one asked again.
    before = len(chat_server.requests)
    again = _rows()
    counts = judge.judge_rows(again, verdicts, judge.VerdictCache(tmp_path / judge.CACHE_FILE))
    assert counts["cached"] == 3 and counts["asked"] == 2
    assert [r["judge"] for r in again[:2]] == [True, False]
    assert len(chat_server.requests) == before + 1 + 3   # Lyon once, Oslo 1 + 2 retries
    # Only the cached ones asked: no request at all.
    cached_only = _rows()[:2]
    before = len(chat_server.requests)
    judge.judge_rows(cached_only, verdicts, judge.VerdictCache(tmp_path / judge.CACHE_FILE))
    assert len(chat_server.requests) == before
    assert KEY not in (tmp_path / judge.CACHE_FILE).read_text()
    assert KEY not in repr(verdicts._client)  # pylint: disable=protected-access


def test_an_unreachable_judge_counts_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR is not set"):
        judge.make_judge(judge.JudgeConfig(backend="openai", url="http://127.0.0.1:9",
                                           key_env="NO_SUCH_KEY_VAR"))
    verdicts = judge.make_judge(judge.JudgeConfig(backend="openai", url="http://127.0.0.1:9/v1",
                                                  key_env="", retries=1, backoff_s=0.0,
                                                  timeout_s=2))
    rows = _rows()[:2]
    counts = judge.judge_rows(rows, verdicts, judge.VerdictCache(tmp_path / "cache.jsonl"))
    assert counts["failed"] == 2 and [r["judge"] for r in rows] == [None, None]
    assert not (tmp_path / "cache.jsonl").exists()


def test_launch_evaluate_judges_traces_and_writes_the_key_nowhere(chat_server, tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "mini.jsonl").write_text("".join(
        json.dumps({**row, "stop_reason_final": "finished"}) + "\n" for row in _rows()))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "launch" / "evaluate.py"),
               f"--from_traces={traces}", f"--out={out}", "--judge=openai",
               f"--judge_url={chat_server.url}", "--judge_key_env=JUDGE_TEST_KEY",
               "--judge_retries=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JUDGE_TEST_KEY": KEY}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                           check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((out / "results.json").read_text())["table"]["trace"]["mini"]
    assert table["judge"] == pytest.approx(2 / 3) and table["judged"] == 3  # Rome: False
    assert (table["judge_malformed"], table["judge_failed"]) == (1, 1)
    asked = len(chat_server.requests)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(chat_server.requests) == asked + 1 + 2   # only the malformed and failed again
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(KEY not in p.read_text(errors="replace") for p in written)
    assert KEY not in first.stdout + first.stderr + second.stdout + second.stderr


def test_a_local_hf_judge_runs_through_our_sampler(world_model_dir, tmp_path):
    """The world's tiny model is no judge: its replies are counted as malformed, not fatal."""
    config = judge.JudgeConfig(backend="hf", hf_dir=str(world_model_dir / "model"),
                               batch_size=4, max_new_tokens=8)
    verdicts = judge.make_judge(config)
    rows = _rows()
    counts = judge.judge_rows(rows, verdicts, judge.VerdictCache(tmp_path / "cache.jsonl"))
    assert counts["asked"] == 5 and counts["failed"] == 0
    assert counts["malformed"] + sum(r["judge"] is not None for r in rows) == 5
    assert all(isinstance(r["judge_reply"], str) for r in rows)


class ScriptedServer:
    """A loopback chat endpoint answering every request with `answer(handler)`: (status,
    payload, extra headers, seconds to wait first)."""

    def __init__(self, answer):
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.requests += 1
                status, payload, headers, wait = answer(self)
                time.sleep(wait)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def scripted():
    servers = []

    def start(answer):
        servers.append(ScriptedServer(answer))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def _openai(url, **overrides):
    fields = dict(backend="openai", url=url, model="judge-mini", key_env="JUDGE_TEST_KEY",
                  concurrency=2, retries=2, backoff_s=0.0, timeout_s=5)
    return judge.make_judge(judge.JudgeConfig(**{**fields, **overrides}))


def test_a_huge_retry_after_is_capped(scripted, monkeypatch):
    """A 429 asking to retry in an hour: each retry waits at most max_retry_after_s (urllib3
    alone would sleep up to 6 hours), so the verdict fails within seconds, counted."""
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server = scripted(lambda _: (429, {"error": "slow down"}, {"Retry-After": "3600"}, 0))
    verdicts = _openai(server.url, max_retry_after_s=0.2)
    start = time.monotonic()
    [outcome] = verdicts.judge(["Q?"])
    assert time.monotonic() - start < 5
    assert outcome.verdict is None and "429" in outcome.error and server.requests == 3
    # The default cap, as urllib3 reads a response's header.
    retry = llm_client.BoundedRetry(total=1)
    hour = type("R", (), {"headers": {"Retry-After": "3600"}})()
    assert retry.get_retry_after(hour) == llm_client.MAX_RETRY_AFTER_S == 30
    assert retry.new(total=0).get_retry_after(hour) == 30
    assert retry.get_retry_after(type("R", (), {"headers": {"Retry-After": "soon"}})()) is None


def test_a_verdict_past_its_deadline_is_given_up(scripted, monkeypatch):
    """A server that takes longer than the judge's deadline: the call returns at the deadline
    (per prompt, timed from its own start: 3 prompts, 2 at a time), each counted failed."""
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server = scripted(lambda _: (200, {"choices": [{"message": {"content": "True"}}]}, {}, 3.0))
    verdicts = _openai(server.url, deadline_s=0.5, retries=0)
    start = time.monotonic()
    outcomes = verdicts.judge(["Q1?", "Q2?", "Q3?"])
    assert time.monotonic() - start < 2.5
    assert [o.verdict for o in outcomes] == [None] * 3
    assert all("given up" in o.error for o in outcomes)
    assert judge.JudgeConfig(backend="openai", url="x").deadline_s == 0.0  # 0: the client's bound
    # Without a deadline_s, the client's bound: one try's connect and read timeouts, plus 1 s.
    assert _openai(server.url, retries=0).deadline_s == 2 * 5 + 1


def test_a_refused_key_stops_the_run_at_once(scripted, monkeypatch, tmp_path):
    """401 (or 403): one AuthError naming the variable, not a failed row per question; no
    retry, nothing cached."""
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    for status in (401, 403):
        server = scripted(lambda _, status=status: (status, {"error": "invalid key"}, {}, 0))
        verdicts = _openai(server.url, concurrency=1)
        rows = _rows()
        with pytest.raises(llm_client.AuthError, match=rf"answered {status}: .*JUDGE_TEST_KEY"):
            judge.judge_rows(rows, verdicts, judge.VerdictCache(tmp_path / "cache.jsonl"))
        assert server.requests == 1
        assert not (tmp_path / "cache.jsonl").exists()


def test_a_refused_key_stops_every_process_not_only_the_one_that_asked(
        scripted, monkeypatch, tmp_path):
    """Process 0 alone asks the judge; its AuthError is broadcast, so process 1 raises too
    instead of entering the next evaluation's collectives alone (a pod would hang)."""
    from searcher_jax import benchmarks  # pylint: disable=import-outside-toplevel
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server = scripted(lambda _: (401, {"error": "invalid key"}, {}, 0))
    verdicts = _openai(server.url, concurrency=1)
    cache = judge.VerdictCache(tmp_path / "cache.jsonl")
    sent = []

    def from_process_zero(payload):   # process 0's side of the broadcast: what it sends
        sent.append(payload)
        return payload
    with pytest.raises(llm_client.AuthError, match="answered 401"):
        benchmarks.judge_on_process_zero(_rows(), verdicts, cache, 0, 2, from_process_zero)
    assert len(sent) == 1 and b"AuthError: " in sent[0] and KEY.encode() not in sent[0]
    with pytest.raises(RuntimeError, match="the judge on process 0 failed: AuthError: .*401"):
        benchmarks.judge_on_process_zero(_rows(), verdicts, cache, 1, 2, lambda _: sent[0])
    assert server.requests == 1   # process 1 asked nothing

    ok = scripted(lambda _: (200, {"choices": [{"message": {"content": "True"}}]}, {}, 0))
    counts = benchmarks.judge_on_process_zero(_rows(), _openai(ok.url), cache, 0, 2,
                                              from_process_zero)
    assert counts["asked"] == 5 and sent[-1] == b""
    assert benchmarks.judge_on_process_zero(_rows(), None, cache, 1, 2, lambda _: b"") is None


def test_a_fatal_error_starts_no_further_item(monkeypatch):
    """The worker that raised takes no next item, even when the caller is slow to notice (CI
    once saw a second request after a 401: the worker had started item 1 before the caller's
    cancel)."""
    calls = []

    def fn(i):
        calls.append(i)
        if i == 0:
            time.sleep(0.05)  # the caller is in its wait by then
            raise llm_client.AuthError("refused")
        return i

    real_wait = concurrent.futures.wait

    def slow_wait(*args, **kwargs):
        time.sleep(0.2)  # the caller is descheduled while the worker runs on
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "wait", slow_wait)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(llm_client.AuthError):
            llm_client.map_with_deadline(pool, fn, list(range(5)), 10.0, 1)
    assert calls == [0]


def test_a_key_echoed_by_the_server_is_written_nowhere(scripted, monkeypatch, tmp_path):
    """A server that echoes the Authorization header in its error bodies (a 400, then a 401):
    the rows' judge_error, the exception and every file written hold "[API key]", never the
    key."""
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)

    def echo(status):
        return lambda handler: (status, {"error": "bad request",
                                         "got": handler.headers.get("Authorization")}, {}, 0)

    verdicts = _openai(scripted(echo(400)).url)
    rows = _rows()
    counts = judge.judge_rows(rows, verdicts, judge.VerdictCache(tmp_path / "cache.jsonl"))
    assert counts["failed"] == 5
    assert all("[API key]" in r["judge_error"] and KEY not in r["judge_error"] for r in rows)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(llm_client.AuthError) as refused:
        judge.judge_rows(_rows(), _openai(scripted(echo(401)).url),
                         judge.VerdictCache(tmp_path / "cache.jsonl"))
    assert KEY not in str(refused.value) and "[API key]" in str(refused.value)
    (tmp_path / "error.txt").write_text(str(refused.value))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(KEY not in p.read_text() for p in written)


def test_the_hf_judge_keeps_only_its_sampling_copy(monkeypatch):
    """The fp32 model hf_io loads is dropped once the sampler's copy is made."""
    import gc
    import weakref

    from searcher_jax.model import hf_io
    from searcher_jax.sampling import sampler as sampling

    class Model:
        pass

    loaded = [Model()]
    alive = weakref.ref(loaded[0])
    monkeypatch.setattr(hf_io, "load_pretrained", lambda directory, mesh=None: loaded.pop())
    monkeypatch.setattr(hf_io, "load_tokenizer", lambda directory: object())
    monkeypatch.setattr(hf_io, "eos_token_ids", lambda directory, tokenizer: [0])
    monkeypatch.setattr(sampling, "sampling_copy", lambda model, mesh=None: Model())
    verdicts = judge.HFJudge(judge.JudgeConfig(backend="hf", hf_dir="unused"))
    gc.collect()
    assert alive() is None and isinstance(verdicts._copy, Model)  # pylint: disable=protected-access
