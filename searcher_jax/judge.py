"""The LLM judge of the paper's ACC_L (SPEC section 6): question, gold answers and a
prediction in, a True/False verdict out.

The prompt is the released evaluation's (RUCAIBox/R1-Searcher,
evaluation/metric_calc_gpt_as_judge.py, judged by gpt-4o-mini), one user message. Backends:

    OpenAIJudge   any OpenAI-compatible chat endpoint (llm_client.ChatClient: the key from an
                  environment variable, bounded retries, a server's Retry-After capped),
                  `concurrency` requests in flight, each given up at `deadline_s`;
    HFJudge       a local HF causal LM through our own sampler (greedy, batched).

`judge_rows` fills verdicts into evaluation records through a `VerdictCache` (one JSON line
per verdict, in the run's output directory), keyed by (judge, question, golds, prediction),
so a rerun asks nothing it has asked before. A reply that names no verdict is counted as
malformed, a request that fails after its retries (or outlasts its deadline) as failed:
either leaves that row without a verdict (and uncached, so a rerun asks again), never stops
the run. A refused key (401/403) does stop it, at once, with llm_client.AuthError: every
row would fail. Error texts kept in records have the key scrubbed (llm_client.scrub).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Sequence

from etils import epath

from searcher_jax import llm_client

# Verbatim, with its trailing newline and spaces (the authors' triple-quoted string).
JUDGE_PROMPT = (
    "Given a Question and its Golden Answer, verify whether the Predicted Answer is correct. "
    "The prediction is correct if it fully aligns with the meaning and key information of the "
    "Golden Answer. Respond with True if the prediction is correct and False otherwise.\n\n"
    "Question: {question}\nGolden Answer: {reference}\nPredicted Answer: {prediction}\n    ")
GOLD_SEPARATOR = " | "   # several golds in one "Golden Answer" line (the authors had one each)
BACKENDS = ("none", "openai", "hf")
CACHE_FILE = "judge_cache.jsonl"
_VERDICT_WORD = re.compile(r"\b(true|false)\b", re.IGNORECASE)


def judge_prompt(question: str, golds: Sequence[str], prediction: str) -> str:
    """The judge's user message. The released script turned a boolean gold into yes/no; a
    question file here holds strings, so golds are joined with GOLD_SEPARATOR as written."""
    return JUDGE_PROMPT.format(question=question, reference=GOLD_SEPARATOR.join(golds),
                               prediction=prediction)


def parse_verdict(reply: str) -> bool | None:
    """True or False from a judge's reply, None when it is malformed.

    The reply's verdict is the one word "True" or "False" (any case, punctuation and markdown
    around it ignored); a reply naming both, or neither, is malformed.
    """
    words = {w.lower() for w in _VERDICT_WORD.findall(reply or "")}
    if len(words) != 1:
        return None
    return words.pop() == "true"


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The judge of a run: launch/evaluate.py's --judge* flags.

    backend: "none", "openai" (url, model, key_env) or "hf" (hf_dir).
    url: the endpoint's base URL, e.g. https://api.openai.com/v1.
    model: the model name the endpoint serves (the paper's: gpt-4o-mini).
    key_env: the environment variable holding the API key ("" for none); never the key.
    max_retry_after_s: the longest a server's Retry-After may make one retry wait.
    deadline_s: the longest one verdict may take, retries included, before it is given up
      and counted failed (0: the client's bound from timeout_s, retries and backoff).
    """
    backend: str = "none"
    url: str = ""
    model: str = "gpt-4o-mini"
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    max_retry_after_s: float = llm_client.MAX_RETRY_AFTER_S
    deadline_s: float = 0.0
    max_tokens: int = 16
    hf_dir: str = ""
    batch_size: int = 16
    max_new_tokens: int = 8

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"judge backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "openai" and not self.url:
            raise ValueError("the openai judge needs --judge_url (an OpenAI-compatible base URL)")
        if self.backend == "hf" and not self.hf_dir:
            raise ValueError("the hf judge needs --judge_hf_dir (a local HF causal LM)")
        for name in ("concurrency", "batch_size", "max_new_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_retry_after_s", "deadline_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"judge {name} must be >= 0, got {getattr(self, name)}")

    def describe(self) -> str:
        """One line for a results header (no key, only the variable's name)."""
        if self.backend == "openai":
            return (f"LLM judge {self.model} at {self.url} (the released evaluation's prompt; "
                    f"greedy, {self.retries} retries)")
        if self.backend == "hf":
            return f"LLM judge: local HF model {self.hf_dir} (the released prompt; greedy)"
        return "no LLM judge (ACC_L not measured)"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One judged item: the verdict (None: malformed or failed), the raw reply, the error."""
    verdict: bool | None
    reply: str = ""
    error: str = ""


class OpenAIJudge:
    """Verdicts from an OpenAI-compatible chat endpoint, `concurrency` requests at a time, each
    given up after the config's deadline_s (counted failed). Raises llm_client.AuthError, at
    once, when the endpoint refuses the key."""

    def __init__(self, config: JudgeConfig):
        self.name = f"openai:{config.model}"
        self._concurrency = config.concurrency
        self._client = llm_client.ChatClient(
            config.url, config.model, key_env=config.key_env, timeout_s=config.timeout_s,
            retries=config.retries, backoff_s=config.backoff_s, max_tokens=config.max_tokens,
            pool_size=config.concurrency, max_retry_after_s=config.max_retry_after_s)
        self.deadline_s = config.deadline_s or self._client.deadline_s

    def _one(self, prompt: str) -> Outcome:
        try:
            reply = self._client.complete(prompt)
        except llm_client.AuthError:
            raise  # a bad key: the run stops (judge)
        except llm_client.ChatError as e:
            return Outcome(None, error=self._client.scrub(str(e)))
        return Outcome(parse_verdict(reply), reply=reply)

    def judge(self, prompts: Sequence[str]) -> list[Outcome]:
        pool = concurrent.futures.ThreadPoolExecutor(self._concurrency,
                                                     thread_name_prefix="judge")
        try:
            results = llm_client.map_with_deadline(pool, self._one, list(prompts),
                                                   self.deadline_s, self._concurrency)
        finally:
            # Given-up requests finish on their own timeouts; nothing waits for them here.
            pool.shutdown(wait=False, cancel_futures=True)
        return [Outcome(None, error=f"{self._client.url}: {r}")
                if isinstance(r, llm_client.DeadlineExceeded) else r for r in results]


class HFJudge:
    """Verdicts from a local HF causal LM (any decoder hf_io loads), greedy, through our
    sampler with no stop strings: each prompt (in the tokenizer's chat template when it has
    one) gets `max_new_tokens` tokens or stops at an end-of-sequence id."""

    def __init__(self, config: JudgeConfig, mesh=None):
        # pylint: disable=import-outside-toplevel
        from searcher_jax.model import hf_io
        from searcher_jax.sampling import sampler as sampling
        self.name = f"hf:{config.hf_dir}"
        self._config = config
        model = hf_io.load_pretrained(config.hf_dir, mesh=mesh)
        self._tokenizer = hf_io.load_tokenizer(config.hf_dir)
        self._eos = hf_io.eos_token_ids(config.hf_dir, self._tokenizer)
        self._mesh, self._samplers = mesh, {}
        # Only the sampling copy is kept: the fp32 model is dropped once it is made.
        self._copy = sampling.sampling_copy(model, mesh)
        del model

    def _encode(self, prompt: str) -> list[int]:
        if getattr(self._tokenizer, "chat_template", None):
            text = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        return list(self._tokenizer(prompt)["input_ids"])

    def _sampler(self, max_len: int):
        # pylint: disable=import-outside-toplevel
        from searcher_jax.sampling import sampler as sampling
        from searcher_jax.sampling import select
        if max_len not in self._samplers:
            config = sampling.SamplerConfig(max_len=max_len,
                                            segment_len=self._config.max_new_tokens,
                                            select=select.SelectConfig(greedy=True))
            self._samplers[max_len] = sampling.Sampler(self._copy, config, None, self._mesh)
        return self._samplers[max_len]

    def judge(self, prompts: Sequence[str]) -> list[Outcome]:
        import jax  # pylint: disable=import-outside-toplevel
        out = []
        size = self._config.batch_size
        for start in range(0, len(prompts), size):
            chunk = [self._encode(p) for p in prompts[start:start + size]]
            rows = chunk + [chunk[-1]] * (size - len(chunk))
            longest = max(len(r) for r in rows) + self._config.max_new_tokens
            max_len = max(128, 1 << (longest - 1).bit_length())  # few shapes, few compiles
            sampler = self._sampler(max_len)
            state = sampler.extend(sampler.init(size, self._eos, jax.random.key(0)), rows)
            state, segment = sampler.decode(state)
            new = sampler.new_tokens(state, segment, range(len(chunk)))
            for b in range(len(chunk)):
                ids = [int(t) for t in new[b][0] if int(t) not in self._eos]
                reply = self._tokenizer.decode(ids)
                out.append(Outcome(parse_verdict(reply), reply=reply))
        return out


def make_judge(config: JudgeConfig):
    """The judge a config names, or None for backend "none"."""
    if config.backend == "openai":
        return OpenAIJudge(config)
    if config.backend == "hf":
        return HFJudge(config)
    return None


class VerdictCache:
    """Verdicts by (judge, question, golds, prediction), one JSON line each in `path`.

    Only parsed verdicts are stored; a malformed or failed one is asked again next time.
    Raises ValueError naming the file and line for a line that is not a cache entry.
    """

    def __init__(self, path):
        self.path = epath.Path(path)
        self._lock = threading.Lock()
        self._verdicts: dict[str, bool] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key, verdict = entry["key"], entry["verdict"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}, line {number}: not a verdict cache entry "
                                     f"({type(e).__name__}: {e})") from None
                if not isinstance(verdict, bool):
                    raise ValueError(f"{self.path}, line {number}: 'verdict' must be true or "
                                     f"false, got {verdict!r}")
                self._verdicts[key] = verdict

    @staticmethod
    def key(judge_name: str, question: str, golds: Sequence[str], prediction: str) -> str:
        payload = json.dumps([judge_name, question, list(golds), prediction], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> bool | None:
        return self._verdicts.get(key)

    def put_all(self, entries: Iterable[dict]) -> None:
        """Appends entries ({"key", "verdict", ...}) in one write."""
        entries = [e for e in entries if e["key"] not in self._verdicts]
        if not entries:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
            for e in entries:
                self._verdicts[e["key"]] = e["verdict"]


def judge_rows(rows: list[dict], judge, cache: VerdictCache) -> dict[str, int]:
    """Sets each record row's "judge" (True, False or None) and, for an asked row,
    "judge_reply" or "judge_error"; returns counts: asked, cached, malformed, failed.

    rows: record dicts with question, answer (a string or a list of golds) and pred_ans.
    """
    counts = {"asked": 0, "cached": 0, "malformed": 0, "failed": 0}
    todo = []
    for row in rows:
        row.pop("judge_reply", None)
        row.pop("judge_error", None)
        golds = [row["answer"]] if isinstance(row["answer"], str) else list(row["answer"])
        key = cache.key(judge.name, row["question"], golds, row["pred_ans"])
        verdict = cache.get(key)
        if verdict is not None:
            row["judge"] = verdict
            counts["cached"] += 1
        else:
            todo.append((row, key, judge_prompt(row["question"], golds, row["pred_ans"])))
    outcomes = judge.judge([prompt for _, _, prompt in todo]) if todo else []
    entries = []
    for (row, key, _), outcome in zip(todo, outcomes):
        counts["asked"] += 1
        row["judge"] = outcome.verdict
        if outcome.error:
            row["judge_error"] = outcome.error
            counts["failed"] += 1
            continue
        row["judge_reply"] = outcome.reply
        if outcome.verdict is None:
            counts["malformed"] += 1
        else:
            entries.append({"key": key, "judge": judge.name, "question": row["question"],
                            "prediction": row["pred_ans"], "verdict": outcome.verdict,
                            "reply": outcome.reply})
    cache.put_all(entries)
    return counts
