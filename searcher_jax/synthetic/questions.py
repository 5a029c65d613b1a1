"""Questions of the paper's kinds about one part of the world, with gold answers.

single-hop: one fact of one entity ("When was X born?").
bridge: two hops through an entity ("Where was the founder of O born?").
comparison: one fact of each of two entities ("Who was born first, A or B?").
Each question keeps its reasoning steps (which fact of which entity), which
the demonstrations render as searches.
"""
import dataclasses
import random

from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world as world_lib

SINGLE, BRIDGE, COMPARISON = "single", "bridge", "comparison"
_MAX_MISSES_IN_A_ROW = 2000


@dataclasses.dataclass(frozen=True)
class Step:
    """One fact read from one passage: `atom` of `subject` is `value`."""
    atom: str
    subject: str
    value: str


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str                      # SINGLE, BRIDGE or COMPARISON
    text: str
    answer: str
    steps: tuple[Step, ...]
    answer_type: str               # what the answer is: "person", "year", ..., "yes_no"
    # A comparison's closing sentence for each answer it could give (a wrong answer too);
    # empty for the other kinds.
    verdicts: tuple[tuple[str, str], ...] = ()

    def verdict(self, answer: str) -> str:
        return dict(self.verdicts)[answer]


class Facts:
    """Looks up the facts of one part by entity name."""

    def __init__(self, part: world_lib.Part):
        self.part = part
        self._by_name = {entity.name: entity for entity in part.entities()}

    def value(self, atom: str, subject: str) -> str:
        entity = self._by_name[subject]
        if atom == "birth_year":
            return str(entity.birth_year)
        if atom == "founded_year":
            return str(entity.founded_year)
        if atom == "work_year":
            return str(entity.year)
        if atom == "country":
            return entity.country
        return getattr(entity, atom)   # birthplace, occupation, employer, founder, creator, ...

    def step(self, atom: str, subject: str) -> Step:
        return Step(atom=atom, subject=subject, value=self.value(atom, subject))


# What kind of thing each atom's value is (for wrong answers of the same kind).
ANSWER_TYPES = {
    "birth_year": "year", "founded_year": "year", "work_year": "year",
    "birthplace": "place", "headquarters": "place", "occupation": "occupation",
    "employer": "organisation", "founder": "person", "creator": "person", "country": "country",
}
# Which entities an atom is asked about.
_SUBJECTS = {
    "birth_year": "people", "birthplace": "people", "occupation": "people", "employer": "people",
    "founder": "organisations", "founded_year": "organisations", "headquarters": "organisations",
    "creator": "works", "work_year": "works", "country": "places",
}


_KINDS = {"people": world_lib.Person, "organisations": world_lib.Organisation,
          "works": world_lib.Work, "places": world_lib.Place}


def atoms_of(entity) -> list[str]:
    """The atoms (facts) an entity has, in templates.ATOMS order."""
    return [atom for atom in templates.ATOMS
            if isinstance(entity, _KINDS[_SUBJECTS[atom]])]


def subjects(part: world_lib.Part, atom: str) -> tuple:
    """The entities of `part` that `atom` is a fact of."""
    return getattr(part, _SUBJECTS[atom])


def _single_hop(rng: random.Random, facts: Facts) -> Question:
    atom, text = rng.choice(sorted(templates.SINGLE_HOP.items()))
    subject = rng.choice(subjects(facts.part, atom)).name
    step = facts.step(atom, subject)
    return Question(kind=SINGLE, text=text.format(a=subject), answer=step.value, steps=(step,),
                    answer_type=ANSWER_TYPES[atom])


def _bridge(rng: random.Random, facts: Facts) -> Question:
    text, first_atom, second_atom = templates.BRIDGE[rng.choice(sorted(templates.BRIDGE))]
    subject = rng.choice(subjects(facts.part, first_atom)).name
    first = facts.step(first_atom, subject)
    second = facts.step(second_atom, first.value)
    return Question(kind=BRIDGE, text=text.format(a=subject), answer=second.value,
                    steps=(first, second), answer_type=ANSWER_TYPES[second_atom])


def _comparison(rng: random.Random, facts: Facts) -> Question | None:
    """Two entities compared; None when the draw is a tie (the caller draws again)."""
    names = sorted(templates.COMPARISON) + ["same_occupation"]
    name = rng.choice(names)
    atom = "occupation" if name == "same_occupation" else templates.COMPARISON[name][1]
    first, second = (entity.name for entity in rng.sample(subjects(facts.part, atom), 2))
    steps = (facts.step(atom, first), facts.step(atom, second))
    if name == "same_occupation":
        same = steps[0].value == steps[1].value
        return Question(kind=COMPARISON,
                        text=templates.SAME_OCCUPATION.format(a=first, b=second),
                        answer=templates.YES if same else templates.NO, steps=steps,
                        answer_type="yes_no",
                        verdicts=((templates.YES, templates.SAME),
                                  (templates.NO, templates.DIFFERENT)))
    text, _, conclusion = templates.COMPARISON[name]
    if steps[0].value == steps[1].value:
        return None
    earlier = first if int(steps[0].value) < int(steps[1].value) else second
    return Question(kind=COMPARISON, text=text.format(a=first, b=second), answer=earlier,
                    steps=steps, answer_type="comparison",
                    verdicts=tuple((name, conclusion.format(a=name)) for name in (first, second)))


def generate_questions(rng: random.Random, part: world_lib.Part, count: int,
                       kind_weights: tuple[float, float, float]) -> list[Question]:
    """`count` distinct questions about `part`."""
    facts = Facts(part)
    makers = (_single_hop, _bridge, _comparison)
    seen = set()
    questions = []
    misses = 0   # draws in a row that gave no new question
    while len(questions) < count:
        question = rng.choices(makers, weights=kind_weights)[0](rng, facts)
        if question is None or question.text in seen:
            misses += 1
            if misses > _MAX_MISSES_IN_A_ROW:
                raise RuntimeError(
                    f"generate_questions: found only {len(questions)} distinct questions of "
                    f"{count} asked for; the world part is too small for that many")
            continue
        misses = 0
        seen.add(question.text)
        questions.append(question)
    return questions


def question_rows(questions: list[Question]) -> list[dict]:
    """Rows with the keys of `reference/r1searcher/eval_set/*.jsonl` (idx from 1)."""
    return [dict(idx=index, question=question.text, answer=question.answer, gen_text_store="")
            for index, question in enumerate(questions, start=1)]
