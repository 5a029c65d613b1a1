"""launch/ask.py's parts: the prompt loop and the retriever that shows each search."""
import io
import sys

from searcher_jax.retrieval.passage import Passage
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "launch"))
import ask  # noqa: E402  pylint: disable=wrong-import-position


def test_the_prompt_reads_questions_until_quit_or_the_end():
    out = io.StringIO()
    assert list(ask.questions_from(["Who?\n", "  \n", " Where? \n", "quit\n", "never\n"],
                                   out)) == ["Who?", "Where?"]
    assert out.getvalue() == ask.PROMPT * 4
    assert list(ask.questions_from(["When?\n"], io.StringIO())) == ["When?"]   # end of input
    asked = []
    assert ask.answer_all(["a", "b"], asked.append) == 2 and asked == ["a", "b"]


def test_each_search_and_its_documents_are_shown_when_they_happen():
    class Lookup:
        def search(self, queries, k):
            return [[Passage("1", "Paris", " a city.", "hotpot_abstract")] if q == "paris" else []
                    for q in queries]

    out = io.StringIO()
    found = ask.ShowingRetriever(Lookup(), out).search(["paris", "nothing"], 3)
    assert [len(f) for f in found] == [1, 0]
    assert out.getvalue() == ("  search: paris\n    (1)Title: Paris Text:  a city.\n"
                              "  search: nothing\n    None\n")
