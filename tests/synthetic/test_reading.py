"""The reading-F1 probe: oracle prefixes hold the gold facts; scores are F1s in [0, 1].

Structural checks only; how well the ci model reads is measured, not asserted.
"""
import pytest

from searcher_jax.data import prompts
from searcher_jax.model import hf_io
from searcher_jax.synthetic import build as world_build
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import reading
from searcher_jax.synthetic import templates
from searcher_jax.synthetic import world_files

NUM_SCORED = 4


@pytest.fixture(scope="module")
def questions_and_documents(world_paths):
    world_config, _ = world_build.PRESETS["ci"]
    train, evaluation = reading.world_questions(world_config)
    documents = reading.OracleDocuments(world_files.read_jsonl(world_paths.corpus))
    return train, evaluation, documents


def test_regenerated_questions_are_the_question_files(world_paths, questions_and_documents):
    train, evaluation, _ = questions_and_documents
    for path, questions in ((world_paths.train_questions, train),
                            (world_paths.eval_questions, evaluation)):
        rows = world_files.read_jsonl(path)
        assert [(r["question"], r["answer"]) for r in rows] == [(q.text, q.answer)
                                                                 for q in questions]


def test_oracle_blocks_hold_the_gold_passages_and_answer(questions_and_documents):
    train, evaluation, documents = questions_and_documents
    for question in train[:50] + evaluation:
        prefix = reading.oracle_prefix(question, documents)
        blocks = reading.oracle_documents_text(question, documents)
        assert prefix.startswith(prompts.base_prompt(question.text))
        assert blocks.count(prompts.BEGIN_DOCUMENTS) == len(question.steps)
        response = prefix[len(prompts.base_prompt(question.text)):]
        assert response.count(prompts.BEGIN_QUERY) == len(question.steps)
        for step in question.steps:
            gold = documents.gold(step)
            assert gold.startswith(f"Title: {step.subject} Text:") and gold in blocks
            assert gold.endswith(f" {step.value}.")        # one fact, its value last
        if question.answer_type not in ("yes_no", "comparison"):
            assert question.answer in blocks               # the answer itself is in a block
        # The prefix ends with the last block: the model writes the last fact and the answer.
        assert prefix.endswith(prompts.END_DOCUMENTS + "\n\n")
        assert "<answer>" not in response


def test_bridge_prefix_restates_the_first_hop(questions_and_documents):
    _, evaluation, documents = questions_and_documents
    bridge = next(q for q in evaluation if q.kind == questions_lib.BRIDGE)
    first = bridge.steps[0]
    prefix = reading.oracle_prefix(bridge, documents)
    assert templates.fact_sentence(first.atom, first.subject, first.value) in prefix
    assert bridge.steps[1].subject == first.value


def test_top_k_bounds_each_block(questions_and_documents):
    _, evaluation, documents = questions_and_documents
    question = evaluation[0]
    for top_k in (1, 3):
        for step in question.steps:
            query = templates.ATOMS[step.atom][1].format(x=step.subject)
            passages = documents.block_passages(step, query, top_k)
            assert passages[0] == documents.gold(step) and len(passages) <= top_k
            assert len(set(passages)) == len(passages)


def test_score_is_f1_of_the_extracted_answer():
    assert reading.score([" x </think>\n\n<answer> Abc Def </answer>", "no answer here"],
                         ["Abc Def", "Abc"]) == [1.0, 0.0]
    assert reading.score(["<answer> Abc </answer>"], ["Abc Def"])[0] == pytest.approx(2 / 3)


def test_reading_and_closed_book_f1_are_in_range(world_paths, questions_and_documents):
    train, evaluation, documents = questions_and_documents
    model = hf_io.load_pretrained(world_paths.model_dir)
    tokenizer = hf_io.load_tokenizer(world_paths.model_dir)
    eos_ids = hf_io.eos_token_ids(world_paths.model_dir, tokenizer)
    questions = evaluation[:NUM_SCORED // 2] + train[:NUM_SCORED // 2]
    f1, texts = reading.reading_f1(model, tokenizer, questions, documents, eos_ids,
                                   max_new_tokens=32, batch_size=NUM_SCORED)
    assert 0.0 <= f1 <= 1.0 and len(texts) == len(questions)
    for text in texts:
        assert text.count("</answer>") <= 1 and (
            "</answer>" not in text or text.endswith("</answer>"))
    f1, texts = reading.closed_book_f1(model, tokenizer, questions, eos_ids, max_new_tokens=16,
                                       batch_size=NUM_SCORED)
    assert 0.0 <= f1 <= 1.0 and len(texts) == len(questions)
