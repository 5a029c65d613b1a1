"""Demonstrations: the keyword search, each imperfection mode, and their shares."""
import collections
import random
import re

import pytest

from searcher_jax.synthetic import build
from searcher_jax.synthetic import demonstrations as demos_lib
from searcher_jax.synthetic import keyword_search
from searcher_jax.synthetic import passages
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import world as world_lib
from searcher_jax.synthetic import world_files

CONFIG = world_lib.WorldConfig(num_places=12, num_people=40, num_organisations=12,
                               num_works=20, num_train_questions=10, num_eval_questions=10)
_ANSWER = re.compile(r"<answer> (.*) </answer>$")


@pytest.fixture(scope="module")
def writer_and_questions():
    world = world_files.generate_world(CONFIG)
    train_names = set(world.train.names())
    rows = [row for row in passages.corpus_rows(world) if row["title"] in train_names]
    writer = demos_lib.DemoWriter(world, keyword_search.KeywordSearch(rows))
    questions = questions_lib.generate_questions(random.Random(0), world.train, 60,
                                                 CONFIG.kind_weights)
    return world, writer, questions


def test_keyword_search_puts_the_named_entity_first(writer_and_questions):
    world, _, _ = writer_and_questions
    rows = passages.corpus_rows(world)
    search = keyword_search.KeywordSearch(rows)
    for entity in world.train.people[:10]:
        hits = search.search(f"{entity.name} born", 3)
        assert len(hits) == 3 and hits[0].startswith(f"Title: {entity.name} Text: ")
    assert search.search("nothing matches this", 3) == []


def test_clean_demonstrations_search_each_step_and_answer_right(writer_and_questions):
    _, writer, questions = writer_and_questions
    for question in questions:
        text = writer.response(random.Random(0), question, demos_lib.CLEAN)
        queries = re.findall(r"<\|begin_of_query\|> (.*?)<\|end_of_query\|>", text)
        assert len(queries) == len(question.steps)
        for query, step in zip(queries, question.steps):
            assert step.subject in query
        assert _ANSWER.search(text).group(1) == question.answer


def test_one_hop_answers_with_the_value_it_read(writer_and_questions):
    """A premature answer is the first hop's value: after a fact read from the documents the
    answer is always that fact's value (demonstrations.py says why)."""
    _, writer, questions = writer_and_questions
    multi = [q for q in questions if len(q.steps) > 1]
    assert multi
    for question in multi:
        text = writer.response(random.Random(0), question, demos_lib.ONE_HOP)
        assert _ANSWER.search(text).group(1) == question.steps[0].value


def test_imperfect_modes_are_imperfect(writer_and_questions):
    _, writer, questions = writer_and_questions
    for question in questions:
        rng = random.Random(1)
        no_search = writer.response(rng, question, demos_lib.NO_SEARCH)
        assert demos_lib.BEGIN_QUERY not in no_search and _ANSWER.search(no_search)
        wrong = writer.response(rng, question, demos_lib.WRONG_ANSWER)
        assert _ANSWER.search(wrong).group(1) != question.answer
        poor = writer.response(rng, question, demos_lib.POOR_QUERY)
        queries = re.findall(r"<\|begin_of_query\|> (.*?)<\|end_of_query\|>", poor)
        subjects = [step.subject for step in question.steps]
        assert any(not any(subject in query for subject in subjects) for query in queries)


def test_mode_shares_follow_the_config(fresh_rows):
    config, _ = build.PRESETS["ci"]
    modes = collections.Counter(row["mode"] for row in fresh_rows if row["kind"] == "demo")
    assert sum(modes.values()) == 400
    assert abs(modes[demos_lib.RAG] / 400 - config.p_rag) < 0.05, modes
    total = 400 - modes[demos_lib.RAG]   # the other shares split the rest
    for mode, share in ((demos_lib.NO_SEARCH, config.p_no_search),
                        (demos_lib.POOR_QUERY, config.p_poor_query),
                        (demos_lib.WRONG_ANSWER, config.p_wrong_answer)):
        assert abs(modes[mode] / total - share) < 0.05, (mode, modes)


def test_one_hop_demonstrations_stop_after_the_first_search(fresh_rows):
    """Most multi-hop demonstrations that would be clean stop after one hop (p_one_hop), so
    the base model's greedy choice on a bridge is to stop: RL's to find the second hop."""
    config, _ = build.PRESETS["ci"]
    rows = [row for row in fresh_rows if row["kind"] == "demo"]
    one_hop = [row for row in rows if row["mode"] == demos_lib.ONE_HOP]
    multi_clean = [row for row in rows if row["mode"] == demos_lib.CLEAN
                   and row["text"].count("<|begin_of_query|>") > 2]  # the prompt names the tag once
    assert one_hop and all(row["text"].count("<|begin_of_query|>") == 2 for row in one_hop)
    share = len(one_hop) / (len(one_hop) + len(multi_clean))
    assert abs(share - config.p_one_hop) < 0.1, share


def test_rag_demonstrations_read_the_documents_before_the_question(writer_and_questions):
    """Standard RAG's format: the question's documents in the prompt before the question, no
    search in the response; a single-hop question whose passage was found is answered."""
    _, writer, questions = writer_and_questions
    answered = 0
    for question in questions:
        text = writer.rag_demonstration(random.Random(0), question)
        prompt, response = text.split("Assistant: <think>")
        documents = prompt.index("<|begin_of_documents|>")
        assert documents < prompt.index("<|end_of_documents|>") < prompt.index(question.text)
        assert demos_lib.BEGIN_QUERY not in response and "<|begin_of_documents|>" not in response
        step = question.steps[0]
        found = passages.gold_passage(step) in prompt
        if found:
            assert response.startswith(" The documents say that ") and step.value in response
        if found and len(question.steps) == 1:
            assert _ANSWER.search(response).group(1) == question.answer
            answered += 1
    assert answered   # the branch that reads and answers ran
