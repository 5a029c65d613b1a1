"""The LLM judge (ACC_L) against an OpenAI-format chat server on loopback: verdicts, a
malformed reply (counted), a 500 then success (retried), a server that keeps failing (counted,
not fatal), a rerun served from the cache with no request, and the API key in no file."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from searcher_jax import judge
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
