"""The world's files read like the real data (../shared/reference)."""
import json
import re

from searcher_jax.data import prompts
from searcher_jax.synthetic import demonstrations
from searcher_jax.synthetic import passages
from searcher_jax.synthetic import world_files

# A query, then the block the environment inserts: every passage "(i)Title: X Text: Y", or
# "None" when nothing matched.
_SEARCH = re.compile(r"<\|begin_of_query\|>[^\n<]+<\|end_of_query\|>\n\n<\|begin_of_documents\|>\n"
                     r"(?:(?:\(\d\)Title: [^\n]+ Text: [^\n]+\n)+|None)<\|end_of_documents\|>\n\n")


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _schema(rows):
    return {tuple((key, type(value).__name__) for key, value in row.items()) for row in rows}


def test_question_files_match_the_real_eval_sets(world_paths, reference_dir):
    real_paths = sorted((reference_dir / "r1searcher" / "eval_set").glob("*.jsonl"))
    assert len(real_paths) == 4
    real_schemas = set().union(*(_schema(_rows(path)) for path in real_paths))
    assert len(real_schemas) == 1
    for path in (world_paths.train_questions, world_paths.eval_questions):
        rows = _rows(path)
        assert rows and _schema(rows) == real_schemas
        assert [row["idx"] for row in rows] == list(range(1, len(rows) + 1))
        assert all(row["question"].endswith("?") and row["answer"].strip() for row in rows)
    real = _rows(real_paths[0])
    assert [row["idx"] for row in real] == list(range(1, len(real) + 1))


def test_corpus_matches_the_real_hotpot_abstracts(world_paths, reference_dir):
    real = _rows(reference_dir / "corpus" / "hotpotqa_qwen.corpus.jsonl")
    real_abstracts = [row for row in real if row["format"] == "hotpot_abstract"]
    ours = _rows(world_paths.corpus)
    assert _schema(ours) == _schema(real_abstracts)
    assert {row["format"] for row in ours} == {"hotpot_abstract"}
    assert len({row["id"] for row in ours}) == len(ours)
    # Real abstracts start with one space; ours too (a renderer must not strip it).
    assert all(row["text"].startswith(" ") and not row["text"].startswith("  ")
               for row in ours)
    assert sum(row["text"].startswith(" ") for row in real_abstracts) > len(real_abstracts) / 2
    # The abstracts TSV renders "Title: X Text: Y"; so does the world's retriever format.
    sample = (reference_dir / "r1searcher" / "corpus_samples" /
              "train_np_title_abs_sample_100.tsv").read_text(encoding="utf-8-sig")
    line = sample.splitlines()[1].split("\t", 1)[1]
    title, text = re.fullmatch(r"Title: (.*?) Text: (.*)", line).groups()
    assert f"Title: {title} Text: {text}" == line
    row = ours[0]
    assert re.fullmatch(r"Title: (.*?) Text: (.*)", passages.render_passage(
        row["title"], row["text"])).groups() == (row["title"], row["text"])


def test_demonstration_blocks_read_like_the_released_traces(fresh_rows, reference_dir):
    real = _rows(reference_dir / "r1searcher" / "eval_results" / "hotpotqa_qwen.jsonl")
    real_searches = [match for row in real for match in _SEARCH.findall(row["gen_text_store"])]
    assert len(real_searches) > 100   # the pattern is the real one
    responses = [row["text"].split("Assistant: <think>", 1)[1]
                 for row in fresh_rows if row["kind"] == "demo"]
    searching = [text for text in responses if prompts.BEGIN_QUERY in text]
    assert searching
    for text in searching:
        # Every query in a demonstration is followed by a whole, well-formed block.
        assert len(_SEARCH.findall(text)) == text.count(prompts.BEGIN_QUERY)
        assert text.count("</think>") == 1 and text.endswith(" </answer>")


def test_prompt_is_the_spec_base_prompt():
    prompt = prompts.base_prompt("Who wrote Zokel?")
    assert prompt.startswith("The User asks a question, and the Assistant solves it.\n")
    assert prompt.endswith("\n\nUser:Who wrote Zokel?\nAssistant: <think>")
    assert "**A query must involve only a single triple**.\n" in prompt
