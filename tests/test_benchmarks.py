"""The paper's evaluation: tables recomputed from the authors' released traces give the
published rows; several sets and the three methods through the world's model, whose records
recompute to the run's table; only the policy's own text is ever scored."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from searcher_jax import benchmarks, eval_tables, evaluation
from searcher_jax.data import prompts
from searcher_jax.data.prompts import documents_block
from searcher_jax.data.questions import Question
from searcher_jax.rl import rewards
from searcher_jax.rollout import Trajectories
from tests.conftest import REPO_ROOT

# (EM, CEM = ACC_R, F1, ACC_L) of the released outputs: SPEC section 6 for Qwen; the Llama
# rows' ACC_R / ACC_L are the paper's main table (.648/.746 and .504/.544).
PUBLISHED = {"hotpotqa_qwen": (0.580, 0.654, 0.719, 0.750),
             "2wiki_qwen": (0.554, 0.636, 0.637, 0.650),
             "bamboogle_qwen": (0.456, 0.528, 0.577, 0.544),
             "hotpotqa_llama": (0.584, 0.648, 0.706, 0.746),
             "bamboogle_llama": (0.440, 0.504, 0.571, 0.544)}


def _rounded(summary):
    return tuple(round(summary[k], 3) for k in ("em", "cem", "f1", "judge"))


def test_released_traces_give_the_published_rows(reference_dir):
    files = eval_tables.record_files([str(reference_dir / "r1searcher" / "eval_results")])
    table = eval_tables.table_of(eval_tables.group_rows(files))
    rows = table[eval_tables.TRACE_METHOD]
    assert {name: _rounded(summary) for name, summary in rows.items()} == PUBLISHED
    assert round(rows["hotpotqa_qwen"]["queries_per_question"], 2) == 2.11  # SPEC section 6
    assert rows["hotpotqa_qwen"]["judged"] == 500 and rows["bamboogle_qwen"]["answered"] == 1.0


def test_launch_evaluate_from_traces_prints_and_writes_the_table(reference_dir, tmp_path):
    traces = reference_dir / "r1searcher" / "eval_results"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "evaluate.py"),
         f"--from_traces={traces / 'hotpotqa_qwen.jsonl'},{traces / 'bamboogle_llama.jsonl'}",
         f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trace | 0.654 / 0.750 | 0.504 / 0.544 |" in result.stdout
    assert "| trace | 500 | 0.580 | 0.654 | 0.719 | 0.750 | 500 | 0 | 0 | 2.11 | 1.000 |" \
        in result.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    assert _rounded(saved["table"]["trace"]["bamboogle_llama"]) == PUBLISHED["bamboogle_llama"]
    assert (tmp_path / "results.md").read_text().startswith("# Evaluation")


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: invalid JSON"),
    ('["a list"]', "line 2: expected a JSON object"),
    ('{"question": "Q?", "answer": "A"}', "line 2: field 'pred_ans' must be a string"),
    ('{"question": "Q?", "answer": [], "pred_ans": "A"}', "line 2: field 'answer'"),
])
def test_a_bad_record_line_is_named_by_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q?", "answer": "A", "pred_ans": "A"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        eval_tables.read_records(path)


def test_verdicts_retrievals_and_answers_of_our_rows_and_the_authors():
    ours = {"question": "Q", "answer": ["Paris"], "pred_ans": " Paris ", "judge": True,
            "end_reason": "answer", "retrievals": 3}
    theirs = {"question": "Q", "answer": "Rome", "pred_ans": "Paris", "gpt4o_output": "False",
              "stop_reason_final": "finished",
              "gen_text_store": "<|begin_of_documents|>x<|end_of_documents|>" * 2}
    malformed = {**theirs, "gpt4o_output": "I cannot tell"}
    failed = {**ours, "judge": None, "judge_error": "timed out", "end_reason": "eos"}
    summary = eval_tables.summarize_rows([ours, theirs, malformed, failed])
    assert summary["em"] == 0.5 and summary["judge"] == 0.5   # 1 true of 2 judged
    assert (summary["judged"], summary["judge_malformed"], summary["judge_failed"]) == (2, 1, 1)
    assert summary["queries_per_question"] == (3 + 2 + 2 + 3) / 4
    assert summary["answered"] == 0.75


def test_acc_l_says_how_many_rows_it_judged():
    """ACC_L is over the judged rows: a malformed or failed verdict is left out of its
    denominator, and the paper-style cell says so ("judged n/N"), never silently."""
    ours = {"question": "Q", "answer": ["Paris"], "pred_ans": " Paris ", "judge": True}
    failed = {**ours, "judge": None, "judge_error": "timed out"}
    malformed = {**ours, "judge": None, "judge_reply": "Maybe"}
    partly = eval_tables.summarize_rows([ours, {**ours, "judge": False}, failed, malformed])
    fully = eval_tables.summarize_rows([ours, ours])
    markdown = eval_tables.paper_markdown({"search": {"partly": partly, "fully": fully}})
    assert "| search | 1.000 / 0.500 (judged 2/4) | 1.000 / 1.000 |" in markdown
    unjudged = eval_tables.summarize_rows([{k: v for k, v in ours.items() if k != "judge"}])
    assert eval_tables.paper_markdown({"search": {"x": unjudged}}).endswith(
        "| search | 1.000 / – |")   # no judge: no ACC_L, no count


def test_from_traces_never_writes_over_an_evaluation(tmp_path):
    """Without --out, --from_traces writes to runs/eval_from_traces, not runs/eval (where an
    evaluation writes its results by default)."""
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "mini.jsonl").write_text(json.dumps(
        {"question": "Q", "answer": "Paris", "pred_ans": "Paris"}) + "\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "evaluate.py"), f"--from_traces={traces}"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "eval_from_traces" / "results.json").exists()
    assert not (tmp_path / "runs" / "eval").exists()


class _CharTokenizer:
    """One token per character (its code point): decode is exact for any split."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_only_the_policys_own_text_is_scored():
    """A document that holds an answer span is not the policy's answer: rows scored from the
    rollout's loss mask, and stored traces with their document blocks dropped."""
    tok = _CharTokenizer()
    prompt = "Q: where? A: <think>"
    pieces = [(" I will search. <|begin_of_query|> x<|end_of_query|>", True),
              (documents_block(["Title: Paris Text: <answer> Paris </answer>"]), False),
              (" I do not know.", True)]
    text = prompt + "".join(p for p, _ in pieces)
    mask = np.array([False] * len(prompt) + [m for p, m in pieces for _ in p])
    tokens = np.array([tok.encode(text)], np.int32)
    trajectories = Trajectories(
        tokens=tokens, loss_mask=mask[None], sampler_logprobs=np.zeros(tokens.shape, np.float32),
        prompt_lengths=np.array([len(prompt)]), lengths=np.array([len(text)]),
        responses=[text[len(prompt):]], queries=[["x"]], end_reasons=["segment_limit"],
        overshoot_mismatches=np.zeros(1, np.int32))
    question = Question("1", "where?", ("Paris",))
    [record] = evaluation.score_trajectories(trajectories, [question], tok,
                                             rewards.RewardConfig())
    assert record.pred_ans == evaluation.NO_ANSWER and record.cem == 0.0
    assert "<answer> Paris </answer>" in record.gen_text_store   # the record keeps it all
    # A stored trace (no mask): its document blocks are not read either.
    stored = evaluation.score_record(question, text[len(prompt):], ["x"], "segment_limit",
                                     rewards.RewardConfig())
    assert stored.pred_ans == evaluation.NO_ANSWER
    assert prompts.strip_documents("a<|begin_of_documents|>b<|end_of_documents|>c"
                                             "<|begin_of_documents|>open") == "ac"


def test_sets_and_methods_are_parsed_with_clear_errors(tmp_path):
    from configs import eval as eval_config
    config = eval_config.get_config()
    sets = benchmarks.parse_sets("", config)
    assert [s.name for s in sets] == ["hotpotqa", "2wiki", "musique", "bamboogle"]
    assert [s.name for s in benchmarks.parse_sets("twowiki,2wiki2=x.jsonl", config)] == [
        "2wiki", "2wiki2"]
    with pytest.raises(ValueError, match="neither a configured set"):
        benchmarks.parse_sets("nosuchset", config)
    with pytest.raises(ValueError, match="choose from"):
        benchmarks.parse_methods("naive,oracle")
    assert benchmarks.parse_methods("search,naive,search") == ["search", "naive"]


class _StubJudge:
    """Calls every prediction correct."""
    name = "stub"

    def judge(self, prompts):
        from searcher_jax import judge
        return [judge.Outcome(True, reply="True") for _ in prompts]


class _Counting:
    """The run's retriever, counting the queries of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, k):
        self.calls.append(list(queries))
        return self.inner.search(queries, k)


def test_world_sets_with_three_methods_recompute_from_their_records(world_model_dir, tmp_path):
    from configs import demo
    from searcher_jax import run_config, trainer
    from searcher_jax.rollout import clean_query
    from searcher_jax.synthetic import reading
    config = demo.get_config()
    config.world.dir = str(world_model_dir)
    config.eval_rollout.max_retrievals = 2
    config.sampler.update(max_len=512, segment_len=96)
    config = trainer.resolve_world(config)
    sets = benchmarks.parse_sets(f"held_out={world_model_dir / 'world' / 'eval.jsonl'},"
                                 f"train={world_model_dir / 'world' / 'train.jsonl'}", config)
    parts, _ = trainer.build_parts(config, with_train_questions=False)
    table, calls = {}, {}
    for method in ("naive", "rag", "search"):
        counting = _Counting(parts.retriever)
        part, _ = benchmarks.evaluate_sets(parts, config, sets, [method], tmp_path, batch_size=4,
                                           limit=4, retriever_for=lambda s: counting,
                                           judge=_StubJudge() if method == "search" else None,
                                           progress=False)
        table.update(part)
        calls[method] = counting.calls
    assert calls["naive"] == []
    assert len(calls["rag"]) == 8 and all(len(q) == 1 for q in calls["rag"])  # 2 sets x 4
    rows = eval_tables.read_records(benchmarks.records_path(tmp_path, "held_out", "rag"))
    assert [r["retrievals"] for r in rows] == [1] * 4
    # Each RAG row names the documents its prompt held before the question: the passages of
    # the question searched once; nothing was forced after the prompt.
    top_k = run_config.eval_rollout_config(config).top_k
    for row in rows:
        passages = parts.retriever.search([clean_query(row["question"])], top_k)[0]
        assert row["prompt_documents"] == prompts.rag_question(
            "", [p.render() for p in passages])
        assert passages[0].render() in row["prompt_documents"] and row["forced_prefix"] == ""
    naive_rows = eval_tables.read_records(benchmarks.records_path(tmp_path, "train", "naive"))
    assert all(r["forced_prefix"] == reading.CLOSED_BOOK
               and r["prompt_documents"] == "" for r in naive_rows)
    recomputed = eval_tables.table_of(eval_tables.group_rows(
        eval_tables.record_files([str(tmp_path)])))
    assert recomputed == table
    assert set(table) == {"naive", "rag", "search"}
    assert all(set(by_set) == {"held_out", "train"} for by_set in table.values())
    assert table["naive"]["held_out"]["queries_per_question"] == 0.0
    assert table["search"]["train"]["judge"] == 1.0 and "judge" not in table["rag"]["train"]
    searched = eval_tables.read_records(benchmarks.records_path(tmp_path, "train", "search"))
    assert [r["retrievals"] for r in searched] == [len(r["queries"]) for r in searched]
