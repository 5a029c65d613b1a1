"""Wikipedia-like passages about the world's entities, as corpus rows.

Rows have the keys of the real corpora in `reference/corpus/*.corpus.jsonl`
(id, title, text, format) with format "hotpot_abstract": the passage renders as
f"Title: {title} Text: {text}", and the text starts with a space, as the
HotpotQA abstracts do.
"""
import random

from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib

PASSAGE_FORMAT = "hotpot_abstract"


def passage_text(entity) -> str:
    """The abstract of one entity (leading space, two spaces between sentences)."""
    if isinstance(entity, world_lib.Person):
        return templates.PERSON_PASSAGE.format(
            name=entity.name, year=entity.birth_year,
            occupation=templates.with_article(entity.occupation),
            place=entity.birthplace, pronoun=entity.pronoun, employer=entity.employer)
    if isinstance(entity, world_lib.Place):
        return templates.PLACE_PASSAGE.format(
            name=entity.name, kind=templates.with_article(entity.kind), country=entity.country,
            year=entity.founded_year)
    if isinstance(entity, world_lib.Organisation):
        return templates.ORGANISATION_PASSAGE.format(
            name=entity.name, field=templates.with_article(entity.field),
            year=entity.founded_year,
            founder=entity.founder, place=entity.headquarters)
    if isinstance(entity, world_lib.Work):
        return templates.WORK_PASSAGE.format(
            title=entity.name, kind=templates.with_article(entity.kind), year=entity.year,
            creator=entity.creator, place=entity.setting)
    raise TypeError(f"passage_text: not a world entity: {entity!r}")


def render_passage(title: str, text: str) -> str:
    """A passage as the retriever returns it for the hotpot_abstract format."""
    return f"Title: {title} Text: {text}"


def corpus_rows(world: world_lib.World) -> list[dict]:
    """One row per entity of both parts, in a seeded shuffle so the parts interleave."""
    entities = list(world.train.entities() + world.eval.entities())
    random.Random(world.config.seed + 1).shuffle(entities)
    return [dict(id=f"world-{index}", title=entity.name, text=passage_text(entity),
                 format=PASSAGE_FORMAT)
            for index, entity in enumerate(entities)]
