"""Question files in every format the project meets, and the resumable training order."""
import json

import pytest

from searcher_jax.data.questions import (
    Question,
    QuestionOrder,
    expand_samples,
    read_questions,
)
from searcher_jax.synthetic import build as world_build
from searcher_jax.synthetic import world_files


@pytest.mark.parametrize("relative, count, first", [
    ("r1searcher/training_set/stage_1.jsonl", 350,
     Question("37653", "Which Route 22 runs through a major city?", ("U.S. Route 22",))),
    ("r1searcher/training_set/stage_2.jsonl", 8148,
     Question("1", "Jonathan Glazer and Robert Rodriguez both work as what?", ("filmmaker",))),
    ("r1searcher/eval_set/hotpotqa_500.jsonl", 500,
     Question("1", "In the 1973 NFL season, the Pro Bowl took place at what football stadium "
              "that is part of the Truman Sports Complex, along with what other stadium?",
              ("Kauffman Stadium",))),
    ("r1searcher/eval_set/bamboogle.jsonl", 125,
     Question("1", "Who was president of the United States in the year that Citibank was "
              "founded?", ("james madison",))),
    ("r1searcher/eval_set/2wiki_500.jsonl", 500,
     Question("1", "Who is Ahmose-Henutemipet's paternal grandmother?", ("Tetisheri",))),
    ("r1searcher/eval_set/musique_500.jsonl", 500,
     Question("1", "What was the director of Addicted to Love nominated for?",
              ("Academy Award for Best Live Action Short Film",))),
    # qidx counts from 0: the id must be "0", not the line-number fallback.
    ("corpus/hotpotqa_llama.questions.jsonl", 500,
     Question("0", "The 2009 Fort Hood mass shooting was committed by who?", ("Nidal Hasan",))),
])
def test_reads_reference_files(reference_dir, relative, count, first):
    questions = read_questions(reference_dir / relative)
    assert len(questions) == count
    assert questions[0] == first
    assert len({q.id for q in questions}) == count


def test_reads_what_the_synthetic_world_writes(tmp_path):
    world_config, _ = world_build.PRESETS["ci"]
    texts = world_files.write_world(world_config, tmp_path)
    questions = read_questions(tmp_path / world_files.TRAIN_FILE)
    assert len(questions) == len(texts.train)
    row = texts.train[0]
    assert questions[0] == Question(str(row["idx"]), row["question"], (row["answer"],))


def test_flashrag_rows_with_a_list_of_golds(tmp_path):
    path = tmp_path / "nq.jsonl"
    rows = [{"id": "test_0", "question": "who wrote it?", "golden_answers": ["Ann", "Ann B."]},
            {"id": "test_1", "question": "when?", "golden_answers": ["1999"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # trailing blank lines
    assert read_questions(path) == [Question("test_0", "who wrote it?", ("Ann", "Ann B.")),
                                    Question("test_1", "when?", ("1999",))]


def test_json_list_file_answer_lists_and_line_number_ids(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"question": "q1?", "answer": ["x", "b"]},
                                {"idx": 7, "question": "q2?", "answer": "c"}]))
    assert read_questions(path) == [Question("1", "q1?", ("x", "b")), Question("7", "q2?", ("c",))]


def test_blank_lines_skipped_and_ids_fall_back_to_line_numbers(tmp_path):
    path = tmp_path / "q.jsonl"
    # U+2028 inside a JSON string is legal and must not split the line.
    path.write_text('\n{"question": "a\u2028b?", "answer": "x"}\n', encoding="utf-8")
    assert read_questions(path) == [Question("2", "a\u2028b?", ("x",))]


GOOD = '{"idx": 1, "question": "q?", "answer": "x"}'


@pytest.mark.parametrize("bad_line, message", [
    ('{"idx": 2, "question": "q?", "answer": "x"', "invalid JSON"),
    ('{"idx": 2, "answer": "x"}', "'question'"),
    ('{"idx": 2, "question": "q?"}', "'answer'"),
    ('{"idx": 2, "question": "q?", "answer": ""}', "'answer'"),
    ('{"idx": 2, "question": "q?", "answer": "The"}', "normalises to nothing"),
    ('{"idx": 2, "question": "q?", "answer": []}', "'answer'"),
    ('{"idx": 2, "question": "q?", "answer": 42}', "'answer'"),
    ('{"idx": 2, "question": "q?", "answer": ["x", 3]}', "'answer'"),
    ('{"id": 2, "question": "q?", "golden_answers": []}', "'golden_answers'"),
    ('{"idx": 2, "question": ["q?"], "answer": "x"}', "'question'"),
    ('["q?", "a"]', "JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: ") as info:
        read_questions(path)
    assert message in str(info.value)


@pytest.mark.parametrize("row", [
    {"idx": 2, "question": "q?", "answer": "The"},
    {"idx": 2, "question": "q?", "answer": ["Paris", "The"]},  # one bad gold spoils the row
    {"id": "t2", "question": "q?", "golden_answers": ["Paris", "The"]},
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_gold_that_normalises_to_nothing_is_refused_with_file_line_and_gold(
        tmp_path, row, suffix):
    path = tmp_path / f"bad{suffix}"
    rows = [json.loads(GOOD), row]
    path.write_text(json.dumps(rows) if suffix == ".json" else
                    "\n".join(json.dumps(r) for r in rows) + "\n")
    where = "item 2" if suffix == ".json" else "line 2"
    with pytest.raises(ValueError, match=rf"bad\{suffix}, {where}: .*normalises to nothing.*'The'"):
        read_questions(path)


@pytest.mark.parametrize("gold", ["A", "an.", " the ", "‘The’", "_", "?!"])
def test_every_gold_that_normalises_to_nothing_is_refused(tmp_path, gold):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": gold}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 1: .*normalises to nothing") as info:
        read_questions(path)
    assert repr(gold) in str(info.value)


def test_short_golds_that_keep_a_word_are_read(tmp_path):
    path = tmp_path / "q.jsonl"
    golds = ["True", "No", "The Who", "A-ha", "1", "I"]
    path.write_text("\n".join(json.dumps({"question": "q?", "answer": g}) for g in golds))
    assert [q.answers for q in read_questions(path)] == [(g,) for g in golds]


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"),
                                        ("empty.json", "[]")])
def test_empty_file_raises(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: no questions"):
        read_questions(tmp_path / name)


def test_json_file_errors_name_the_item(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "q?", "answer": "x"}, {"question": "q?"}]))
    with pytest.raises(ValueError, match=r"bad\.json, item 2: .*'answer'"):
        read_questions(path)


QUESTIONS = [Question(str(i), f"q{i}?", (f"a{i}",)) for i in range(10)]


def ids(batch):
    return [q.id for q in batch]


def test_order_is_deterministic_and_seeded():
    first = ids(QuestionOrder(QUESTIONS, seed=0).batch(0, 30))
    assert first == ids(QuestionOrder(QUESTIONS, seed=0).batch(0, 30))
    assert first != ids(QuestionOrder(QUESTIONS, seed=1).batch(0, 30))
    # grain seeds epoch e with seed + e; our seed hashing keeps seed 1 from replaying
    # seed 0's second epoch.
    assert first[10:20] != ids(QuestionOrder(QUESTIONS, seed=1).batch(0, 10))


def test_each_epoch_is_a_fresh_permutation():
    order = QuestionOrder(QUESTIONS, seed=3)
    epochs = [ids(order.batch(e * 10, 10)) for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(q.id for q in QUESTIONS)
    assert len({tuple(e) for e in epochs}) == 4
    assert epochs[0] != [q.id for q in QUESTIONS]
    assert [order.epoch_of(p) for p in (0, 9, 10, 39, 40)] == [0, 0, 1, 3, 4]


def test_unshuffled_order_is_file_order():
    order = QuestionOrder(QUESTIONS, seed=0, shuffle=False)
    assert ids(order.batch(8, 4)) == ["8", "9", "0", "1"]


def test_batch_across_epoch_boundary_and_resume():
    order = QuestionOrder(QUESTIONS, seed=5)
    whole = order.batch(7, 16)  # epoch 0's tail, all of epoch 1, epoch 2's head
    assert whole == order.batch(7, 3) + order.batch(10, 10) + order.batch(20, 3)
    for k in range(17):
        assert whole == order.batch(7, k) + order.batch(7 + k, 16 - k)
    # A fresh object at the checkpointed position continues the same stream.
    assert QuestionOrder(QUESTIONS, seed=5).batch(12, 11) == whole[5:]
    assert order.batch(10**15, 2) == QuestionOrder(QUESTIONS, seed=5).batch(10**15, 2)


def test_order_rejects_bad_arguments():
    with pytest.raises(ValueError):
        QuestionOrder([], seed=0)
    with pytest.raises(ValueError):
        QuestionOrder(QUESTIONS, seed=0).batch(-1, 2)


def test_expand_samples_keeps_a_prompts_samples_contiguous():
    assert ids(expand_samples(QUESTIONS[:3], 2)) == ["0", "0", "1", "1", "2", "2"]
    assert expand_samples(QUESTIONS[:2], 1) == QUESTIONS[:2]
    with pytest.raises(ValueError):
        expand_samples(QUESTIONS, 0)
