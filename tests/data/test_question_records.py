"""Question files as array_record splits (TFDS, no TensorFlow), read back where a file is read."""
import ast
import inspect
import json
import sys

import pytest

from searcher_jax.data import question_reader, question_records, questions
from searcher_jax.data.questions import Question, read_questions, split_spec
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def records(reference_dir, tmp_path_factory):
    files = {"train": reference_dir / "r1searcher/training_set/stage_1.jsonl",
             "bamboogle": reference_dir / "r1searcher/eval_set/bamboogle.jsonl"}
    return files, question_records.write_records(files, tmp_path_factory.mktemp("questions"))


def test_splits_hold_the_files_questions(records):
    files, directory = records
    assert question_records.split_sizes(directory) == {"train": 350, "bamboogle": 125}
    for split, path in files.items():
        stored = read_questions(f"{directory}:{split}")  # the path a config gives
        assert sorted(stored, key=lambda q: q.id) == sorted(read_questions(path), key=lambda q: q.id)
    assert all(isinstance(a, str) for q in stored for a in q.answers)


def test_unknown_split_and_existing_dataset_are_errors(records):
    files, directory = records
    with pytest.raises(ValueError, match=r"no split 'test' \(has \['bamboogle', 'train'\]\)"):
        read_questions(f"{directory}:test")
    with pytest.raises(FileExistsError, match="exists"):
        question_records.write_records(files, directory.parent.parent)


def test_a_malformed_row_stops_the_build_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "x"}\n{"question": "", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing or non-string 'question'"):
        question_records.write_records({"train": bad}, tmp_path / "out")
    with pytest.raises(ValueError, match="split name"):
        question_records.write_records({"train/x": bad}, tmp_path / "out")


def test_a_gold_that_normalises_to_nothing_stops_the_build(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "a b"}\n{"question": "q?", "answer": ["x", "The"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: .*normalises to nothing.*'The'"):
        question_records.write_records({"train": bad}, tmp_path / "out")


def test_a_dataset_built_with_an_empty_gold_is_refused_when_read(tmp_path, monkeypatch):
    """A dataset built before the reader refused such golds: reading it names split, id, gold."""
    monkeypatch.setattr(question_records, "read_questions",
                        lambda path: [Question("7", "q?", ("Paris", "A"))])
    directory = question_records.write_records({"train": "unused"}, tmp_path)
    with pytest.raises(ValueError, match=r":train, question id 7: .*normalises to nothing.*'A'"):
        read_questions(f"{directory}:train")


def _imports(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names}


def test_neither_the_reader_nor_the_order_imports_the_records_module_or_each_other():
    """question_records imports the reader to build a dataset; the reader importing it back
    would be a cycle, and so would the records module importing the order (questions.py)."""
    assert not any("question_records" in name for name in _imports(question_reader))
    assert not any("question_records" in name for name in _imports(questions))
    assert "searcher_jax.data.questions" not in _imports(question_records)
    assert "searcher_jax.data.questions" not in _imports(question_reader)


def test_paths_without_a_split_are_files(tmp_path):
    assert split_spec("gs://bucket/stage_2.jsonl") is None
    odd = tmp_path / "a:b.jsonl"  # a colon in a file name, not a dataset
    odd.write_text('{"question": "q?", "answer": "x"}\n')
    assert split_spec(str(odd)) is None
    assert read_questions(odd)[0].question == "q?"


def test_cli(records, tmp_path, capsys, monkeypatch):
    files, _ = records
    monkeypatch.syspath_prepend(str(REPO_ROOT / "launch"))
    import build_questions
    assert build_questions.main(["--out", str(tmp_path), f"train={files['bamboogle']}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 125}
    assert len(read_questions(summary["use"]["train"])) == 125
    assert build_questions.main(["--out", str(tmp_path / "x"), "train"]) == 2
    assert "expected SPLIT=FILE" in capsys.readouterr().err
    sys.modules.pop("build_questions", None)
