"""The generated world: determinism, disjoint parts, no leakage, answerable questions."""
import collections
import dataclasses
import random
import re

import pytest

from searcher_jax.synthetic import build
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import world as world_lib
from searcher_jax.synthetic import world_files

TINY = world_lib.WorldConfig(num_places=12, num_people=40, num_organisations=12, num_works=20,
                             num_train_questions=60, num_eval_questions=30)
FILES = (world_files.CORPUS_FILE, world_files.TRAIN_FILE, world_files.EVAL_FILE)


def test_same_seed_gives_byte_identical_files(tmp_path):
    world_files.write_world(TINY, tmp_path / "a")
    world_files.write_world(TINY, tmp_path / "b")
    world_files.write_world(dataclasses.replace(TINY, seed=1), tmp_path / "c")
    for name in FILES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first, name
        assert first == (tmp_path / "b" / name).read_bytes(), name
        assert first != (tmp_path / "c" / name).read_bytes(), name


def test_names_are_unique_and_parts_disjoint():
    world = world_files.generate_world(world_lib.WorldConfig())
    train, evaluation = world.train.names(), world.eval.names()
    assert len(set(train)) == len(train) and len(set(evaluation)) == len(evaluation)
    assert not set(train) & set(evaluation)
    # No name hides inside another (the reason an evaluation name cannot leak by accident).
    words = list(train + evaluation + world.countries)
    assert all(len(word.split()) == 1 for word in words)   # one word: one token (names.py)
    joined = " ".join(words)
    assert all(joined.count(word) == 1 for word in words)
    # Relations stay inside a part.
    train_set = set(train)
    for person in world.train.people:
        assert {person.birthplace, person.employer} <= train_set
    for organisation in world.train.organisations:
        assert {organisation.founder, organisation.headquarters} <= train_set
    for work in world.train.works:
        assert {work.creator, work.setting} <= train_set


def test_every_entity_of_both_parts_has_its_passage(world_paths):
    config, _ = build.PRESETS["ci"]
    world = world_files.generate_world(config)
    corpus_titles = {row["title"] for row in world_files.read_jsonl(world_paths.corpus)}
    assert set(world.eval.names()) <= corpus_titles
    assert set(world.train.names()) <= corpus_titles


def test_questions_are_about_their_own_part(world_paths):
    config, _ = build.PRESETS["ci"]
    world = world_files.generate_world(config)
    names = sorted(world.train.names() + world.eval.names(), key=len, reverse=True)
    name_pattern = re.compile("|".join(map(re.escape, names)))
    for path, own, other in ((world_paths.train_questions, world.train, world.eval),
                             (world_paths.eval_questions, world.eval, world.train)):
        for row in world_files.read_jsonl(path):
            mentioned = set(name_pattern.findall(row["question"]))
            assert mentioned and mentioned <= set(own.names()), row
            assert not mentioned & set(other.names()), row


def test_every_answer_is_in_the_corpus(world_paths):
    corpus = "\n".join(row["text"] for row in world_files.read_jsonl(world_paths.corpus))
    rows = world_files.read_jsonl(world_paths.eval_questions)
    for row in rows:
        if row["answer"] not in ("yes", "no"):
            assert row["answer"] in corpus, row


def test_question_kinds_and_steps_follow_the_facts():
    world = world_files.generate_world(TINY)
    facts = questions_lib.Facts(world.eval)
    questions = questions_lib.generate_questions(random.Random(0), world.eval, 60,
                                                 TINY.kind_weights)
    kinds = collections.Counter(question.kind for question in questions)
    assert set(kinds) == {questions_lib.SINGLE, questions_lib.BRIDGE, questions_lib.COMPARISON}
    for question in questions:
        for step in question.steps:
            assert facts.value(step.atom, step.subject) == step.value
        if question.kind == questions_lib.BRIDGE:
            first, second = question.steps
            assert second.subject == first.value and question.answer == second.value
            assert first.value not in question.text   # the bridge entity is never named
        if question.kind == questions_lib.COMPARISON and question.answer_type == "comparison":
            first, second = question.steps
            earlier = first if int(first.value) < int(second.value) else second
            assert question.answer == earlier.subject


def test_too_many_questions_for_a_small_world_says_so():
    world = world_files.generate_world(TINY)
    with pytest.raises(RuntimeError, match="too small"):
        questions_lib.generate_questions(random.Random(0), world.eval, 100_000, (1.0, 0.0, 0.0))
