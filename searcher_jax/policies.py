"""The policies R1-Searcher is compared with, run through one rollout, model and retriever.

The paper's Table 1 sets the RL-trained searcher against naive generation and
standard retrieval-augmented generation (RAG). Here every policy is the same
model and the same rollout; a policy only differs in what is written before
the model continues (a forced response prefix) and in whether it may search:

    naive   no retrieval: the prompt and a forced opening that answers from memory
            (`naive_opening`), searches disabled (max_retrievals 0);
    rag     standard RAG: the question itself is searched once, its documents
            inserted as the first document block, searches disabled after;
    search  the prompt alone: the model searches as it learned to (before RL the
            base model, after RL the trained policy).

A forced prefix keeps the base model in the one format it knows (a base model
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
from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY
from searcher_jax.data.questions import Question
from searcher_jax.retrieval.passage import documents_block
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
    rag_opening: RAG only: the response text before the forced query.
    """
    name: str
    kind: str
    naive_opening: str = ""
    rag_opening: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Policy {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == NAIVE and not self.naive_opening:
            raise ValueError(f"Policy {self.name!r}: a naive policy needs naive_opening")


@dataclasses.dataclass(frozen=True)
class PolicyRecord:
    """One question under one policy: the evaluation record and what was retrieved."""
    record: evaluation.Record
    retrievals: int                    # searches whose documents were inserted (forced too)
    retrieved_titles: frozenset[str]   # titles of every inserted passage
    forced: str = ""                   # the text forced after the prompt (forced_prefix)


def forced_prefix(policy: Policy, question: str, retriever: Searcher,
                  top_k: int) -> tuple[str, list]:
    """(text forced after the prompt, the passages it inserted) for one question."""
    if policy.kind == NAIVE:
        return policy.naive_opening, []
    if policy.kind == RAG:
        query = clean_query(question)
        passages = retriever.search([query], top_k)[0]
        text = (f"{policy.rag_opening}{BEGIN_QUERY} {query}{END_QUERY}"
                + documents_block(passages))
        return text, passages
    return "", []


def evaluate_policy(policy: Policy, sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
                    questions: Sequence[Question], encode_prompt: Callable[[str], list[int]],
                    batch_size: int, config: RolloutConfig,
                    reward_config: rewards.RewardConfig | None = None, *,
                    eos_ids: Sequence[int], record_titles: bool = True,
                    on_batch: Callable[[int], None] | None = None) -> list[PolicyRecord]:
    """Every question under `policy` (greedy when the sampler is), in question order.

    encode_prompt: question text -> prompt ids (the run's prompt style). The forced
    prefix is tokenized after the prompt, so the model sees it as its own text.
    Searched titles of SEARCH rows come from searching the rows' queries again with
    `config.top_k`, which gives the inserted passages for a deterministic retriever;
    record_titles=False skips that second search (a benchmark that does not measure gold
    retrieval, or a web backend whose every search costs), leaving the forced passages' only.
    So the retriever is called: never by NAIVE, once per question by RAG, and by SEARCH
    once per round of the rollout (plus once per searching row with record_titles).
    on_batch: evaluation.evaluate's progress callback.
    """
    forced = [forced_prefix(policy, q.question, retriever, config.top_k) for q in questions]
    by_question = {q.question: encode_prompt(q.question)
                   + tokenizer.encode(text, add_special_tokens=False)
                   for q, (text, _) in zip(questions, forced)}
    if policy.kind != SEARCH:
        config = dataclasses.replace(config, max_retrievals=0)
    records = evaluation.evaluate(sampler, tokenizer, retriever, questions, by_question.__getitem__,
                                  batch_size, config, reward_config=reward_config,
                                  eos_ids=eos_ids, on_batch=on_batch)
    out = []
    for record, (text, passages) in zip(records, forced):
        searched = ([p for hits in retriever.search(list(record.queries), config.top_k)
                     for p in hits] if record.queries and record_titles else [])
        out.append(PolicyRecord(
            record=record, retrievals=(policy.kind == RAG) + len(record.queries),
            retrieved_titles=frozenset(p.title for p in list(passages) + searched),
            forced=text))
    return out


def summarize(records: Sequence[PolicyRecord],
              gold_titles: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """evaluation.summarize's means, retrievals per question counting forced ones, and
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
