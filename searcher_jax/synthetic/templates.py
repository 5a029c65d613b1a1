"""Every fixed English string the synthetic world writes.

Kept in one module so `reserved_text()` can hand the whole vocabulary of the
templates to the name pool, which then never draws a name hidden inside it.
"""

OCCUPATIONS = ("painter", "poet", "engineer", "composer", "physician", "architect",
               "historian", "sculptor", "chemist", "novelist", "astronomer", "weaver")
PLACE_KINDS = ("town", "city", "village", "port")
ORGANISATION_KINDS = ("Guild", "Institute", "Company", "Society", "Academy", "Press")
ORGANISATION_FIELDS = ("shipbuilding", "publishing", "medical", "scientific", "textile",
                       "mining", "musical", "banking")
WORK_KINDS = ("novel", "film", "opera", "painting", "album", "poem")
PRONOUNS = ("He", "She")

# Passages, in the HotpotQA abstract style (a leading space, two spaces between sentences).
# {occupation}, {kind} and {field} arrive with their article ("an engineer").
PERSON_PASSAGE = (" {name} was born in {year}.  {pronoun} is {occupation} from {place}.  "
                  "{pronoun} worked for {employer}.")
PLACE_PASSAGE = " {name} is {kind} in {country}.  It dates from {year}."
ORGANISATION_PASSAGE = (" {name} is {field} organisation founded in {year} by {founder}.  "
                        "Its headquarters are at {place}.")
WORK_PASSAGE = " {title} is {kind} by {creator} that came out in {year}.  It takes place at {place}."

# One fact read from one passage: (what the reasoning needs, the query's keywords, the fact
# as the reasoning restates it). {x} is the entity searched for, {y} the value found.
ATOMS = {
    "birth_year": ("the birth year of {x}", "{x} born", "{x} was born in {y}"),
    "birthplace": ("the birthplace of {x}", "{x} birthplace", "{x} is from {y}"),
    "occupation": ("the occupation of {x}", "{x} occupation", "{x} is {y}"),
    "employer": ("the employer of {x}", "{x} employer", "{x} worked for {y}"),
    "founder": ("the founder of {x}", "{x} founder", "{x} was founded by {y}"),
    "founded_year": ("the founding year of {x}", "{x} founded year", "{x} was founded in {y}"),
    "headquarters": ("the headquarters of {x}", "{x} headquarters",
                     "the headquarters of {x} are at {y}"),
    "creator": ("the creator of {x}", "{x} creator", "{x} was created by {y}"),
    "work_year": ("the year of {x}", "{x} year", "{x} came out in {y}"),
    "country": ("the country of {x}", "{x} country", "{x} is in {y}"),
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
FACT = "{fact}."
SO = " So {conclusion}."
FINISH = " </think>\n\n<answer> {answer} </answer>"


def with_article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def fact_sentence(atom: str, subject: str, value: str) -> str:
    """A fact as the reasoning restates it after reading it: the words before the value
    are the passage's own (PERSON_PASSAGE etc.), so reading it is copying."""
    value = with_article(value) if atom == "occupation" else value
    fact = ATOMS[atom][2].format(x=subject, y=value)
    return FACT.format(fact=fact[0].upper() + fact[1:])


def reserved_text() -> str:
    """All template text joined; no generated name may occur inside it."""
    texts = [
        *OCCUPATIONS, *PLACE_KINDS, *ORGANISATION_KINDS, *ORGANISATION_FIELDS, *WORK_KINDS,
        *PRONOUNS, PERSON_PASSAGE, PLACE_PASSAGE, ORGANISATION_PASSAGE, WORK_PASSAGE,
        *(text for atom in ATOMS.values() for text in atom), *SINGLE_HOP.values(),
        *(spec[0] for spec in BRIDGE.values()),
        *(spec[0] for spec in COMPARISON.values()), *(spec[2] for spec in COMPARISON.values()),
        SAME_OCCUPATION, SAME, DIFFERENT, YES, NO, *OPENINGS, NEXT_STEP, *SEARCH_INTROS,
        *NO_SEARCH, RETRY, GIVE_UP, FACT, SO, FINISH,
    ]
    return "\n".join(texts)
