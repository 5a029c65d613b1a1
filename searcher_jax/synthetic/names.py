"""Fictional names: one word each, drawn from a fixed lexicon of made-up words.

Every distinctive word the world uses (a person, a place, an organisation, a
work, a country) is one word of `LEXICON`. The lexicon is fixed (seeded by a
string, so it is the same on every machine and for every world) because the
synthetic tokenizer holds each of its words as ONE token: a model of about a
million parameters copies a one-token value out of a retrieved passage
reliably, while names of three to six syllable tokens it copied into drift
(reading F1 0.08 with the gold passage in context; README, "The base model").
A world draws its names from the lexicon without replacement.

No lexicon word is a substring of another or of the templates' text, so a
text built from template text and some lexicon words contains no other
lexicon word: that keeps one part's names out of another part's passages and
makes every name an exact keyword for search.
"""
import random

from searcher_jax.synthetic import templates

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "gr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ia")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "nd", "x")   # only ends a word

LEXICON_SIZE = 1600   # over the largest preset's 766 names plus a fresh part's 44
_MIN_WORD_CHARS = 4
_MAX_WORD_CHARS = 9


def _random_word(rng: random.Random) -> str:
    """A lowercase word of two syllables and an optional coda."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + \
        rng.choice(_CODAS)


def _substrings(word: str) -> set[str]:
    return {word[i:j] for i in range(len(word)) for j in range(i + 1, len(word) + 1)}


def _make_lexicon(size: int) -> tuple[str, ...]:
    rng = random.Random("searcher_jax synthetic lexicon")
    reserved = templates.reserved_text().lower()
    words: list[str] = []
    accepted: set[str] = set()
    inside: set[str] = set()         # every substring of an accepted word
    while len(words) < size:
        word = _random_word(rng)
        if (not _MIN_WORD_CHARS <= len(word) <= _MAX_WORD_CHARS or word in inside
                or word in reserved or _substrings(word) & accepted):
            continue
        accepted.add(word)
        inside |= _substrings(word)
        words.append(word.capitalize())
    return tuple(words)


LEXICON: tuple[str, ...] = _make_lexicon(LEXICON_SIZE)


class NamePool:
    """Draws lexicon words without replacement, skipping any inside `reserved_text`.

    The order is a shuffle by `rng`, so a world's seed decides its names.
    """

    def __init__(self, rng: random.Random, reserved_text: str = ""):
        reserved = reserved_text.lower()
        self._words = [word for word in rng.sample(LEXICON, len(LEXICON))
                       if word.lower() not in reserved]
        self._next = 0

    def draw(self) -> str:
        if self._next == len(self._words):
            raise RuntimeError(f"NamePool: all {len(self._words)} usable lexicon words are "
                               f"drawn (names.LEXICON_SIZE={LEXICON_SIZE}); ask for a smaller "
                               "world")
        self._next += 1
        return self._words[self._next - 1]
