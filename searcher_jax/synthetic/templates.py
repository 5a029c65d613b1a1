"""Every fixed English string the synthetic world writes.

Kept in one module so `reserved_text()` can hand the whole vocabulary of the
templates to the name pool, which then never draws a name hidden inside it.
"""

OCCUPATIONS = ("painter", "poet", "engineer", "composer", "physician", "architect",
               "historian", "sculptor", "chemist", "novelist", "astronomer", "weaver")
PLACE_KINDS = ("town", "city", "village", "port")
ORGANISATION_FIELDS = ("shipbuilding", "publishing", "medical", "scientific", "textile",
                       "mining", "musical", "banking")
WORK_KINDS = ("novel", "film", "opera", "painting", "album", "poem")
PRONOUNS = ("He", "She")

# One fact read from one passage: (what the reasoning needs, the query's keywords, the fact
# with its value last). {x} is the entity searched for, {y} the value found. The fact is both
# a passage's text (synthetic/passages.py) and how the reasoning restates it after reading,
# so reading is copying the value that ends the passage; each query keyword is in its
# passage, so a good query finds it.
ATOMS = {
    "birth_year": ("the birth year of {x}", "{x} born", "{x} was born in {y}"),
    "birthplace": ("the birthplace of {x}", "{x} birthplace", "the birthplace of {x} is {y}"),
    "occupation": ("the occupation of {x}", "{x} occupation", "the occupation of {x} is {y}"),
    "employer": ("the employer of {x}", "{x} employer", "the employer of {x} is {y}"),
    "founder": ("the founder of {x}", "{x} founder", "the founder of {x} is {y}"),
    "founded_year": ("the founding year of {x}", "{x} founded year",
                     "{x} was founded in the year {y}"),
    "headquarters": ("the headquarters of {x}", "{x} headquarters",
                     "the headquarters of {x} are at {y}"),
    "creator": ("the creator of {x}", "{x} creator", "the creator of {x} is {y}"),
    "work_year": ("the year of {x}", "{x} year", "{x} came out in the year {y}"),
    "country": ("the country of {x}", "{x} country", "the country of {x} is {y}"),
}

# Questions by kind; {a} and {b} are the entities asked about.
SINGLE_HOP = {
    "birth_year": "When was {a} born?",
    "birthplace": "Where was {a} born?",
    "occupation": "What is the occupation of {a}?",
    "founder": "Who founded {a}?",
    "founded_year": "In which year was {a} founded?",
    "creator": "Who created {a}?",
    "country": "In which country is {a}?",
}
BRIDGE = {  # (question, first atom, second atom)
    "founder_birthplace": ("Where was the founder of {a} born?", "founder", "birthplace"),
    "creator_birth_year": ("When was the creator of {a} born?", "creator", "birth_year"),
    "person_country": ("In which country was {a} born?", "birthplace", "country"),
    "employer_founder": ("Who founded the organisation that {a} worked for?",
                         "employer", "founder"),
    "headquarters_country": ("In which country are the headquarters of {a}?",
                             "headquarters", "country"),
}
COMPARISON = {  # (question, atom compared, conclusion naming the earlier one as {a})
    "born_first": ("Who was born first, {a} or {b}?", "birth_year", "{a} was born first"),
    "founded_first": ("Which organisation was founded first, {a} or {b}?", "founded_year",
                      "{a} was founded first"),
    "came_out_first": ("Which work came out first, {a} or {b}?", "work_year",
                       "{a} came out first"),
}
SAME_OCCUPATION = "Do {a} and {b} have the same occupation?"
SAME = "they have the same occupation"
DIFFERENT = "they have different occupations"
YES, NO = "yes", "no"

# Demonstrations.
OPENINGS = (" To answer this question, I need {need}.", " I need to find {need}.",
            " Let me think step by step. First I need {need}.")
NEXT_STEP = " Next I need {need}."
SEARCH_INTROS = (" I will search for it.\n\n", " Let me search.\n\n", "\n\n", " ")
NO_SEARCH = (" I think I know this without searching. The answer is {answer}.",
             " This is well known: the answer is {answer}.")
RETRY = "The documents do not mention it. Let me search again with better keywords.\n\n"
GIVE_UP = "The documents do not mention it. I will guess."
# After a document block: "The documents" then " say that" (a fact) or " do not mention it"
# (RETRY, GIVE_UP). A fact starting the line with a bare name would make the name a
# different token from the " Name" the passage holds (synthetic/tokenizer.py).
FACT = "The documents say that {fact}."
SO = " So {conclusion}."
FINISH = " </think>\n\n<answer> {answer} </answer>"


def fact_sentence(atom: str, subject: str, value: str) -> str:
    """A fact as the reasoning restates it after reading it: in the passage's own words, so
    reading it is copying (synthetic/passages.py)."""
    return FACT.format(fact=ATOMS[atom][2].format(x=subject, y=value))


def reserved_text() -> str:
    """All template text joined; no generated name may occur inside it."""
    texts = [
        *OCCUPATIONS, *PLACE_KINDS, *ORGANISATION_FIELDS, *WORK_KINDS,
        *PRONOUNS, *(text for atom in ATOMS.values() for text in atom), *SINGLE_HOP.values(),
        *(spec[0] for spec in BRIDGE.values()),
        *(spec[0] for spec in COMPARISON.values()), *(spec[2] for spec in COMPARISON.values()),
        SAME_OCCUPATION, SAME, DIFFERENT, YES, NO, *OPENINGS, NEXT_STEP, *SEARCH_INTROS,
        *NO_SEARCH, RETRY, GIVE_UP, FACT, SO, FINISH,
    ]
    return "\n".join(texts)
