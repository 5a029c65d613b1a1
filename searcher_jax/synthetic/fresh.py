"""Pretraining text about fresh entities, so that the base model learns to read.

A model pretrained on demonstrations about the world's own training entities
can lower its loss at a fact's value by remembering it (the entity's passage
is pretraining text too) instead of copying it from the inserted documents;
on unseen evaluation entities it then has nothing to fall back on (the `ci`
preset of FORMAT_VERSION 3: reading F1 0.000 with oracle documents). Here
every few texts draw a new small world part (names, facts, passages) used
nowhere else, so the only way to predict a value is to copy it from the
document block before it:

    demonstrations  the whole search format (demonstrations.py), imperfect by the
                    world config's mode shares, about fresh entities;
    drills          the reading part alone, several times per text: a need, a good
                    query, its document block (the gold passage and the search's next
                    hits, `top_k` in all, the gold first as a keyword search puts it)
                    and the fact restated in the passage's own words;
    short drills    drills of one lookup and its answer (about 100 tokens), the rows of
                    pretraining's first phase (synthetic/pretrain.py).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY, documents_block
from searcher_jax.synthetic import demonstrations
from searcher_jax.synthetic import keyword_search
from searcher_jax.synthetic import names
from searcher_jax.synthetic import passages as passages_lib
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib

DRILL = "drill"
SHORT_DRILL = "short_drill"
_PART_SIZES = dict(num_places=8, num_people=16, num_organisations=8, num_works=8)
_NUM_COUNTRIES = 4


@dataclasses.dataclass(frozen=True)
class FreshPart:
    """One small part of a fresh world with its corpus rows and a keyword search over them."""
    part: world_lib.Part
    countries: tuple[str, ...]
    rows: tuple[dict, ...]
    search: keyword_search.KeywordSearch


def fresh_part(rng: random.Random, reserved_text: str) -> FreshPart:
    """A newly drawn part (8 places, 16 people, 8 organisations, 8 works, 4 countries);
    reserved_text: world_files.reserved_text(), which the templates' text joins here."""
    pool = names.NamePool(rng, templates.reserved_text() + "\n" + reserved_text)
    countries = tuple(pool.draw() for _ in range(_NUM_COUNTRIES))
    part = world_lib.generate_part(rng, pool, countries, **_PART_SIZES)
    rows = tuple(dict(id=str(index), **row)
                 for index, row in enumerate(passages_lib.part_rows(part)))
    return FreshPart(part=part, countries=countries, rows=rows,
                     search=keyword_search.KeywordSearch(list(rows)))


def reading_drill(rng: random.Random, fresh: FreshPart, lookups: int, top_k: int,
                  answer: bool = False) -> str:
    """`lookups` reading steps about random entities of `fresh`, as a clean demonstration
    writes each step (need, query, document block, fact); with `answer`, the last fact's
    value as the answer after them (templates.FINISH), as a demonstration ends."""
    facts = questions_lib.Facts(fresh.part)
    text = ""
    for _ in range(lookups):
        atom = rng.choice(sorted(templates.ATOMS))
        subject = rng.choice(questions_lib.subjects(fresh.part, atom)).name
        need, query, _ = templates.ATOMS[atom]
        query = query.format(x=subject)
        step = facts.step(atom, subject)
        gold = passages_lib.gold_passage(step)
        others = [p for p in fresh.search.search(query, top_k + 1) if p != gold]
        text += rng.choice(templates.OPENINGS).format(need=need.format(x=subject))
        text += rng.choice(templates.SEARCH_INTROS)
        text += f"{BEGIN_QUERY} {query}{END_QUERY}" + documents_block([gold] + others[:top_k - 1])
        text += templates.fact_sentence(atom, subject, step.value)
    return text + templates.FINISH.format(answer=step.value) if answer else text


def fresh_texts(config: world_lib.WorldConfig, reserved_text: str, num_demos: int,
                num_drills: int, lookups: int, texts_per_part: int,
                seed: int, num_short_drills: int = 0) -> Iterator[dict]:
    """Rows {kind, text, mode} (kind "demo", DRILL or SHORT_DRILL): demonstrations in
    `config`'s mode shares and search depth (`demo_top_k`), then drills of `lookups` lookups,
    then single-lookup drills; a new part every `texts_per_part` texts. A pure function of its
    arguments.

    The draws are not a world's (whose generator is seeded by an int): a name may still
    coincide with a world's by chance, but its facts are drawn anew, so no passage of a
    world is pretraining text."""
    rng = random.Random(f"fresh:{seed}")
    fresh = None
    for index in range(num_demos + num_drills + num_short_drills):
        if index % texts_per_part == 0:
            fresh = fresh_part(rng, reserved_text)
        if index < num_demos:
            question = questions_lib.generate_questions(rng, fresh.part, 1,
                                                        config.kind_weights)[0]
            world = world_lib.World(config=config, countries=fresh.countries, train=fresh.part,
                                    eval=fresh.part)
            writer = demonstrations.DemoWriter(world, fresh.search)
            mode, text = writer.demonstration(rng, question)
            yield dict(kind="demo", text=text, mode=mode)
        elif index < num_demos + num_drills:
            yield dict(kind=DRILL, text=reading_drill(rng, fresh, lookups, config.demo_top_k),
                       mode=DRILL)
        else:
            yield dict(kind=SHORT_DRILL, mode=SHORT_DRILL,
                       text=reading_drill(rng, fresh, 1, config.demo_top_k, answer=True))
