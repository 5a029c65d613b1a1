"""Fictional names built from syllables, each word unique and substring-free.

Every distinctive word the world uses (a person's given and family name, a
place, the first word of an organisation, a work's title, a country) comes
from one `NamePool`. A word is accepted only if it is not a substring of any
accepted word or of the reserved text (every fixed English string the world's
templates write), and no accepted word is a substring of it. So a text built
from template text and some set of pool words cannot contain another pool
word, which is what keeps evaluation names out of the pretraining text.
"""
import random
import re

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "gr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ia")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "nd", "x")   # only ends a word

_MIN_WORD_CHARS = 5
_MAX_WORD_CHARS = 11
_MAX_TRIES_PER_WORD = 1000


def random_word(rng: random.Random) -> str:
    """A lowercase word of 2 or 3 syllables, no checks."""
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS)
                        for _ in range(rng.choice((2, 2, 3))))
    return syllables + rng.choice(_CODAS)


def redraw_words(texts: list[str], words: set[str], rng: random.Random) -> list[str]:
    """`texts` with every whole-word occurrence of `words` replaced by a fresh random word.

    A tokenizer trained on the result learns syllables rather than this world's names,
    so a name it never saw tokenizes like one it saw.
    """
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(words))) + r")\b")
    return [pattern.sub(lambda _: random_word(rng).capitalize(), text) for text in texts]


def _substrings(word: str) -> set[str]:
    return {word[i:j] for i in range(len(word)) for j in range(i + 1, len(word) + 1)}


class NamePool:
    """Draws unique capitalised words; no word contains another or reserved text."""

    def __init__(self, rng: random.Random, reserved_text: str):
        self._rng = rng
        self._reserved = reserved_text.lower()
        self._words: set[str] = set()          # lowercase accepted words
        self._inside_words: set[str] = set()   # every substring of an accepted word


    def _acceptable(self, word: str) -> bool:
        if not _MIN_WORD_CHARS <= len(word) <= _MAX_WORD_CHARS:
            return False
        if word in self._inside_words or word in self._reserved:
            return False
        return not any(part in self._words for part in _substrings(word))

    def draw(self) -> str:
        for _ in range(_MAX_TRIES_PER_WORD):
            word = random_word(self._rng)
            if self._acceptable(word):
                self._words.add(word)
                self._inside_words |= _substrings(word)
                return word.capitalize()
        raise RuntimeError(f"NamePool: no new word after {_MAX_TRIES_PER_WORD} tries with "
                           f"{len(self._words)} words drawn; ask for a smaller world")
