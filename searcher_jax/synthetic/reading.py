"""Can the base model read an answer out of retrieved documents? The "reading F1" probe.

For each question the probe writes the prompt and a response prefix the way a
clean demonstration does (searcher_jax/synthetic/demonstrations.py): for every
reasoning step the need, a good query and an ORACLE document block that holds
the gold passage of the step's entity first (then, up to `top_k`, the other
passages a keyword search over the corpus returns for the query). A bridge or
comparison question gets both steps' blocks, with the first step's fact
restated between them, as the demonstrations do. The model then greedily
continues (the real sampler, searcher_jax/sampling/sampler.py) to `</answer>`
and the extracted answer is scored by token F1 against the gold
(searcher_jax/rl/metrics.py).

On evaluation questions (entities never in the pretraining text) a high
reading F1 means the model copies the fact from the documents; `closed_book_f1`
is the control: the same questions with no documents, the model forced into
the demonstrations' no-search mode, where it can only guess.

The question files keep only text and answer; the steps (which fact of which
entity) come from regenerating the questions from the world config
(`world_questions`), which is deterministic.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY, base_prompt, documents_block
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl import metrics
from searcher_jax.rollout import ANSWER_END
from searcher_jax.synthetic import keyword_search
from searcher_jax.synthetic import passages as passages_lib
from searcher_jax.synthetic import probe
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib
from searcher_jax.synthetic import world_files

# The demonstrations' no-search opening, up to where the answer goes (templates.NO_SEARCH[0]).
CLOSED_BOOK = templates.NO_SEARCH[0].split("{answer}")[0].rstrip()


def world_questions(config: world_lib.WorldConfig
                    ) -> tuple[list[questions_lib.Question], list[questions_lib.Question]]:
    """(training questions, evaluation questions) of a world, with their steps.

    Redraws them exactly as world_files.build_world_texts does, so question i is
    row i of train.jsonl / eval.jsonl.
    """
    world = world_files.generate_world(config)
    rng = random.Random(config.seed + 2)
    train_questions = questions_lib.generate_questions(
        rng, world.train, config.num_train_questions, config.kind_weights)
    eval_questions = questions_lib.generate_questions(
        rng, world.eval, config.num_eval_questions, config.kind_weights)
    return train_questions, eval_questions


class OracleDocuments:
    """The gold passages of a corpus, and a keyword search over it."""

    def __init__(self, corpus_rows: list[dict]):
        self._rendered = {passages_lib.render_passage(row["title"], row["text"])
                          for row in corpus_rows}
        self._search = keyword_search.KeywordSearch(corpus_rows)

    def gold(self, step: questions_lib.Step) -> str:
        """The passage that states the step's fact; KeyError if the corpus lacks it."""
        passage = passages_lib.gold_passage(step)
        if passage not in self._rendered:
            raise KeyError(f"no passage states {step} in this corpus")
        return passage

    def block_passages(self, step: questions_lib.Step, query: str, top_k: int) -> list[str]:
        """The gold passage first, then the search's other top hits, `top_k` in all."""
        gold = self.gold(step)
        others = [p for p in self._search.search(query, top_k + 1) if p != gold]
        return [gold] + others[:top_k - 1]


def oracle_prefix(question: questions_lib.Question, documents: OracleDocuments,
                  top_k: int = 3) -> str:
    """The prompt and a clean response through the last step's document block.

    Every step: the need, " I will search for it.", a good query and its oracle
    block; every step but the last also its fact (as a clean demonstration
    restates it). The model is to write the last fact and the answer.
    """
    text = base_prompt(question.text)
    for index, step in enumerate(question.steps):
        need, query, _ = templates.ATOMS[step.atom]
        text += (templates.OPENINGS[0] if index == 0 else templates.NEXT_STEP).format(
            need=need.format(x=step.subject))
        text += templates.SEARCH_INTROS[0]
        query = query.format(x=step.subject)
        text += f"{BEGIN_QUERY} {query}{END_QUERY}"
        text += documents_block(documents.block_passages(step, query, top_k))
        if index < len(question.steps) - 1:
            text += templates.fact_sentence(step.atom, step.subject, step.value)
    return text


def oracle_documents_text(question: questions_lib.Question, documents: OracleDocuments,
                          top_k: int = 3) -> str:
    """Only the document blocks of `oracle_prefix` (for checks)."""
    return "".join(documents_block(documents.block_passages(
        step, templates.ATOMS[step.atom][1].format(x=step.subject), top_k))
        for step in question.steps)


def closed_book_prefix(question: questions_lib.Question) -> str:
    """The prompt and the no-search opening: the model must answer from memory."""
    return base_prompt(question.text) + CLOSED_BOOK


def greedy_continuations(model: Decoder, tokenizer, prefixes: Sequence[str],
                         eos_ids: Sequence[int], max_new_tokens: int = 64,
                         batch_size: int = 32) -> list[str]:
    """Each prefix's greedy continuation (the real sampler, via probe.sample), cut after
    `</answer>`."""
    ids = [tokenizer(p)["input_ids"] for p in prefixes]
    out = []
    for tokens in probe.sample(model, ids, max_new_tokens, seed=0, eos_ids=eos_ids, greedy=True,
                               batch_size=batch_size):
        text = tokenizer.decode(tokens)
        cut = text.find(ANSWER_END)
        out.append(text if cut < 0 else text[:cut + len(ANSWER_END)])
    return out


def score(continuations: Sequence[str], golds: Sequence[str]) -> list[float]:
    """Token F1 of each continuation's answer (0 when it writes no `<answer>`)."""
    scores = []
    for text, gold in zip(continuations, golds):
        answer = metrics.extract_answer(text)
        scores.append(0.0 if answer is None else metrics.f1_score(answer, gold))
    return scores


def reading_f1(model: Decoder, tokenizer, questions: Sequence[questions_lib.Question],
               documents: OracleDocuments, eos_ids: Sequence[int], top_k: int = 3,
               max_new_tokens: int = 64, batch_size: int = 32) -> tuple[float, list[str]]:
    """Mean F1 with oracle documents in the prefix, and the continuations."""
    texts = greedy_continuations(model, tokenizer,
                                 [oracle_prefix(q, documents, top_k) for q in questions],
                                 eos_ids, max_new_tokens, batch_size)
    scores = score(texts, [q.answer for q in questions])
    return sum(scores) / max(len(scores), 1), texts


def closed_book_f1(model: Decoder, tokenizer, questions: Sequence[questions_lib.Question],
                   eos_ids: Sequence[int], max_new_tokens: int = 48,
                   batch_size: int = 32) -> tuple[float, list[str]]:
    """Mean F1 with no documents (the no-search opening forced), and the continuations."""
    texts = greedy_continuations(model, tokenizer, [closed_book_prefix(q) for q in questions],
                                 eos_ids, max_new_tokens, batch_size)
    scores = score(texts, [q.answer for q in questions])
    return sum(scores) / max(len(scores), 1), texts
