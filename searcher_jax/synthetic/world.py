"""A generated world of fictional people, places, organisations and works.

The world has two parts with disjoint entities: the training part (its
questions are for RL training) and the evaluation part (held-out questions
about entities RL never saw). Both parts' passages are in the retrieval
corpus and in no pretraining text, so every question needs search. Relations
never cross parts:
a training person is born in a training place and works for a training
organisation, so no passage of one part names an entity of the other.
Everything is drawn from one `random.Random(seed)`, so a seed gives the same
world on every machine.
"""
import dataclasses
import random

from searcher_jax.synthetic import names
from searcher_jax.synthetic import templates

# Year ranges (inclusive). Every year the world writes is in YEARS (with room for the
# demonstrations' wrong guesses a few years off), which the synthetic tokenizer holds as one
# token each (synthetic/tokenizer.py), as it holds each name.
PLACE_YEARS = (1500, 1699)   # a place's founding
BIRTH_YEARS = (1700, 1899)
FOUNDED_AGE = (22, 55)       # the founder's age when an organisation is founded
CREATED_AGE = (18, 70)       # the creator's age when a work comes out
YEARS = range(PLACE_YEARS[0] - 10, BIRTH_YEARS[1] + max(FOUNDED_AGE[1], CREATED_AGE[1]) + 11)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and the seed of a world; every count is for the whole world (both parts)."""
    seed: int = 0
    num_countries: int = 6
    num_places: int = 80
    num_people: int = 400
    num_organisations: int = 80
    num_works: int = 200
    eval_fraction: float = 0.25          # share of each entity kind in the evaluation part
    num_train_questions: int = 1000      # RL training questions (training part)
    num_eval_questions: int = 300        # evaluation questions (evaluation part)
    # Passages per document block in the demonstrations (and the demo's rollouts). 1: the
    # sub-million-parameter base model learned to read one passage; blocks of three (the
    # paper's training top-k) it had not learned to read in our tries (README).
    demo_top_k: int = 1
    kind_weights: tuple[float, float, float] = (0.3, 0.4, 0.3)   # single, bridge, comparison
    # Imperfect demonstrations, so RL has something to improve (shares of all demonstrations).
    p_no_search: float = 0.1             # answers from memory, right or wrong
    p_poor_query: float = 0.2            # one query misses the entity; retries or guesses
    # Searches well, then answers wrongly. 0: after a fact read from the documents the base
    # model should answer with it (demonstrations.py), which any wrong answer there blurs.
    p_wrong_answer: float = 0.0
    # Share of demonstrations in standard RAG's format (documents before the question), drawn
    # before the shares above, which split the rest.
    p_rag: float = 0.1
    # Share of the other multi-hop demonstrations that stop after the first hop and answer
    # with its value:
    # over a half, so the base model's greedy choice there is to stop (RL's to find the 2nd hop).
    p_one_hop: float = 0.6

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"WorldConfig.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if min(self.num_places, self.num_people, self.num_organisations, self.num_works) < 8:
            raise ValueError(f"WorldConfig: every entity count must be >= 8 so each part has at "
                             f"least two of each kind, got {self}")
        if not 0.0 <= self.p_one_hop <= 1.0:
            raise ValueError(f"WorldConfig.p_one_hop={self.p_one_hop} must be in [0, 1]")
        if not 0.0 <= self.p_rag <= 1.0:
            raise ValueError(f"WorldConfig.p_rag={self.p_rag} must be in [0, 1]")
        if self.p_no_search + self.p_poor_query + self.p_wrong_answer > 1.0:
            raise ValueError("WorldConfig: p_no_search + p_poor_query + p_wrong_answer > 1")


@dataclasses.dataclass(frozen=True)
class Place:
    name: str
    kind: str
    country: str
    founded_year: int


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    pronoun: str
    birth_year: int
    birthplace: str
    occupation: str
    employer: str


@dataclasses.dataclass(frozen=True)
class Organisation:
    name: str
    field: str
    founded_year: int
    founder: str
    headquarters: str


@dataclasses.dataclass(frozen=True)
class Work:
    name: str
    kind: str
    year: int
    creator: str
    setting: str


@dataclasses.dataclass(frozen=True)
class Part:
    """The entities of one part of the world; relations stay inside the part."""
    places: tuple[Place, ...]
    people: tuple[Person, ...]
    organisations: tuple[Organisation, ...]
    works: tuple[Work, ...]

    def entities(self) -> tuple:
        return self.places + self.people + self.organisations + self.works

    def names(self) -> tuple[str, ...]:
        return tuple(entity.name for entity in self.entities())


@dataclasses.dataclass(frozen=True)
class World:
    config: WorldConfig
    countries: tuple[str, ...]   # attribute values shared by both parts, not entities
    train: Part
    eval: Part


def _split(total: int, eval_fraction: float) -> tuple[int, int]:
    num_eval = max(2, round(total * eval_fraction))
    return total - num_eval, num_eval


def generate_part(rng: random.Random, pool: names.NamePool, countries: tuple[str, ...],
                   num_places: int, num_people: int, num_organisations: int,
                   num_works: int) -> Part:
    places = tuple(
        Place(name=pool.draw(), kind=rng.choice(templates.PLACE_KINDS),
              country=rng.choice(countries), founded_year=rng.randint(*PLACE_YEARS))
        for _ in range(num_places))
    # People's employers are organisations, whose founders are people: draw the people's own
    # attributes first, the organisations next, then give each person an employer.
    people_drafts = [
        dict(name=pool.draw(), pronoun=rng.choice(templates.PRONOUNS),
             birth_year=rng.randint(*BIRTH_YEARS), birthplace=rng.choice(places).name,
             occupation=rng.choice(templates.OCCUPATIONS))
        for _ in range(num_people)]
    organisations = []
    for _ in range(num_organisations):
        founder = rng.choice(people_drafts)
        organisations.append(Organisation(
            name=pool.draw(), field=rng.choice(templates.ORGANISATION_FIELDS),
            founded_year=founder["birth_year"] + rng.randint(*FOUNDED_AGE),
            founder=founder["name"],
            headquarters=rng.choice(places).name))
    people = tuple(Person(**draft, employer=rng.choice(organisations).name)
                   for draft in people_drafts)
    works = []
    for _ in range(num_works):
        creator = rng.choice(people)
        works.append(Work(name=pool.draw(), kind=rng.choice(templates.WORK_KINDS),
                          year=creator.birth_year + rng.randint(*CREATED_AGE),
                          creator=creator.name, setting=rng.choice(places).name))
    return Part(places=places, people=people, organisations=tuple(organisations),
                works=tuple(works))


def generate_world(config: WorldConfig, reserved_text: str = "") -> World:
    """Draws a world; `reserved_text` is extra fixed text (the prompt) names must avoid."""
    rng = random.Random(config.seed)
    pool = names.NamePool(rng, templates.reserved_text() + "\n" + reserved_text)
    countries = tuple(pool.draw() for _ in range(config.num_countries))
    counts = [_split(total, config.eval_fraction) for total in (
        config.num_places, config.num_people, config.num_organisations, config.num_works)]
    train = generate_part(rng, pool, countries, *(train for train, _ in counts))
    eval_part = generate_part(rng, pool, countries, *(num_eval for _, num_eval in counts))
    return World(config=config, countries=countries, train=train, eval=eval_part)
