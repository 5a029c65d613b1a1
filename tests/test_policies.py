"""The policy comparison: forced prefixes, retrieval counting and the per-group table,
against hand-computed numbers; and the four policies through the real rollout."""
import numpy as np
import pytest

from searcher_jax import evaluation, policies
from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY
from searcher_jax.data.questions import Question
from searcher_jax.retrieval.passage import Passage, documents_block


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


def test_rag_searches_the_cleaned_question_once_and_inserts_its_block():
    retriever = _Lookup({"Who is X?": [_passage("X"), _passage("Y")]})
    policy = policies.Policy("rag", policies.RAG, rag_opening=" Let me search.\n\n")
    text, passages = policies.forced_prefix(policy, 'Who  is "X"?', retriever, top_k=2)
    assert retriever.calls == [(["Who is X?"], 2)]
    assert [p.title for p in passages] == ["X", "Y"]
    assert text == (f" Let me search.\n\n{BEGIN_QUERY} Who is X?{END_QUERY}"
                    + documents_block(passages))


def test_naive_and_search_policies_force_no_retrieval():
    retriever = _Lookup({})
    naive = policies.Policy("naive", policies.NAIVE, naive_opening=" The answer is")
    assert policies.forced_prefix(naive, "Q?", retriever, 3) == (" The answer is", [])
    assert policies.forced_prefix(policies.Policy("s", policies.SEARCH), "Q?", retriever,
                                  3) == ("", [])
    assert retriever.calls == []


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


def test_four_policies_through_the_rollout(world_model_dir):
    """The synthetic base model under each policy: naive never retrieves, RAG retrieves
    exactly once (its forced search), and every record is scored."""
    from searcher_jax.model import hf_io
    from searcher_jax.retrieval.retriever import RetrieverConfig, make_retriever
    from searcher_jax.rl import rewards
    from searcher_jax.rollout import RolloutConfig
    from searcher_jax.sampling import sampler as sampling
    from searcher_jax.sampling import select, stop_strings
    from searcher_jax.rollout import STOP_STRINGS
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
    out = {}
    for policy in (policies.Policy("naive", policies.NAIVE, naive_opening=reading.CLOSED_BOOK),
                   policies.Policy("rag", policies.RAG, rag_opening=" I will search.\n\n"),
                   policies.Policy("search", policies.SEARCH)):
        out[policy.name] = policies.evaluate_policy(
            policy, sampler, tokenizer, retriever, questions, encode, 4,
            RolloutConfig(max_retrievals=2, top_k=1), rewards.RewardConfig(), eos_ids=eos_ids)
    assert [r.record.id for r in out["naive"]] == [q.id for q in questions]
    assert all(r.retrievals == 0 and not r.retrieved_titles for r in out["naive"])
    assert all(r.retrievals == 1 and len(r.retrieved_titles) == 1 for r in out["rag"])
    for records in out.values():
        assert all(0.0 <= r.record.f1 <= 1.0 for r in records)
    assert np.all([r.retrievals == len(r.record.queries) for r in out["search"]])
