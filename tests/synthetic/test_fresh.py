"""Fresh-entity pretraining text: reading cannot be memorised, and drills are clean steps."""
import random
import re

from searcher_jax.data.prompts import BEGIN_DOCUMENTS, BEGIN_QUERY
from searcher_jax.synthetic import build, fresh, templates, world_files


def _reserved():
    return world_files.reserved_text()


def test_each_drill_step_restates_a_fact_of_its_gold_passage():
    rng = random.Random(0)
    part = fresh.fresh_part(rng, _reserved())
    text = fresh.reading_drill(rng, part, lookups=3, top_k=2)
    assert text.count(BEGIN_QUERY) == 3 and text.count(BEGIN_DOCUMENTS) == 3
    rows = {(row["title"], row["text"]) for row in part.rows}
    steps = re.findall(r"<\|begin_of_query\|> (.*?)<\|end_of_query\|>.*?"
                       r"\(1\)Title: (.*?) Text: ([^\n]*)\n.*?<\|end_of_documents\|>\n\n"
                       r"The documents say that (.*?\.)", text, flags=re.S)
    assert len(steps) == 3
    for query, first_title, passage, fact in steps:
        assert query.startswith(first_title)   # the gold passage comes first
        assert (first_title, passage) in rows
        # The fact restated is the passage's one sentence, its value last.
        assert passage == f" {fact[0].upper()}{fact[1:]}"


def test_short_drills_end_with_the_value_they_read_as_the_answer():
    config, _ = build.PRESETS["ci"]
    rows = list(fresh.fresh_texts(config, _reserved(), num_demos=0, num_drills=0, lookups=2,
                                  texts_per_part=8, seed=0, num_short_drills=12))
    assert [row["kind"] for row in rows] == [fresh.SHORT_DRILL] * 12
    for row in rows:
        assert row["text"].count(BEGIN_QUERY) == 1
        value = re.search(r" (\S+)\.\n<\|end_of_documents\|>", row["text"]).group(1)
        assert row["text"].endswith(f". </think>\n\n<answer> {value} </answer>")


def test_fresh_texts_draw_new_names_and_follow_the_modes():
    config, _ = build.PRESETS["ci"]
    rows = list(fresh.fresh_texts(config, _reserved(), num_demos=40, num_drills=8, lookups=2,
                                  texts_per_part=8, seed=0))
    assert [row["kind"] for row in rows] == ["demo"] * 40 + [fresh.DRILL] * 8
    texts = "\n".join(row["text"] for row in rows)
    corpus = world_files.build_world_texts(config).corpus
    assert not [row["text"] for row in corpus if row["text"] in texts]   # no world passage
    assert {row["mode"] for row in rows[:40]} >= {"clean", "one_hop"}
    again = list(fresh.fresh_texts(config, _reserved(), num_demos=40, num_drills=8, lookups=2,
                                   texts_per_part=8, seed=0))
    assert again == rows
