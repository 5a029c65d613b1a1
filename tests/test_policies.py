"""The policy comparison: what each policy puts around the question (RAG's documents before
it, naive's forced opening after the prompt), retrieval counting and the per-group table,
against hand-computed numbers; and the policies through the real rollout."""
import numpy as np
import pytest

from searcher_jax import evaluation, policies
from searcher_jax.data import prompts
from searcher_jax.data.prompts import BEGIN_DOCUMENTS, BEGIN_QUERY, END_DOCUMENTS
from searcher_jax.retrieval.passage import Passage


class _Lookup:
    """A retriever that returns the passages listed for each query."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return [self.table.get(q, [])[:k] for q in queries]


def _passage(title):
    return Passage(id=title, title=title, text=f" {title} is a town.", format="hotpot_abstract")


def _record(qid, f1, queries=()):
    return evaluation.Record(id=qid, question=f"q{qid}", answer=("a",), pred_ans="a",
                             gen_text_store="", queries=tuple(queries), end_reason="answer",
                             em=float(f1 == 1.0), cem=float(f1 == 1.0), f1=f1, format_ok=True)


def test_rag_searches_the_cleaned_question_once_and_puts_its_documents_before_it():
    retriever = _Lookup({"Who is X?": [_passage("X"), _passage("Y")]})
    question = 'Who  is "X"?'
    policy_in = policies.policy_input(policies.Policy("rag", policies.RAG), question, retriever,
                                      top_k=2)
    assert retriever.calls == [(["Who is X?"], 2)]
    assert [p.title for p in policy_in.passages] == ["X", "Y"]
    assert policy_in.forced == ""
    # The prompt's question slot is exactly prompts.rag_question's text, the record's
    # documents its part before the question.
    assert policy_in.documents + question == prompts.rag_question(
        question, ["Title: X Text:  X is a town.", "Title: Y Text:  Y is a town."])
    assert policy_in.documents == (f"{BEGIN_DOCUMENTS}\n(1)Title: X Text:  X is a town.\n"
                                   f"(2)Title: Y Text:  Y is a town.\n{END_DOCUMENTS}\n\n")


def test_naive_and_search_policies_retrieve_nothing_and_only_naive_forces_text():
    retriever = _Lookup({})
    naive = policies.Policy("naive", policies.NAIVE, naive_opening=" The answer is")
    assert policies.policy_input(naive, "Q?", retriever, 3) == policies.PolicyInput(
        forced=" The answer is")
    assert policies.policy_input(policies.Policy("s", policies.SEARCH), "Q?", retriever,
                                 3) == policies.PolicyInput()
    assert retriever.calls == []


@pytest.mark.parametrize("style", prompts.PROMPT_STYLES)
def test_rag_prompt_holds_the_documents_before_the_question_in_both_styles(reference_dir,
                                                                          style):
    """The documents sit in the question slot of either prompt style (after the instructions,
    before the question), and the prompt still ends with `<think>`: nothing follows it, so
    the model starts its reasoning itself."""
    from searcher_jax import trainer
    from searcher_jax.model import hf_io
    tokenizer = hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
    encode = trainer.encode_prompt_fn(tokenizer, style)
    question = "Which river flows through Zorbitania?"
    retriever = _Lookup({question: [_passage("Zorbitania")]})
    policy_in = policies.policy_input(policies.Policy("rag", policies.RAG), question, retriever,
                                      top_k=1)
    text = tokenizer.decode(policies.input_ids(policy_in, question, encode, tokenizer))
    user_turn = "User:" if style == "base" else "<|im_start|>user\n"
    passage = "Title: Zorbitania Text:  Zorbitania is a town."
    assert text.rindex(user_turn) < text.index(passage) < text.index(question)
    assert text.index(passage) > text.rindex(BEGIN_DOCUMENTS) > text.rindex(user_turn)
    assert text.endswith("<think>")
    after_question = text[text.index(question):]
    assert BEGIN_QUERY not in after_question and BEGIN_DOCUMENTS not in after_question
    # The bare question's prompt, with the documents added in its slot and nothing else.
    bare = tokenizer.decode(encode(question))
    assert text.replace(policy_in.documents, "", 1) == bare


def test_naive_opening_follows_the_prompt_as_the_models_own_text(reference_dir):
    from searcher_jax import trainer
    from searcher_jax.model import hf_io
    tokenizer = hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
    encode = trainer.encode_prompt_fn(tokenizer, "base")
    policy_in = policies.policy_input(
        policies.Policy("naive", policies.NAIVE, naive_opening=" I know it.</think>\n\n"),
        "Q?", _Lookup({}), 3)
    ids = policies.input_ids(policy_in, "Q?", encode, tokenizer)
    assert ids[:len(encode("Q?"))] == encode("Q?")
    assert tokenizer.decode(ids[len(encode("Q?")):]) == " I know it.</think>\n\n"


def test_a_policy_of_unknown_kind_or_a_naive_one_without_opening_is_refused():
    with pytest.raises(ValueError, match="kind"):
        policies.Policy("x", "oracle")
    with pytest.raises(ValueError, match="naive_opening"):
        policies.Policy("x", policies.NAIVE)


def test_table_groups_and_gold_retrieval_share_by_hand():
    gold = {"1": ["A"], "2": ["A", "B"], "3": ["C"]}
    groups = {"1": "single", "2": "bridge", "3": "single"}
    records = [
        policies.PolicyRecord(_record("1", 1.0, ["a"]), 1, frozenset({"A", "Z"})),
        policies.PolicyRecord(_record("2", 0.5, ["a", "b"]), 2, frozenset({"A"})),
        policies.PolicyRecord(_record("3", 0.0), 0, frozenset()),
    ]
    table = policies.table({"p": records}, groups, gold)
    assert list(table["p"]) == [policies.ALL, "single", "bridge"]
    everything = table["p"][policies.ALL]
    assert everything["f1"] == pytest.approx(0.5)
    assert everything["queries_per_question"] == pytest.approx(1.0)
    assert everything["gold_retrieved"] == pytest.approx(1 / 3)   # only question 1 has all
    assert table["p"]["single"]["f1"] == pytest.approx(0.5)
    assert table["p"]["single"]["gold_retrieved"] == pytest.approx(0.5)
    assert table["p"]["bridge"]["queries_per_question"] == pytest.approx(2.0)
    assert table["p"]["bridge"]["gold_retrieved"] == 0.0
    with pytest.raises(KeyError, match="without a group"):
        policies.table({"p": records}, {"1": "single"}, gold)


def test_four_policies_through_the_rollout(world_model_dir, monkeypatch):
    """The synthetic base model under each policy: naive never retrieves, RAG retrieves
    exactly once, the prompt the model saw holding the retrieved passage before the
    question, and every record is scored."""
    from searcher_jax.model import hf_io
    from searcher_jax.retrieval.retriever import RetrieverConfig, make_retriever
    from searcher_jax.rl import rewards
    from searcher_jax.rollout import RolloutConfig
    from searcher_jax.sampling import sampler as sampling
    from searcher_jax.sampling import select, stop_strings
    from searcher_jax.rollout import STOP_STRINGS, clean_query
    from searcher_jax.data import prompts
    from searcher_jax.data.questions import read_questions
    from searcher_jax.synthetic import reading

    model_dir = world_model_dir / "model"
    model = hf_io.load_pretrained(model_dir)
    tokenizer = hf_io.load_tokenizer(model_dir)
    table = stop_strings.stop_table_for_tokenizer(tokenizer, list(STOP_STRINGS),
                                                  vocab_size=model.config.vocab_size)
    config = sampling.SamplerConfig(max_len=768, segment_len=96, min_attend_bucket=128,
                                       select=select.SelectConfig(greedy=True))
    sampler = sampling.Sampler(sampling.sampling_copy(model, None), config, table, None)
    retriever = make_retriever(RetrieverConfig(backend="bm25",
                                               index_dir=str(world_model_dir / "index")))
    questions = read_questions(world_model_dir / "world" / "eval.jsonl")[:4]
    encode = lambda q: prompts.prompt_ids(tokenizer, q, "base")
    eos_ids = hf_io.eos_token_ids(model_dir, tokenizer)
    seen = {}   # policy name -> the prompt tokens of each row, as the rollout held them

    def recording_rollout(*args, **kwargs):
        trajectories = real_rollout(*args, **kwargs)
        seen[name] = [trajectories.tokens[row, :trajectories.prompt_lengths[row]].tolist()
                      for row in range(len(trajectories.end_reasons))]
        return trajectories

    real_rollout = evaluation.rollout
    monkeypatch.setattr(evaluation, "rollout", recording_rollout)
    out = {}
    for policy in (policies.Policy("naive", policies.NAIVE, naive_opening=reading.CLOSED_BOOK),
                   policies.Policy("rag", policies.RAG),
                   policies.Policy("search", policies.SEARCH)):
        name = policy.name
        out[name] = policies.evaluate_policy(
            policy, sampler, tokenizer, retriever, questions, encode, 4,
            RolloutConfig(max_retrievals=2, top_k=1), rewards.RewardConfig(), eos_ids=eos_ids)
    assert [r.record.id for r in out["naive"]] == [q.id for q in questions]
    assert all(r.retrievals == 0 and not r.retrieved_titles for r in out["naive"])
    assert all(r.retrievals == 1 and len(r.retrieved_titles) == 1 for r in out["rag"])
    for question, record, prompt in zip(questions, out["rag"], seen["rag"]):
        [passage] = retriever.search([clean_query(question.question)], 1)[0]
        assert record.retrieved_titles == {passage.title}
        seen_text = tokenizer.decode(prompt)
        assert seen_text.endswith("<think>")
        assert (seen_text.index(record.prompt_documents) < seen_text.index(passage.render())
                < seen_text.rindex(question.question))
        assert seen_text == tokenizer.decode(encode(record.prompt_documents + question.question))
    for question, record, prompt in zip(questions, out["search"], seen["search"]):
        assert record.prompt_documents == "" and record.forced == ""
        assert prompt == encode(question.question)
    assert all(r.forced == reading.CLOSED_BOOK and r.prompt_documents == ""
               for r in out["naive"])
    for records in out.values():
        assert all(0.0 <= r.record.f1 <= 1.0 for r in records)
    assert np.all([r.retrievals == len(r.record.queries) for r in out["search"]])
