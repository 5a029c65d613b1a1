"""The retrieval server under load (issue 20): N concurrent clients for D seconds, from this
process, against launch/serve_retriever.py running BM25 in a second process on loopback.

  python launch/load_test_retrieval.py [--clients 32] [--seconds 30] [--corpus FILE | --url URL]

Every request carries its own queries (a base query from a pool, tagged with the client and
request numbers; the tag is not a corpus term, so BM25 answers the base query), and each answer
is checked against its own request: the echoed queries are the ones sent and the answer lines
are those the server gave the base query alone before the load started. The echo is written
from the request the handler parsed, so it cannot show a batching fault; the answer lines do:
hits swapped between requests batched together, or one request's hits given to two, are a
`wrong_answer`, and a request never answered is a timeout. `lost` counts the requests sent that
did not get their own answer, for whatever reason. Every `--bad_every`-th
request of a client is bad instead, in turn malformed JSON, a body over the limit with its
Content-Length, and one sent chunked: each must be refused (400, 413, 413) with a JSON message.

Prints a JSON report: requests, requests/s, latency p50/p90/p99/max (ms), errors (with the
first few), lost, and the bad requests refused as expected. Exit status 1 when any request
failed or none was answered; 2 for bad arguments.
"""
import argparse
import collections
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import requests

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = (REPO_ROOT.parent / "shared" / "reference" / "corpus" / "hotpotqa_qwen.corpus.jsonl")


class UsageError(ValueError):
    """An argument the corpus cannot serve (found only once the corpus is read)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (threads)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                        help="corpus for the BM25 index the started server serves")
    parser.add_argument("--url", default="", help="load this running server instead of starting one "
                        "(it must serve the corpus given, for the answer check)")
    parser.add_argument("--queries_per_request", type=int, default=4)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--pool", type=int, default=256, help="distinct base queries")
    parser.add_argument("--bad_every", type=int, default=20, help="every n-th request is a bad one (0: none)")
    parser.add_argument("--max_body_bytes", type=int, default=65536,
                        help="the started server's body limit; with --url, that server's (else its "
                        "'oversized' requests are not over it, and are answered 200)")
    parser.add_argument("--timeout_s", type=float, default=30.0, help="per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the report JSON here too")


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 2)


def start_server(corpus: str, directory: pathlib.Path, max_body_bytes: int) -> tuple[subprocess.Popen, str]:
    """Builds a BM25 index of `corpus` in `directory` and starts serve_retriever.py on it, on
    a free loopback port -> (process, url)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "build_index.py"), "--corpus", corpus,
                    "--out", str(directory), "--backends", "bm25", "--no_progress"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "serve_retriever.py"),
                                "--index_dir", str(directory), "--backend", "bm25", "--port", "0",
                                "--max_body_bytes", str(max_body_bytes), "--cpu"],
                               stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"at (http://\S+)", line)
    if match is None:
        process.kill()
        raise RuntimeError(f"serve_retriever.py did not start: {line!r}")
    return process, match.group(1)


def _query_pool(corpus: str, size: int, seed: int) -> list[str]:
    """`size` queries of six words each from passages of the corpus."""
    from searcher_jax.retrieval import corpus_formats  # pylint: disable=import-outside-toplevel
    texts = []
    for passage in corpus_formats.read_corpus(pathlib.Path(corpus)):
        words = re.findall(r"[A-Za-z]{3,}", passage.render())
        if len(words) >= 8:
            texts.append(" ".join(words[2:8]))
        if len(texts) >= 20 * size:
            break
    return random.Random(seed).sample(texts, min(size, len(texts)))


class _Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.sent_ids: set[tuple[str, str]] = set()  # (client, request) of each good request
        self.answered = 0
        self.errors: collections.Counter = collections.Counter()
        self.first_errors: list[str] = []
        self.refused: collections.Counter = collections.Counter()

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(f"{kind}: {detail[:300]}")


def _bad_request(url: str, turn: int, max_body_bytes: int, timeout_s: float):
    """-> (name, expected status, response), on a connection of its own (the server closes a
    connection whose body it refused unread)."""
    if turn % 3 == 0:
        return "malformed_json", 400, requests.post(url + "/queries", data=b'{"queries": ["a"', timeout=timeout_s,
                                                   headers={"Content-Type": "application/json"})
    big = json.dumps({"queries": ["x" * 1000] * (max_body_bytes // 1000 + 1)}).encode()
    if turn % 3 == 1:
        return "oversized", 413, requests.post(url + "/queries", data=big, timeout=timeout_s)
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))  # a generator: sent chunked
    return "oversized_chunked", 413, requests.post(url + "/queries", data=chunks, timeout=timeout_s)


def _client(c: int, url: str, pool: list[str], expected: list[list[str]], args, end: float,
            tally: _Tally) -> None:
    try:
        _requests(c, url, pool, expected, args, end, tally)
    except Exception as e:  # pylint: disable=broad-except  # a thread's error would pass unseen
        tally.error("client_crashed", f"client {c}: {''.join(traceback.format_exception(e))[-1000:]}")


def _requests(c: int, url: str, pool: list[str], expected: list[list[str]], args, end: float,
              tally: _Tally) -> None:
    rng = random.Random(args.seed * 1000 + c)
    session = requests.Session()  # one pooled connection per client, reused
    r = bad_turn = 0
    while time.monotonic() < end:
        r += 1
        if args.bad_every and r % args.bad_every == 0:
            try:
                name, status, response = _bad_request(url, bad_turn, args.max_body_bytes, args.timeout_s)
                message = response.json().get("error", "") if response.status_code == status else ""
            except (requests.RequestException, ValueError) as e:
                tally.error("bad_request_not_refused", f"{type(e).__name__}: {e}")
                continue
            finally:
                bad_turn += 1
            if response.status_code == status and message:
                with tally.lock:
                    tally.refused[name] += 1
            else:
                tally.error("bad_request_not_refused", f"{name}: {response.status_code} {response.text}")
            continue
        picks = rng.sample(range(len(pool)), args.queries_per_request)
        queries = [f"{pool[j]} zq{c}x{r}x{i}" for i, j in enumerate(picks)]
        with tally.lock:
            tally.sent_ids.add((str(c), str(r)))
        start = time.perf_counter()
        try:
            response = session.post(url + "/queries", json={"queries": queries, "k": args.k},
                                     timeout=args.timeout_s)
            latency = time.perf_counter() - start
            answer = json.loads(response.content, parse_constant=_reject_constant)
        except (requests.RequestException, ValueError) as e:
            tally.error("request_failed", f"{type(e).__name__}: {e}")
            continue
        if response.status_code != 200:
            tally.error(f"status_{response.status_code}", response.text)
            continue
        echoed = answer.get("queries")
        if echoed != queries:
            tally.error("answered_another_request", f"sent {queries[:1]}..., got {str(echoed)[:200]}")
            continue
        if answer.get("answers") != [expected[j] for j in picks]:
            tally.error("wrong_answer", f"for {queries[0]!r}: {str(answer.get('answers'))[:200]}")
            continue
        with tally.lock:
            tally.answered += 1
            tally.latencies.append(latency)
    session.close()


def _reject_constant(name: str):
    raise ValueError(f"a bare {name} in the answer")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        process, url = (None, args.url.rstrip("/")) if args.url else start_server(
            args.corpus, pathlib.Path(tmp) / "index", args.max_body_bytes)
        try:
            pool = _query_pool(args.corpus, args.pool, args.seed)
            if len(pool) < args.queries_per_request:
                raise UsageError(f"{args.corpus} gives {len(pool)} distinct queries (--pool {args.pool}), "
                                 f"fewer than --queries_per_request {args.queries_per_request}")
            # The answers each base query gets alone, before the load: what every answer under
            # load must equal.
            expected = []
            for i in range(0, len(pool), 32):
                response = requests.post(url + "/queries", json={"queries": pool[i:i + 32], "k": args.k},
                                         timeout=60)
                response.raise_for_status()
                expected += response.json()["answers"]
            tally = _Tally()
            end = time.monotonic() + args.seconds
            threads = [threading.Thread(target=_client, args=(c, url, pool, expected, args, end, tally))
                       for c in range(args.clients)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    latencies = sorted(1000 * x for x in tally.latencies)
    report = {
        "clients": args.clients, "seconds": round(elapsed, 2), "queries_per_request": args.queries_per_request,
        "k": args.k, "corpus": args.corpus, "requests": len(tally.sent_ids), "answered": tally.answered,
        "requests_per_s": round(tally.answered / elapsed, 1),
        "latency_ms": {name: _percentile(latencies, q)
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "errors": sum(tally.errors.values()), "errors_by_kind": dict(tally.errors),
        "first_errors": tally.first_errors,
        "lost": len(tally.sent_ids) - tally.answered,  # sent, never given their own answer
        "bad_requests_refused": dict(tally.refused),
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    for name in ("clients", "seconds", "queries_per_request", "k", "pool", "timeout_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.bad_every < 0:
        parser.error(f"--bad_every must be >= 0, got {args.bad_every}")
    if not pathlib.Path(args.corpus).is_file():  # the queries come from it, --url or not
        parser.error(f"--corpus {args.corpus} is not a file")
    try:
        report = run(args)
    except UsageError as e:
        parser.error(str(e))
    print(json.dumps(report, indent=1), flush=True)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    result = main()
    sys.exit(1 if result["errors"] or result["lost"] or not result["answered"] else 0)
