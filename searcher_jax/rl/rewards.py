"""Outcome rewards of R1-Searcher: format checks plus an answer score (SPEC section 3).

Rewards are computed on the host from the decoded response (the text after the
prompt, with the inserted document blocks). A config names the recipe:

- `retrieval_format` (stage 1, paper): 0.5 for at least one well-formed
  retrieval, plus 0.5 for a well-formed format.
- `cem_retrieval_format` (stage 1, released Llama): +1/-1 by cover EM, plus
  the two 0.5 terms above.
- `answer` (stage 2): the answer metric (F1 by default) if the format is
  well-formed, else `format_penalty` (-2 Qwen, -1 Llama).

RLConfig.overlong_buffer adds DAPO's length shaping to any recipe (overlong_penalty).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from searcher_jax.data import prompts
from searcher_jax.rl import metrics

BEGIN_QUERY, END_QUERY = prompts.BEGIN_QUERY, prompts.END_QUERY
BEGIN_DOCS, END_DOCS = prompts.BEGIN_DOCUMENTS, prompts.END_DOCUMENTS
_RETRIEVAL_MARKERS = (BEGIN_DOCS + "\n", END_DOCS + "\n\n", BEGIN_QUERY, END_QUERY, BEGIN_DOCS,
                      END_DOCS, BEGIN_DOCS + "\n(1)")
_CJK = re.compile("[\u4e00-\u9fff]")
ANSWER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "f1": metrics.f1_score, "em": metrics.exact_match, "cem": metrics.cover_exact_match}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    recipe: str = "answer"  # "answer" | "retrieval_format" | "cem_retrieval_format"
    answer_metric: str = "f1"  # The paper's ablation: f1 beats em and cem.
    format_penalty: float = -2.0
    strict_format: bool = True  # The Qwen recipe's extra checks.
    max_answer_words: int = 10

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown reward recipe {self.recipe!r}; one of {sorted(RECIPES)}")
        if self.answer_metric not in ANSWER_METRICS:
            raise ValueError(f"unknown answer metric {self.answer_metric!r}; one of "
                             f"{sorted(ANSWER_METRICS)}")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    reward: float
    format_ok: bool
    retrieval_ok: bool  # Query and document markers balanced (zero retrievals counts as balanced).
    num_retrievals: int
    answer: str | None
    f1: float
    em: float
    cem: float


def retrieval_counts_equal(response: str) -> tuple[bool, int]:
    counts = [response.count(marker) for marker in _RETRIEVAL_MARKERS]
    return len(set(counts)) == 1, counts[0]


def answer_format_ok(response: str, config: RewardConfig, written: str | None = None) -> bool:
    """The answer half of the format check. The `<think>`/`</think>`/`<answer>`/`</answer>`
    tags are counted, and the answer read, on `written`: the text the policy wrote (default
    `prompts.strip_documents(response)`), so a passage quoting answer tags neither breaks nor
    makes the format. The Qwen recipe's "assistant" check reads the whole response (SPEC
    section 3); its CJK check skips the document blocks."""
    written = prompts.strip_documents(response) if written is None else written
    if "<think>" in written or any(written.count(tag) != 1
                                   for tag in ("</think>", "<answer>", "</answer>")):
        return False
    if not config.strict_format:
        return True
    answer = metrics.extract_answer(written) or ""
    if "assistant" in response.lower():
        return False
    if any(tag in answer for tag in (BEGIN_QUERY, END_QUERY, BEGIN_DOCS, END_DOCS)):
        return False
    if len(answer.split()) > config.max_answer_words:
        return False
    return not _CJK.search(written)


def score(response: str, golds: str | Sequence[str], config: RewardConfig) -> RewardResult:
    """The reward of one response against its gold answers, with its parts. The answer is
    read, and the answer/think tags counted, from what the policy wrote (the response less its
    document blocks): a passage that holds `<answer>` tags is neither an answer nor a format
    fault. The retrieval markers are counted on the whole response."""
    written = prompts.strip_documents(response)
    retrieval_ok, num_retrievals = retrieval_counts_equal(response)
    format_ok = retrieval_ok and answer_format_ok(response, config, written)
    answer = metrics.extract_answer(written)
    prediction = answer if answer is not None else ""
    parts = dict(f1=metrics.f1_score(prediction, golds), em=metrics.exact_match(prediction, golds),
                 cem=metrics.cover_exact_match(prediction, golds))
    reward = RECIPES[config.recipe](config, format_ok, retrieval_ok and num_retrievals >= 1,
                                    answer is not None, parts)
    return RewardResult(reward=reward, format_ok=format_ok, retrieval_ok=retrieval_ok,
                        num_retrievals=num_retrievals, answer=answer, **parts)


def _answer_reward(config, format_ok, _, has_answer, parts):
    if not format_ok:
        return config.format_penalty
    return parts[config.answer_metric] if has_answer else 0.0


def _retrieval_format_reward(_, format_ok, searched, __, ___):
    return 0.5 * searched + 0.5 * format_ok


def _cem_retrieval_format_reward(config, format_ok, searched, has_answer, parts):
    correct = has_answer and parts["cem"] == 1.0
    return (1.0 if correct else -1.0) + _retrieval_format_reward(config, format_ok, searched,
                                                                 has_answer, parts)


RECIPES = {
    "answer": _answer_reward,
    "retrieval_format": _retrieval_format_reward,
    "cem_retrieval_format": _cem_retrieval_format_reward,
}


def reward_bounds(config: RewardConfig) -> tuple[float, float]:
    """(lowest, highest) reward `score` can give under `config`, whatever the response text
    (SPEC section 3): `answer` [min(format_penalty, 0), max(format_penalty, 1)] (the answer
    metrics are in [0, 1]), `retrieval_format` [0, 1], `cem_retrieval_format` [-1, 2]. The
    overlong penalty (RLConfig.overlong_buffer) is added on top of these."""
    if config.recipe == "answer":
        return min(config.format_penalty, 0.0), max(config.format_penalty, 1.0)
    if config.recipe == "retrieval_format":
        return 0.0, 1.0
    return -1.0, 2.0


def overlong_penalty(sampled_tokens, truncated, budget, buffer: int,
                     penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), added to the
    reward: [B] float32 values in [-penalty, 0].

    With L_max the length limit and L_cache = buffer, a response of |y| generated tokens gets
      0                                   if |y| <= L_max - L_cache,
      ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max,
      -1                                  if it hit the limit (a truncated row),
    times `penalty`. |y| is the tokens the policy sampled (the loss mask's count per row), so
    the document blocks the environment inserted never count towards it; L_max is the
    response budget, the room the sampler's row buffer leaves after the prompt
    (max_len - prompt length). A row truncated at the buffer (documents included) gets the
    full penalty whatever it sampled. Defaults as DAPO's: buffer 4096 (of 20480), penalty 1.

    Args:
      sampled_tokens: [B] tokens each row sampled (Trajectories.loss_mask.sum(1)).
      truncated: [B] bool, the rows that ended at the limit (end reason "truncated").
      budget: the response budget L_max, a scalar or [B] (max_len - Trajectories.prompt_lengths).
    """
    if buffer < 1:
        raise ValueError(f"overlong buffer must be >= 1 token, got {buffer}")
    room = np.asarray(budget, np.float64) - np.asarray(sampled_tokens, np.float64)
    ramp = np.clip((buffer - room) / buffer, 0.0, 1.0)
    ramp = np.where(np.asarray(truncated, bool), 1.0, ramp)
    return (-penalty * ramp).astype(np.float32)


def trajectory_overlong_penalty(trajectories, max_len: int, buffer: int,
                                penalty: float = 1.0) -> np.ndarray:
    """`overlong_penalty` of a rollout's rows (rollout.Trajectories): |y| is each row's count of
    sampled tokens (loss_mask.sum(1); inserted documents are not in the mask), the budget the
    room the sampler's max_len leaves after each prompt, and end reason "truncated" is the
    limit."""
    return overlong_penalty(np.asarray(trajectories.loss_mask).sum(1),
                            np.asarray(trajectories.end_reasons) == "truncated",
                            max_len - np.asarray(trajectories.prompt_lengths), buffer, penalty)
