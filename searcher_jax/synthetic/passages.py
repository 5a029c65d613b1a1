"""Wikipedia-like passages about the world's entities, as corpus rows: one fact each.

Rows have the keys of the real corpora in `reference/corpus/*.corpus.jsonl`
(id, title, text, format) with format "hotpot_abstract": the passage renders as
f"Title: {title} Text: {text}", and the text starts with a space, as the
HotpotQA abstracts do.

Each passage states ONE fact of its entity, in the words the reasoning uses to
restate it (templates.ATOMS), with the value last: " The birthplace of Feda is
Lomar." So reading a retrieved passage is copying the one value that ends it,
which the sub-million-parameter base model learns (a value in the middle of a
several-fact abstract it did not learn to find: README, "The base model"). An
entity has a passage per fact (a person four), all under its name as title.
"""
import random

from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib

PASSAGE_FORMAT = "hotpot_abstract"


def fact_text(atom: str, subject: str, value: str) -> str:
    """The passage text of one fact (leading space, capitalised, full stop)."""
    fact = templates.ATOMS[atom][2].format(x=subject, y=value)
    return f" {fact[0].upper()}{fact[1:]}."


def render_passage(title: str, text: str) -> str:
    """A passage as the retriever returns it for the hotpot_abstract format."""
    return f"Title: {title} Text: {text}"


def gold_passage(step: questions_lib.Step) -> str:
    """The rendered passage a reasoning step reads its fact from."""
    return render_passage(step.subject, fact_text(step.atom, step.subject, step.value))


def part_rows(part: world_lib.Part) -> list[dict]:
    """Every fact passage of a part's entities, entity by entity (no ids)."""
    facts = questions_lib.Facts(part)
    return [dict(title=entity.name, text=fact_text(atom, entity.name,
                                                   facts.value(atom, entity.name)),
                 format=PASSAGE_FORMAT)
            for entity in part.entities() for atom in questions_lib.atoms_of(entity)]


def corpus_rows(world: world_lib.World) -> list[dict]:
    """The passages of both parts, in a seeded shuffle so parts and entities interleave."""
    rows = part_rows(world.train) + part_rows(world.eval)
    random.Random(world.config.seed + 1).shuffle(rows)
    return [dict(id=f"world-{index}", **row) for index, row in enumerate(rows)]
