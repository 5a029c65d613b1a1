"""Search-format demonstrations: the pretraining text that teaches the format.

Each demonstration is a whole trajectory as the rollout would write it: the
base-model prompt of SPEC section 1, reasoning, queries between
`<|begin_of_query|>` and `<|end_of_query|>`, the document block the
environment inserts (exact format of SPEC section 2, from a keyword search
over the training part's passages only), and `</think>` plus an answer.

A share of them (`WorldConfig.p_rag`) is standard RAG instead: the documents
a search with the question finds sit before the question in the prompt
(prompts.rag_question), and the response reads them and answers without
searching, so the base model can also be evaluated as the paper's RAG baseline.

They are deliberately imperfect, so that RL has something to improve: some
answer from memory without searching (right or wrong), some write a query that
misses the entity (then search again or guess), some search well and still
answer wrongly (`p_wrong_answer`, 0 in the presets), and most multi-hop ones stop after
the first hop and answer with what it found (`WorldConfig.p_one_hop`: "Where was the
founder of X born?" answered with the founder), so that a greedy base model does too.
After a fact restated from the documents the answer is always that fact's value, right
or premature, so the model learns to answer with what it read. The model pretrained on
them stands in for a pretrained LLM that already follows the search format; it is not
one.
"""
import random

from searcher_jax.data.prompts import (BEGIN_QUERY, END_QUERY, base_prompt, documents_block,
                                       rag_question)
from searcher_jax.synthetic import keyword_search
from searcher_jax.synthetic import passages as passages_lib
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib

# Which modes a demonstration is written in (see the module docstring).
CLEAN, NO_SEARCH, POOR_QUERY, WRONG_ANSWER, ONE_HOP, RAG = (
    "clean", "no_search", "poor_query", "wrong_answer", "one_hop", "rag")


class DemoWriter:
    """Writes demonstrations for questions about the training part of a world."""

    def __init__(self, world: world_lib.World, search: keyword_search.KeywordSearch):
        self._config = world.config
        self._part = world.train
        self._countries = world.countries
        self._search = search

    def _search_block(self, query: str) -> str:
        passages = self._search.search(query, self._config.demo_top_k)
        return f"{BEGIN_QUERY} {query}{END_QUERY}" + documents_block(passages)

    def _distractor(self, rng: random.Random, question: questions_lib.Question) -> str:
        """A wrong answer of the same kind as the gold one."""
        kind = question.answer_type
        if kind == "year":
            return str(int(question.answer) + rng.choice((-3, -2, -1, 1, 2, 5, 10)))
        if kind == "yes_no":
            return templates.NO if question.answer == templates.YES else templates.YES
        if kind == "comparison":
            first, second = (step.subject for step in question.steps)
            return second if question.answer == first else first
        choices = {
            "place": [place.name for place in self._part.places],
            "person": [person.name for person in self._part.people],
            "organisation": [organisation.name for organisation in self._part.organisations],
            "occupation": list(templates.OCCUPATIONS),
            "country": list(self._countries),
        }[kind]
        return rng.choice([choice for choice in choices if choice != question.answer])

    def _poor_query(self, rng: random.Random, question: questions_lib.Question,
                    step: questions_lib.Step) -> str:
        """A query that misses: an entity the question does not need, or no entity at all."""
        _, query, _ = templates.ATOMS[step.atom]
        needed = {other.subject for other in question.steps}
        if rng.random() < 0.5:
            others = [entity.name for entity in questions_lib.subjects(self._part, step.atom)
                      if entity.name not in needed]
            return query.format(x=rng.choice(others))
        return query.format(x="").strip()

    def rag_demonstration(self, rng: random.Random, question: questions_lib.Question) -> str:
        """Prompt and response of standard RAG: the question's documents before it; the fact
        of the first step read when its passage is among them and given as the answer (a
        multi-hop question's answer is then premature: one search's documents hold one hop);
        no search."""
        passages = self._search.search(question.text, self._config.demo_top_k)
        step = question.steps[0]
        if passages_lib.gold_passage(step) not in passages:
            text = " " + templates.GIVE_UP
            answer = self._distractor(rng, question)
        else:
            text = " " + templates.fact_sentence(step.atom, step.subject, step.value)
            answer = step.value
        return (base_prompt(rag_question(question.text, passages)) + text
                + templates.FINISH.format(answer=answer))

    def response(self, rng: random.Random, question: questions_lib.Question,
                 mode: str) -> str:
        """The text after the prompt's "<think>", through "</answer>"."""
        if mode == NO_SEARCH:
            answer = question.answer if rng.random() < 0.5 else self._distractor(rng, question)
            return (rng.choice(templates.NO_SEARCH).format(answer=answer)
                    + templates.FINISH.format(answer=answer))
        poor_step = rng.randrange(len(question.steps)) if mode == POOR_QUERY else -1
        text = ""
        for index, step in enumerate(question.steps):
            need, query, _ = templates.ATOMS[step.atom]
            need = need.format(x=step.subject)
            text += (rng.choice(templates.OPENINGS) if index == 0
                     else templates.NEXT_STEP).format(need=need)
            text += rng.choice(templates.SEARCH_INTROS)
            if index == poor_step:
                text += self._search_block(self._poor_query(rng, question, step))
                if rng.random() < 0.5:
                    guess = self._distractor(rng, question)
                    return text + templates.GIVE_UP + templates.FINISH.format(answer=guess)
                text += templates.RETRY
            text += self._search_block(query.format(x=step.subject))
            text += templates.fact_sentence(step.atom, step.subject, step.value)
            if mode == ONE_HOP:
                return text + templates.FINISH.format(answer=step.value)
        answer = (self._distractor(rng, question) if mode == WRONG_ANSWER
                  else question.answer)
        if question.verdicts:
            text += templates.SO.format(conclusion=question.verdict(answer))
        return text + templates.FINISH.format(answer=answer)

    def demonstration(self, rng: random.Random,
                      question: questions_lib.Question) -> tuple[str, str]:
        """(mode, prompt and response of one trajectory), the mode drawn by the config's shares."""
        config = self._config
        draw = rng.random()
        if draw < config.p_rag:
            return RAG, self.rag_demonstration(rng, question)
        draw = rng.random()
        if draw < config.p_no_search:
            mode = NO_SEARCH
        elif draw < config.p_no_search + config.p_poor_query:
            mode = POOR_QUERY
        elif draw < config.p_no_search + config.p_poor_query + config.p_wrong_answer:
            mode = WRONG_ANSWER
        else:
            mode = CLEAN
        if mode == CLEAN and len(question.steps) > 1 and rng.random() < config.p_one_hop:
            mode = ONE_HOP
        return mode, base_prompt(question.text) + self.response(rng, question, mode)
