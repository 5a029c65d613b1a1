"""Greedy evaluation (SPEC section 6): rollouts over a question set, EM / CEM / F1, queries.

A trajectory that never answers predicts "I don't know.", and a prediction is
the unstripped answer span, both as the released evaluation did (so its
published numbers recompute exactly from its traces). The answer span is read
from the text the policy wrote, never from a document block the environment
inserted (a passage that holds "<answer>...</answer>" is not the policy's
answer): `policy_text` keeps the tokens the policy sampled (the rollout's loss
mask), `prompts.strip_documents` drops the document blocks of a stored trace.
Questions go through the rollout in fixed-size batches (the last one padded
with repeats that are then dropped), so a whole set compiles the sampler's
programs once. The rollout config is the run config's `eval_rollout` (9
retrievals, top 5 in configs/base.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from searcher_jax.data.prompts import strip_documents
from searcher_jax.data.questions import Question
from searcher_jax.rl import metrics, rewards
from searcher_jax.rollout import RolloutConfig, Searcher, Tokenizer, Trajectories, rollout
from searcher_jax.sampling.sampler import Sampler

NO_ANSWER = "I don't know."


@dataclasses.dataclass(frozen=True)
class Record:
    """One evaluated question, in the released traces' field names where they exist."""
    id: str
    question: str
    answer: tuple[str, ...]
    pred_ans: str
    gen_text_store: str
    queries: tuple[str, ...]
    end_reason: str
    em: float
    cem: float
    f1: float
    format_ok: bool


def policy_text(trajectories: Trajectories, row: int, tokenizer: Tokenizer) -> str:
    """The text row `row` sampled: each run of loss-mask tokens decoded, runs joined, without
    the end-of-sequence id of a row that ended with one (the rollout's responses drop it too).
    Inserted document blocks are not in the loss mask, so they are not in this text."""
    mask = trajectories.loss_mask[row].copy()
    if trajectories.end_reasons[row] == "eos":
        sampled = np.flatnonzero(mask)
        if sampled.size:
            mask[sampled[-1]] = False
    tokens = trajectories.tokens[row]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return "".join(tokenizer.decode(tokens[start:end].tolist())
                   for start, end in zip(edges[::2], edges[1::2]))


def score_record(question: Question, response: str, queries: Sequence[str], end_reason: str,
                 reward_config: rewards.RewardConfig, written: str | None = None) -> Record:
    """One question's record. written: the text the policy wrote (`policy_text`); None: the
    response less its document blocks (`prompts.strip_documents`). The prediction is read from
    that text only; format_ok is the reward's format check (`rewards.score`: the answer and
    think tags counted on the response less its document blocks, the retrieval markers on the
    whole response)."""
    written = strip_documents(response) if written is None else written
    answer = metrics.answer_span(written)
    prediction = NO_ANSWER if answer is None else answer
    return Record(id=question.id, question=question.question, answer=question.answers,
                  pred_ans=prediction, gen_text_store=response, queries=tuple(queries),
                  end_reason=end_reason, em=metrics.exact_match(prediction, question.answers),
                  cem=metrics.cover_exact_match(prediction, question.answers),
                  f1=metrics.f1_score(prediction, question.answers),
                  format_ok=rewards.score(response, question.answers, reward_config).format_ok)


def score_trajectories(trajectories: Trajectories, questions: Sequence[Question],
                       tokenizer: Tokenizer,
                       reward_config: rewards.RewardConfig) -> list[Record]:
    """The records of the first len(questions) rows (row b answers questions[b])."""
    return [score_record(question, trajectories.responses[b], trajectories.queries[b],
                         trajectories.end_reasons[b], reward_config,
                         written=policy_text(trajectories, b, tokenizer))
            for b, question in enumerate(questions)]


def summarize(records: Sequence[Record]) -> dict[str, float]:
    """Means over questions (the paper's ACC_R is `cem`)."""
    if not records:
        raise ValueError("summarize: no records")
    return {"em": float(np.mean([r.em for r in records])),
            "cem": float(np.mean([r.cem for r in records])),
            "f1": float(np.mean([r.f1 for r in records])),
            "queries_per_question": float(np.mean([len(r.queries) for r in records])),
            "answered": float(np.mean([r.end_reason == "answer" for r in records])),
            "format_ok": float(np.mean([r.format_ok for r in records])),
            "questions": float(len(records))}


def evaluate(sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
             questions: Sequence[Question], encode_prompt: Callable[[str], list[int]],
             batch_size: int, config: RolloutConfig, key=None,
             reward_config: rewards.RewardConfig | None = None, *,
             eos_ids: Sequence[int],
             on_batch: Callable[[int], None] | None = None) -> list[Record]:
    """Records for every question (greedy when the sampler's SelectConfig is greedy).

    eos_ids: every id that ends a row (`hf_io.eos_token_ids`), as in training.
    on_batch: called with the number of questions each finished batch scored (a progress bar).
    """
    key = jax.random.key(0) if key is None else key
    reward_config = reward_config or rewards.RewardConfig()
    records = []
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        trajectories = rollout(sampler, tokenizer, retriever,
                               [encode_prompt(q.question) for q in padded], config,
                               jax.random.fold_in(key, start), eos_ids=eos_ids)
        records += score_trajectories(trajectories, chunk, tokenizer, reward_config)
        if on_batch is not None:
            on_batch(len(chunk))
    return records
