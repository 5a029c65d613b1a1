"""The paper's metrics, recomputed from the released model's real outputs."""
import json

import pytest

from searcher_jax.rl import metrics

# Published from the released Qwen model's outputs (SPEC section 6).
PUBLISHED = {
    "hotpotqa_qwen": {"em": 0.580, "cem": 0.654, "f1": 0.719},
    "2wiki_qwen": {"em": 0.554, "cem": 0.636, "f1": 0.637},
    "bamboogle_qwen": {"em": 0.456, "cem": 0.528, "f1": 0.577},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_numbers_from_released_outputs(reference_dir, name):
    path = reference_dir / "r1searcher" / "eval_results" / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    scores = {"em": 0.0, "cem": 0.0, "f1": 0.0}
    for row in rows:
        scores["em"] += metrics.exact_match(row["pred_ans"], row["answer"])
        scores["cem"] += metrics.cover_exact_match(row["pred_ans"], row["answer"])
        scores["f1"] += metrics.f1_score(row["pred_ans"], row["answer"])
    for key, published in PUBLISHED[name].items():
        assert round(scores[key] / len(rows), 3) == published, key


def test_extraction_matches_the_stored_predictions(reference_dir):
    path = reference_dir / "r1searcher" / "eval_results" / "hotpotqa_qwen.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    answered = [r for r in rows if "</answer>" in r["gen_text_store"]]
    assert len(answered) > 400
    for row in answered:
        assert metrics.extract_answer(row["gen_text_store"]) == row["pred_ans"].strip()


def test_normalisation_rules():
    assert metrics.normalize_answer("True") == "yes"
    assert metrics.normalize_answer("  The_Beatles’ `Help!` ") == "beatles help"
    assert metrics.f1_score("no", ["yes"]) == 0.0
    assert metrics.f1_score("yes", "yes") == 1.0
    assert metrics.cover_exact_match("Paris, France", ["paris"]) == 1.0
    assert metrics.exact_match("an apple", ["Apple"]) == 1.0
    assert metrics.extract_answer("<answer> x </answer> <answer>y") is None


METRICS = (metrics.exact_match, metrics.cover_exact_match, metrics.f1_score)
# Golds that normalise to "": articles, punctuation, quote marks, underscores, spaces.
EMPTY_GOLDS = ["", " ", "The", "A", "an", "A.", "the_", "‘The’", "`a`!"]


@pytest.mark.parametrize("gold", EMPTY_GOLDS)
@pytest.mark.parametrize("prediction", ["Paris", "", "The", "a Paris"])
@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_a_gold_that_normalises_to_nothing_matches_nothing(metric, prediction, gold):
    assert metrics.normalize_answer(gold) == ""
    assert metric(prediction, [gold]) == 0.0
    assert metric(prediction, gold) == 0.0


def test_the_reported_empty_gold_cases():
    assert metrics.cover_exact_match("Paris", ["A"]) == 0.0
    assert metrics.exact_match("", ["The"]) == 0.0


def test_empty_golds_are_skipped_and_the_rest_scored():
    assert metrics.exact_match("Paris", ["The", "paris"]) == 1.0
    assert metrics.cover_exact_match("Paris, France", ["A", "paris"]) == 1.0
    assert metrics.cover_exact_match("Rome", ["A", "Paris"]) == 0.0
    assert metrics.f1_score("Paris France", ["the", "Paris"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_no_gold_left_scores_zero(metric):
    assert metric("Paris", []) == 0.0
    assert metric("Paris", ["The", "a"]) == 0.0


@pytest.mark.parametrize("prediction", ["", "  ", "The", "an."])
@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_an_empty_prediction_matches_nothing(metric, prediction):
    assert metric(prediction, ["Paris", "yes", "noanswer"]) == 0.0
