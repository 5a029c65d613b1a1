"""Difficulty labels: the thresholds, the stored reference rollouts of stage_1.jsonl, and
rollouts sampled with the world's model, whose labels agree with the rollouts drawn."""
import json
import os
import subprocess
import sys

import jax
import pytest

from searcher_jax import difficulty
from searcher_jax.rl import metrics
from tests.conftest import REPO_ROOT

PAPER = difficulty.DifficultyConfig(rollouts=30)


def test_first_correct_rollout_and_the_papers_thresholds():
    assert difficulty.rollouts_needed([False, False, True, True]) == 3
    assert difficulty.rollouts_needed([False] * 4) is None
    assert [difficulty.label(n, 30, PAPER) for n in (1, 9, 10, 20, 21, 30)] == [
        "easy", "easy", "medium", "medium", "difficult", "difficult"]
    assert difficulty.label(None, 30, PAPER) == "difficult"   # needed more than 30 > 20
    assert difficulty.label(None, 10, PAPER) == "unsolved"    # > 10: medium or difficult
    with pytest.raises(ValueError, match="easy_below"):
        difficulty.DifficultyConfig(easy_below=30, difficult_above=20)


def test_a_rollout_without_an_answer_is_wrong():
    """A rollout that gave no answer predicts evaluation's "I don't know." placeholder: it is
    wrong, not scored as text (its words would cover the gold "know")."""
    from searcher_jax import evaluation
    from searcher_jax.data.questions import Question
    question = Question("1", "What verb?", ("know",))
    assert metrics.cover_exact_match(evaluation.NO_ANSWER, question.answers) == 1.0
    for metric in difficulty.METRICS:
        config = difficulty.DifficultyConfig(metric=metric, f1_threshold=0.1)
        assert not difficulty.correct(evaluation.NO_ANSWER, question.answers, config)
        assert not difficulty.correct("", question.answers, config)
        row = difficulty.labelled_row(question, "s", [evaluation.NO_ANSWER, "know"], True, config)
        assert row["correct"] == [False, True] and row["rollouts_needed"] == 2


def test_sources_with_row_ranges():
    a, b = difficulty.parse_sources("hotpotqa=s1.jsonl@1-201, 2wiki=s1.jsonl@202-350")
    assert (a.name, a.path, a.first, a.last) == ("hotpotqa", "s1.jsonl", 1, 201)
    assert (b.name, b.first, b.last) == ("2wiki", 202, 350)
    assert difficulty.parse_sources("dir/train.jsonl")[0].name == "train"
    with pytest.raises(ValueError, match="@FIRST-LAST"):
        difficulty.parse_sources("x=s1.jsonl@1")


def test_stored_reference_rollouts_of_stage_1(reference_dir, tmp_path):
    stage_1 = reference_dir / "r1searcher" / "training_set" / "stage_1.jsonl"
    out = tmp_path / "labels.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "label_difficulty.py"),
         f"--questions=hotpotqa={stage_1}@1-201,2wiki={stage_1}@202-350", f"--out={out}",
         "--easy_below=3", "--difficult_above=6"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 350 and {r["rollouts_from"] for r in rows} == {"stored"}
    assert [r["source"] for r in rows] == ["hotpotqa"] * 201 + ["2wiki"] * 149
    stored = [json.loads(line) for line in stage_1.read_text().splitlines()]
    for row, raw in zip(rows, stored):
        hits = [metrics.cover_exact_match(p, [raw["answer"]]) == 1.0 for p in raw["pred_anses"]]
        assert row["correct"] == hits and row["idx"] == str(raw["idx"])
        needed = hits.index(True) + 1 if any(hits) else None
        assert row["rollouts_needed"] == needed
        assert row["difficulty"] == ("unsolved" if needed is None else "easy" if needed < 3
                                     else "medium" if needed <= 6 else "difficult")
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(printed["by_source"]["2wiki"].values()) == 149


def test_a_bad_stored_rollout_list_is_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Q?", "answer": "Oslo", "pred_anses": ["Oslo"]}\n'
                    '{"question": "R?", "answer": "Rome", "pred_anses": "Rome"}\n')
    with pytest.raises(ValueError, match="q.jsonl, line 2: 'pred_anses' must be a list"):
        difficulty.read_source(difficulty.Source("q", str(path)))
    path.write_text('{"question": "Q?", "answer": "Oslo"}\n')
    with pytest.raises(ValueError, match="rows 1-5 asked, the file has 1"):
        difficulty.read_source(difficulty.Source("q", str(path), 1, 5))


def test_sampled_labels_agree_with_the_rollouts_drawn(world_model_dir, tmp_path):
    from configs import demo
    from searcher_jax import run_config, trainer
    config = demo.get_config()
    config.world.dir = str(world_model_dir)
    config.rollout.max_retrievals = 2
    config.sampler.update(max_len=512, segment_len=96)
    config = trainer.resolve_world(config)
    parts, _ = trainer.build_parts(config, with_train_questions=False)
    encode = trainer.encode_prompt_fn(parts.tokenizer, "base")
    draw = difficulty.policy_draw(parts.sampler, parts.tokenizer, parts.retriever, encode,
                                  run_config.rollout_config(config),
                                  run_config.reward_config(config), parts.eos_ids)
    labels = difficulty.DifficultyConfig(rollouts=4, easy_below=2, difficult_above=3)
    source = difficulty.Source("world", str(world_model_dir / "world" / "train.jsonl"))
    key = jax.random.key(7)
    rows = difficulty.label_sources([source], labels, draw, batch_size=8, key=key, limit=2)
    assert len(rows) == 2 and {r["rollouts_from"] for r in rows} == {"sampled"}
    # The rollouts drawn for them: the same draws again (each batch's own key), row by row.
    questions = [q for q, _ in difficulty.read_source(source)[:2]]
    again = difficulty.sample_predictions(questions, 4, draw, 8, key)
    assert [r["pred_anses"] for r in rows] == again
    for row, question in zip(rows, questions):
        hits = [metrics.cover_exact_match(p, question.answers) == 1.0 for p in row["pred_anses"]]
        assert row["correct"] == hits
        assert row["rollouts_needed"] == difficulty.rollouts_needed(hits)
        assert row["difficulty"] == difficulty.label(row["rollouts_needed"], 4, labels)
    # A labels file reads back as stored rollouts and relabels the same, with no model.
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    relabelled = difficulty.label_sources([difficulty.Source("world", str(path))], labels,
                                          None, 1, key)
    assert [(r["difficulty"], r["rollouts_needed"]) for r in relabelled] == \
        [(r["difficulty"], r["rollouts_needed"]) for r in rows]
