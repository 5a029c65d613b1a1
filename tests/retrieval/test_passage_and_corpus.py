"""Corpus formats, the memory-mapped store and byte-exact rendering of document blocks."""
import json
import mmap
import re

import pytest

from searcher_jax.retrieval import corpus_formats, corpus_store
from searcher_jax.retrieval.passage import Passage, documents_block, documents_text, strip_corpus_id

_BLOCK = re.compile(r"<\|begin_of_documents\|>\n(.*?)<\|end_of_documents\|>", re.DOTALL)
# (eval_results file, corpus/questions prefix)
_SETS = ["hotpotqa_qwen", "hotpotqa_llama", "2wiki_qwen", "bamboogle_qwen", "bamboogle_llama"]


def test_document_blocks_reproduce_eval_results_byte_for_byte(reference_dir, tmp_path):
    checked = 0
    for name in _SETS:
        store_dir = tmp_path / name
        corpus_store.write_store(corpus_formats.read_corpus(reference_dir / "corpus" / f"{name}.corpus.jsonl"),
                                 store_dir, progress=False)
        store = corpus_store.CorpusStore(store_dir)
        row_of = {p.id: r for r, p in enumerate(store)}
        questions = [json.loads(l) for l in open(reference_dir / "corpus" / f"{name}.questions.jsonl")]
        results = [json.loads(l) for l in open(reference_dir / "r1searcher" / "eval_results" / f"{name}.jsonl")]
        assert len(questions) == len(results)
        for q, r in zip(questions, results):
            blocks = _BLOCK.findall(r["gen_text_store"])
            ids = q["retrieved_doc_ids"]
            per_block = len(ids) // max(len(blocks), 1)
            for j, block in enumerate(blocks):
                passages = store.get_many([row_of[i] for i in ids[j * per_block:(j + 1) * per_block]])
                assert documents_text(passages) == block, (name, q["qidx"], j)
                checked += 1
    assert checked >= 4000  # the reference README counts 4,162 blocks


def test_documents_block_shape_and_no_hits():
    p = Passage("7", "T", " body", "hotpot_abstract")
    assert documents_block([p, p]) == ("\n\n<|begin_of_documents|>\n(1)Title: T Text:  body\n"
                                       "(2)Title: T Text:  body\n<|end_of_documents|>\n\n")
    assert documents_block([]) == "\n\n<|begin_of_documents|>\nNone<|end_of_documents|>\n\n"
    assert Passage("1", "Barbara Strozzi", "Barbara Strozzi was", "kilt_100w").render() == \
        "Barbara Strozzi   Barbara Strozzi was"
    assert strip_corpus_id("12\tTitle: X Text: Y") == "Title: X Text: Y"
    with pytest.raises(ValueError, match="unknown format"):
        Passage("1", "t", "x", "html")


def test_hotpot_tsv_renders_every_line_as_the_authors_served_it(reference_dir):
    path = reference_dir / "r1searcher" / "corpus_samples" / "train_np_title_abs_sample_100.tsv"
    passages = list(corpus_formats.read_corpus(path))
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    assert len(passages) == len(lines) == 100
    for p, line in zip(passages, lines):
        passage_id, body = line.split("\t", 1)
        assert p.id == passage_id and p.render() == body == strip_corpus_id(line)
    assert passages[0].id == "0"  # byte-order mark not part of the id
    # CSV-quoted lines were served with their quotes; plain ones parse into title and text.
    assert passages[0].format == "raw" and passages[0].render().startswith('"Title: Professional Football')
    assert passages[1] == Passage("1", "Lucy Mair", passages[1].text, "hotpot_abstract")
    assert passages[1].text.startswith(" Lucy Philip Mair (28 January 1901")


def test_kilt_pages_split_into_100_word_passages(reference_dir):
    path = reference_dir / "r1searcher" / "corpus_samples" / "filtered_kilt_sample_100.jsonl"
    passages = list(corpus_formats.read_corpus(path))
    # The first lines of the authors' split (wiki_kilt_100_really.tsv sample in their repository).
    assert passages[0].render().startswith('A   A A (named , plural "As", "A\'s", "a"s, "a\'s" or "aes") is the first')
    assert passages[0].text.endswith("especially fonts intended to be read by children, and is")
    assert passages[1].text.startswith("also found in italic type. In the English grammar, \"a\", and its variant "
                                       "\"an\", is an indefinite article. History. The earliest")
    assert [p.id for p in passages] == [str(i) for i in range(len(passages))]
    first_page = json.loads(path.read_text().splitlines()[0])
    words = "".join(first_page["text"]).replace("BULLET::::", "").replace("Section::::", "").split()
    page = [p for p in passages if p.title == first_page["wikipedia_title"]]
    assert " ".join(p.text for p in page) == " ".join(words)
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert all(p.format == "kilt_100w" for p in passages)


def test_jsonl_layouts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"id": "a1", "contents": '"Paris"\nParis is the capital of France.'},
            {"id": 5, "title": "Lyon", "text": " Lyon is a city.", "format": "hotpot_abstract"},
            {"id": "k", "title": "Nice", "text": "Nice is on the coast", "format": "kilt_100w"},
            {"id": "d", "title": "Metz", "text": " default format"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b, c, d = corpus_formats.read_corpus(path)
    assert a == Passage("a1", "Paris", '"Paris"\nParis is the capital of France.', "flashrag")
    assert a.render() == a.contents() == rows[0]["contents"]
    assert b.render() == "Title: Lyon Text:  Lyon is a city." and b.id == "5"
    assert b.contents() == '"Lyon"\n Lyon is a city.'
    assert c.render() == "Nice   Nice is on the coast"
    assert d.format == "hotpot_abstract"


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"id": "1", "title": "t", "text": "x"}\n{"id": 2, "title": \n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"id": "1", "title": "t", "text": "x"}\n\n{"id": "3", "title": "t"}\n',
     r"bad\.jsonl:3: field 'text'"),
    ("bad.jsonl", '{"id": "1", "text": "x", "format": "html"}\n', r"bad\.jsonl:1: unknown format"),
    ("bad.jsonl", '[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ("bad.jsonl", '{"wikipedia_title": "A", "text": "not a list"}\n', r"bad\.jsonl:1: KILT page"),
    ("bad.tsv", "0\tTitle: A Text: a\nno tab on this line\n", r"bad\.tsv:2: expected `id<TAB>passage`"),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(corpus_formats.CorpusFormatError, match=message):
        list(corpus_formats.read_corpus(path))


def test_store_is_memory_mapped_and_fetches_by_row(tmp_path):
    passages = [Passage(str(i), f"T{i}", f" text é {i}" * (i % 3 + 1), "hotpot_abstract") for i in range(50)]
    passages.append(Passage("x", "", "", "raw"))
    assert corpus_store.write_store(iter(passages), tmp_path / "s", progress=False) == 51
    store = corpus_store.CorpusStore(tmp_path / "s")
    assert len(store) == 51
    assert isinstance(store._bins["text"], mmap.mmap)
    assert store.get_many([49, 0, 50, 7]) == [passages[49], passages[0], passages[50], passages[7]]
    assert list(store) == passages
    with pytest.raises(IndexError, match="out of range"):
        store.get(51)
    corpus_store.write_store(iter([]), tmp_path / "empty", progress=False)
    assert len(corpus_store.CorpusStore(tmp_path / "empty")) == 0
    with pytest.raises(FileNotFoundError, match="not a corpus store"):
        corpus_store.CorpusStore(tmp_path / "nothing")
