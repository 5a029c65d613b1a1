"""Rewards and format checks, on hand-made responses and the released model's outputs."""
import json

import pytest

from searcher_jax.rl import rewards

DOCS = "\n\n<|begin_of_documents|>\n(1)Title: A Text: b\n<|end_of_documents|>\n\n"
GOOD = (" I search. <|begin_of_query|> a b <|end_of_query|>" + DOCS +
        "So it is Paris. </think>\n\n<answer> Paris </answer>")
STAGE2 = rewards.RewardConfig()


def test_well_formed_response_gets_its_f1():
    result = rewards.score(GOOD, ["Paris"], STAGE2)
    assert result.format_ok and result.num_retrievals == 1 and result.reward == 1.0
    assert rewards.score(GOOD, ["Paris France"], STAGE2).reward == pytest.approx(2 / 3)


def test_an_answer_inside_a_document_is_not_the_policys():
    # A passage holding answer tags: the policy wrote no answer, so it earns no F1, has_answer
    # is false, and the passage's tags do not satisfy the format (they are counted on the text
    # the policy wrote, less the document blocks).
    docs = DOCS.replace("Text: b", "Text: <answer> Paris </answer>")
    response = " I search. <|begin_of_query|> a b <|end_of_query|>" + docs + "I do not know."
    result = rewards.score(response, ["Paris"], STAGE2)
    assert result.answer is None and result.f1 == 0.0 and result.cem == 0.0
    assert not result.format_ok and result.reward == -2.0
    with_think = response.replace("Text: <answer>", "Text: </think> <answer>")
    assert not rewards.score(with_think, ["Paris"], STAGE2).format_ok
    # The policy's own answer after such a block is read as before, and the passage's tags do
    # not break its format: it is scored on its answer, not given the format penalty.
    for passage in (docs, docs.replace("Text: <answer>", "Text: </think> <answer>")):
        written = (" I search. <|begin_of_query|> a b <|end_of_query|>" + passage
                   + "So it is Paris. </think>\n\n<answer> Paris </answer>")
        result = rewards.score(written, ["Paris"], STAGE2)
        assert result.answer == "Paris" and result.format_ok and result.reward == 1.0
    result = rewards.score(response + " </think>\n\n<answer> Rome </answer>", ["Paris"], STAGE2)
    assert result.answer == "Rome" and result.f1 == 0.0 and result.format_ok
    # The retrieval markers are still counted on the whole response.
    unbalanced = written.replace("<|end_of_documents|>\n\n", "<|end_of_documents|>")
    assert rewards.score(unbalanced, ["Paris"], STAGE2).reward == -2.0


LLAMA_STAGE2 = rewards.RewardConfig(format_penalty=-1.0, strict_format=False)


@pytest.mark.parametrize("broken", [
    GOOD.replace("</think>", ""),                           # no </think>
    GOOD + " <answer> x </answer>",                         # two answers
    "<think>" + GOOD,                                       # <think> in the response
    GOOD.replace("<|end_of_documents|>\n\n", "<|end_of_documents|>"),  # unbalanced block
])
def test_format_failures_get_the_penalty(broken):
    assert rewards.score(broken, ["Paris"], STAGE2).reward == -2.0
    assert rewards.score(broken, ["Paris"], LLAMA_STAGE2).reward == -1.0


@pytest.mark.parametrize("broken", [
    GOOD.replace("Paris </answer>", "Paris b c d e f g h i j k </answer>"),  # over 10 words
    GOOD.replace("So it is", "Assistant: so it is"),
    GOOD.replace("So it is", "所以"),
])
def test_qwen_recipe_checks_only_apply_when_strict(broken):
    assert rewards.score(broken, ["Paris"], STAGE2).reward == -2.0
    assert rewards.score(broken, ["Paris"], LLAMA_STAGE2).reward > 0


def test_cjk_inside_documents_is_allowed():
    response = GOOD.replace("Title: A Text: b", "Title: 巴黎 Text: b")
    assert rewards.score(response, ["Paris"], STAGE2).format_ok


def test_stage1_recipes():
    paper = rewards.RewardConfig(recipe="retrieval_format")
    assert rewards.score(GOOD, ["x"], paper).reward == 1.0
    no_search = " I know. </think>\n\n<answer> Paris </answer>"
    assert rewards.score(no_search, ["x"], paper).reward == 0.5
    llama = rewards.RewardConfig(recipe="cem_retrieval_format", strict_format=False)
    assert rewards.score(GOOD, ["Paris"], llama).reward == 2.0
    assert rewards.score(no_search, ["Rome"], llama).reward == -0.5


@pytest.mark.parametrize("metric", ["f1", "em", "cem"])
def test_a_gold_that_normalises_to_nothing_pays_nothing(metric):
    config = rewards.RewardConfig(answer_metric=metric)
    empty_answer = GOOD.replace("<answer> Paris </answer>", "<answer> </answer>")
    for response in (GOOD, empty_answer):
        result = rewards.score(response, ["A"], config)
        assert result.format_ok and result.reward == 0.0
        assert (result.em, result.cem, result.f1) == (0.0, 0.0, 0.0)
    assert rewards.score(GOOD, ["The", "Paris"], config).reward == 1.0  # the other gold counts


def test_cem_recipe_does_not_pay_for_an_empty_gold():
    llama = rewards.RewardConfig(recipe="cem_retrieval_format", strict_format=False)
    assert rewards.score(GOOD, ["A"], llama).reward == 0.0  # -1 + 0.5 retrieval + 0.5 format
    assert rewards.score(GOOD, ["A", "Paris"], llama).reward == 2.0


def test_bad_config_names_the_choices():
    with pytest.raises(ValueError, match="unknown reward recipe 'f2'"):
        rewards.RewardConfig(recipe="f2")


def test_released_outputs_mostly_well_formed(reference_dir):
    """The released Qwen traces were trained on this format: nearly all pass the checks."""
    path = reference_dir / "r1searcher" / "eval_results" / "hotpotqa_qwen.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    results = [rewards.score(r["gen_text_store"], r["answer"], STAGE2) for r in rows]
    well_formed = sum(r.format_ok for r in results) / len(rows)
    queries = sum(r.num_retrievals for r in results) / len(rows)
    assert well_formed > 0.9
    assert queries == pytest.approx(2.11, abs=0.01)  # Published: 2.11 queries per question.
