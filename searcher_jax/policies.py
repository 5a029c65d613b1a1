"""The policies R1-Searcher is compared with, run through one rollout, model and retriever.

The paper's Table 1 sets the RL-trained searcher against naive generation and
standard retrieval-augmented generation (RAG). Here every policy is the same
model and the same rollout; a policy only differs in what the prompt carries,
what is forced after it, and whether the model may search:

    naive   no retrieval: the prompt and a forced opening that answers from memory
            (`naive_opening`), searches disabled (max_retrievals 0);
    rag     standard RAG (the paper's Naive-RAG): the question itself is searched once
            and its documents fill the prompt's question slot BEFORE the question
            (`prompts.rag_question`); nothing is forced, searches disabled;
    search  the prompt alone: the model searches as it learned to (before RL the
            base model, after RL the trained policy).

The naive opening keeps the base model in the one format it knows (a base model
has no other way to be told "answer now"); with searches disabled, a row that
writes a query anyway ends with `retrieval_limit` and scores as unanswered.

Besides EM / CEM / F1 (SPEC section 6) each question records which passage
titles were retrieved, so that, where the gold passages are known (the
synthetic world knows them exactly, HotpotQA gives supporting titles), the
share of questions whose gold passages were ALL retrieved measures retrieval
quality apart from reading.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from searcher_jax import evaluation
from searcher_jax.data import prompts
from searcher_jax.data.questions import Question
from searcher_jax.rl import rewards
from searcher_jax.rollout import RolloutConfig, Searcher, Tokenizer, clean_query
from searcher_jax.sampling.sampler import Sampler

NAIVE, RAG, SEARCH = "naive", "rag", "search"
KINDS = (NAIVE, RAG, SEARCH)
ALL = "all"   # the group of every question in a table


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one row of a comparison table is produced.

    name: the row's label ("base searching", ...).
    kind: NAIVE, RAG or SEARCH (module docstring).
    naive_opening: NAIVE only: the forced start of the response, ending where the
      answer is to be written (the synthetic world's base model: its no-search mode).
    """
    name: str
    kind: str
    naive_opening: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Policy {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == NAIVE and not self.naive_opening:
            raise ValueError(f"Policy {self.name!r}: a naive policy needs naive_opening")


@dataclasses.dataclass(frozen=True)
class PolicyInput:
    """What a policy gives the model for one question, before the model writes.

    The prompt is the run's prompt style around `documents + question` (exactly
    `prompts.rag_question(question, rendered passages)` for RAG), then `forced`.
    documents: RAG: the documents block the prompt's question slot holds before the
      question ("" otherwise).
    forced: NAIVE: the opening tokenized after the prompt ("" otherwise).
    passages: the passages in `documents`, in order.
    """
    documents: str = ""
    forced: str = ""
    passages: tuple = ()


def policy_input(policy: Policy, question: str, retriever: Searcher, top_k: int) -> PolicyInput:
    """The policy's input for one question; only RAG calls the retriever (once, with the
    cleaned question, as a query the model wrote would be)."""
    if policy.kind == NAIVE:
        return PolicyInput(forced=policy.naive_opening)
    if policy.kind == RAG:
        passages = retriever.search([clean_query(question)], top_k)[0]
        # rag_question of an empty question is the documents text alone; keeping it apart
        # lets a record say what the prompt held without repeating the question.
        return PolicyInput(documents=prompts.rag_question("", [p.render() for p in passages]),
                           passages=tuple(passages))
    return PolicyInput()


def input_ids(policy_in: PolicyInput, question: str, encode_prompt: Callable[[str], list[int]],
              tokenizer: Tokenizer) -> list[int]:
    """The token ids the model starts from: the prompt of the question slot's text, then the
    forced opening tokenized as the model's own text (no special tokens)."""
    ids = list(encode_prompt(policy_in.documents + question))
    if policy_in.forced:
        ids += tokenizer.encode(policy_in.forced, add_special_tokens=False)
    return ids


@dataclasses.dataclass(frozen=True)
class PolicyRecord:
    """One question under one policy: the evaluation record, what was retrieved and what the
    policy put around the question (PolicyInput's documents and forced), so that a record
    file says which prompt each row was produced from."""
    record: evaluation.Record
    retrievals: int                    # searches whose documents the model read (RAG's one too)
    retrieved_titles: frozenset[str]   # titles of every passage the model read
    forced: str = ""                   # NAIVE: the opening forced after the prompt
    prompt_documents: str = ""         # RAG: the documents block before the question


def evaluate_policy(policy: Policy, sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
                    questions: Sequence[Question], encode_prompt: Callable[[str], list[int]],
                    batch_size: int, config: RolloutConfig,
                    reward_config: rewards.RewardConfig | None = None, *,
                    eos_ids: Sequence[int], record_titles: bool = True,
                    on_batch: Callable[[int], None] | None = None) -> list[PolicyRecord]:
    """Every question under `policy` (greedy when the sampler is), in question order.

    encode_prompt: question-slot text -> prompt ids (the run's prompt style, base or
    instruct); RAG's documents go through it with the question (`input_ids`).
    Searched titles of SEARCH rows come from searching the rows' queries again with
    `config.top_k`, which gives the inserted passages for a deterministic retriever;
    record_titles=False skips that second search (a benchmark that does not measure gold
    retrieval, or a web backend whose every search costs), leaving RAG's passages only.
    So the retriever is called: never by NAIVE, once per question by RAG, and by SEARCH
    once per round of the rollout (plus once per searching row with record_titles).
    on_batch: evaluation.evaluate's progress callback.
    """
    inputs = [policy_input(policy, q.question, retriever, config.top_k) for q in questions]
    by_question = {q.question: input_ids(policy_in, q.question, encode_prompt, tokenizer)
                   for q, policy_in in zip(questions, inputs)}
    if policy.kind != SEARCH:
        config = dataclasses.replace(config, max_retrievals=0)
    records = evaluation.evaluate(sampler, tokenizer, retriever, questions, by_question.__getitem__,
                                  batch_size, config, reward_config=reward_config,
                                  eos_ids=eos_ids, on_batch=on_batch)
    out = []
    for record, policy_in in zip(records, inputs):
        searched = ([p for hits in retriever.search(list(record.queries), config.top_k)
                     for p in hits] if record.queries and record_titles else [])
        out.append(PolicyRecord(
            record=record, retrievals=(policy.kind == RAG) + len(record.queries),
            retrieved_titles=frozenset(p.title for p in list(policy_in.passages) + searched),
            forced=policy_in.forced, prompt_documents=policy_in.documents))
    return out


def summarize(records: Sequence[PolicyRecord],
              gold_titles: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """evaluation.summarize's means, retrievals per question counting RAG's, and
    `gold_retrieved`: the share of questions (by id) whose gold titles were all retrieved."""
    summary = evaluation.summarize([r.record for r in records])
    summary["queries_per_question"] = float(np.mean([r.retrievals for r in records]))
    if gold_titles is not None:
        summary["gold_retrieved"] = float(np.mean(
            [set(gold_titles[r.record.id]) <= r.retrieved_titles for r in records]))
    return summary


def table(results: Mapping[str, Sequence[PolicyRecord]], groups: Mapping[str, str],
          gold_titles: Mapping[str, Sequence[str]] | None = None
          ) -> dict[str, dict[str, dict[str, float]]]:
    """{policy name: {group: summary}} over ALL questions and each group.

    groups: question id -> group (e.g. the question kind); groups keep first-seen order.
    Raises KeyError naming a question id missing from `groups` or `gold_titles`.
    """
    names = list(dict.fromkeys(groups.values()))
    out = {}
    for policy, records in results.items():
        missing = [r.record.id for r in records if r.record.id not in groups]
        if missing:
            raise KeyError(f"table: question ids without a group: {missing[:5]}")
        out[policy] = {ALL: summarize(records, gold_titles)}
        for group in names:
            chosen = [r for r in records if groups[r.record.id] == group]
            if chosen:
                out[policy][group] = summarize(chosen, gold_titles)
    return out
