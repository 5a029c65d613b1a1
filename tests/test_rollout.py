"""The search-augmented rollout on the world's tiny model: masks built at append time,
tokens equal to the sampler's, one search batch per round, overshoot and limits."""
import collections
import dataclasses
import time

import jax
import numpy as np
import pytest

from searcher_jax import rollout as rollout_lib
from searcher_jax.data import prompts
from searcher_jax.model import hf_io
from searcher_jax.retrieval import retriever as retriever_lib
from searcher_jax.retrieval.passage import Passage
from searcher_jax.sampling import sampler as sampling
from searcher_jax.sampling import stop_strings
from searcher_jax.synthetic import world_files

ROWS = 12


class RecordingRetriever:
    """The world's BM25 retriever, recording every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return self.inner.search(queries, k)


@pytest.fixture(scope="module")
def world(world_paths, world_policy):
    tokenizer, table, copy = (world_policy[k] for k in ("tokenizer", "table", "copy"))
    retriever = retriever_lib.make_retriever(retriever_lib.RetrieverConfig(
        backend="bm25", index_dir=str(world_paths.index_dir)))
    questions = world_files.read_jsonl(world_paths.eval_questions)[:ROWS]
    prompt_ids = [prompts.prompt_ids(tokenizer, q["question"], "base") for q in questions]

    def make_sampler(max_len=768, segment_len=128, **config):
        return sampling.Sampler(copy, sampling.SamplerConfig(max_len=max_len,
                                                             segment_len=segment_len, **config),
                                table)

    eos_ids = world_policy["eos_ids"]

    def run(sampler, retriever, config, key, prompt_ids=prompt_ids):
        return rollout_lib.rollout(sampler, tokenizer, retriever, prompt_ids, config, key,
                                   eos_ids=eos_ids)

    return dict(tokenizer=tokenizer, retriever=retriever, prompt_ids=prompt_ids, copy=copy,
                sampler=make_sampler(), make_sampler=make_sampler, run=run, eos_ids=eos_ids)


@pytest.fixture(scope="module")
def trajectories(world):
    recorder = RecordingRetriever(world["retriever"])
    out = world["run"](world["sampler"], recorder,
                       rollout_lib.RolloutConfig(max_retrievals=3, top_k=3), jax.random.key(0))
    return out, recorder.calls


def _inserted_blocks(out, b, tokenizer) -> list[str]:
    """The decoded runs of unmasked tokens inside row b's response."""
    p, n = out.prompt_lengths[b], out.lengths[b]
    response, mask = out.tokens[b, p:n], out.loss_mask[b, p:n]
    edges = np.flatnonzero(np.diff(np.concatenate([[1], mask.astype(int), [1]])))
    return [tokenizer.decode(response[s:e].tolist()) for s, e in zip(edges[::2], edges[1::2])]


def _assert_row_is_consistent(out, b, prompt, tokenizer, max_len):
    """Row b holds its prompt, sampled tokens (masked, with log-probs) and whole document
    blocks (unmasked), and nothing at or past its length, which is within the buffer."""
    n, p = out.lengths[b], out.prompt_lengths[b]
    assert n <= max_len
    assert out.tokens[b, :p].tolist() == prompt
    assert not out.loss_mask[b, :p].any() and not out.loss_mask[b, n:].any()
    assert (out.tokens[b, n:] == 0).all() and (out.sampler_logprobs[b, n:] == 0).all()
    # A sampled token's log-prob is <= 0; it rounds to exactly 0 in float32 where the model
    # is sure of it (the base model is, on the prompt's fixed wording).
    assert (out.sampler_logprobs[b][out.loss_mask[b]] <= 0).all()
    assert (out.sampler_logprobs[b][~out.loss_mask[b]] == 0).all()
    inserted = _inserted_blocks(out, b, tokenizer)
    assert len(inserted) == len(out.queries[b])
    for text in inserted:
        assert text.lstrip("\n").startswith(prompts.BEGIN_DOCUMENTS)
        assert text.endswith(prompts.END_DOCUMENTS + "\n\n")
    if n > p and out.end_reasons[b] != "truncated":
        assert out.loss_mask[b, n - 1]  # a row that ended by itself ends on a sampled token


def test_loss_mask_is_exactly_the_sampled_tokens(world, trajectories):
    out, _ = trajectories
    assert out.tokens.shape == out.loss_mask.shape == out.sampler_logprobs.shape
    for b, prompt in enumerate(world["prompt_ids"]):
        _assert_row_is_consistent(out, b, prompt, world["tokenizer"], 768)


def test_responses_decode_from_the_tokens_and_read_as_the_spec(world, trajectories):
    out, _ = trajectories
    tokenizer = world["tokenizer"]
    for b in range(ROWS):
        ids = out.tokens[b, out.prompt_lengths[b]:out.lengths[b]].tolist()
        if out.end_reasons[b] == "eos":
            assert ids[-1] in world["eos_ids"]
            ids = ids[:-1]
        assert tokenizer.decode(ids) == out.responses[b]
        # Each query tag is followed by exactly the spec's continuation.
        joined = f"{prompts.END_QUERY}\n\n{prompts.BEGIN_DOCUMENTS}\n"
        assert out.responses[b].count(joined) == len(out.queries[b])
    assert out.overshoot_mismatches.sum() == 0
    assert set(out.end_reasons) <= set(rollout_lib.END_REASONS)


def test_one_search_per_round_with_every_paused_query(trajectories):
    out, calls = trajectories
    assert calls, "the tiny model should write at least one query in 12 samples"
    assert all(k == 3 for _, k in calls)
    searched = collections.Counter(q for queries, _ in calls for q in queries)
    inserted = collections.Counter(q for row in out.queries for q in row)
    # A query whose documents would overflow the buffer is searched, not inserted, and
    # ends its row short of the buffer's end.
    assert inserted <= searched
    cut_short = sum(r == "truncated" and n < 768 for r, n in zip(out.end_reasons, out.lengths))
    assert sum((searched - inserted).values()) == cut_short
    assert len(calls) <= 3  # max_retrievals rounds at most
    metrics = out.metrics()
    assert metrics["queries_per_row"] == pytest.approx(sum(inserted.values()) / ROWS)
    assert sum(metrics[f"end_{r}"] for r in rollout_lib.END_REASONS) == pytest.approx(1.0)


def test_same_key_same_trajectories(world, trajectories):
    out, _ = trajectories
    again = world["run"](world["sampler"], world["retriever"], rollout_lib.RolloutConfig(3, 3),
                         jax.random.key(0))
    np.testing.assert_array_equal(again.tokens, out.tokens)
    np.testing.assert_array_equal(again.loss_mask, out.loss_mask)
    assert again.responses == out.responses


def test_no_retrievals_left_ends_rows_at_their_query(world):
    recorder = RecordingRetriever(world["retriever"])
    out = world["run"](world["sampler"], recorder, rollout_lib.RolloutConfig(max_retrievals=0),
                       jax.random.key(0))
    assert recorder.calls == []
    assert all(q == [] for q in out.queries)
    assert "retrieval_limit" in out.end_reasons  # the model queries first in most samples


@pytest.mark.parametrize("room", [40, 160])
def test_a_full_buffer_truncates_and_keeps_the_mask_consistent(world, room):
    """Rows run out of buffer while sampling (room 40) or at a document insert (room 160):
    either way every row holds whole blocks only, and nothing past its end is scored."""
    max_len = max(map(len, world["prompt_ids"])) + room
    sampler = world["make_sampler"](max_len=max_len, segment_len=64)
    out = world["run"](sampler, world["retriever"], rollout_lib.RolloutConfig(max_retrievals=3),
                       jax.random.key(1))
    assert "truncated" in out.end_reasons
    for b, prompt in enumerate(world["prompt_ids"]):
        _assert_row_is_consistent(out, b, prompt, world["tokenizer"], max_len)
        if out.end_reasons[b] == "truncated" and out.lengths[b] < max_len:
            # Stopped short of the end: its next block would not fit, so it ends on the query
            # the policy sampled, and the reward goes on that token.
            assert out.loss_mask[b, out.lengths[b] - 1]
            assert _last_token_completes_a_query(out, b, world["tokenizer"])


def _last_token_completes_a_query(out, b, tokenizer) -> bool:
    ids = out.tokens[b, out.prompt_lengths[b]:out.lengths[b]].tolist()
    before, after = tokenizer.decode(ids[:-1]), tokenizer.decode(ids)
    return after.count(prompts.END_QUERY) == before.count(prompts.END_QUERY) + 1


class LongPassages:
    """A retriever whose every passage is longer than the buffer has left."""

    def search(self, queries, k):
        return [[Passage(id=str(i), title=f"Long {i}", text="many words " * 150,
                         format="hotpot_abstract") for i in range(k)] for _ in queries]


def test_documents_that_do_not_fit_whole_are_not_inserted(world):
    out = world["run"](world["sampler"], LongPassages(), rollout_lib.RolloutConfig(max_retrievals=3),
                       jax.random.key(0))
    cut = [b for b in range(ROWS) if out.end_reasons[b] == "truncated"]
    assert cut, "the tiny model should write a query in some of 12 samples"
    for b in cut:
        p, n = out.prompt_lengths[b], out.lengths[b]
        assert out.queries[b] == [] and n < 768
        assert out.loss_mask[b, p:n].all()  # only what the policy sampled
        assert prompts.BEGIN_DOCUMENTS not in out.responses[b]
        assert _last_token_completes_a_query(out, b, world["tokenizer"])
    assert out.metrics()["end_truncated"] == len(cut) / ROWS


def test_the_sampler_must_stop_at_the_rollout_tags(world):
    tokenizer = world["tokenizer"]
    table = stop_strings.stop_table_for_tokenizer(tokenizer, ["</answer>"],
                                                  vocab_size=world["copy"].config.vocab_size)
    wrong = sampling.Sampler(world["copy"], sampling.SamplerConfig(max_len=64), table)
    with pytest.raises(ValueError, match="must stop at"):
        world["run"](wrong, world["retriever"], rollout_lib.RolloutConfig(), jax.random.key(0))


@pytest.mark.parametrize("segment, query, overshoot", [
    ("I will search. <|begin_of_query|> Fezeith \"Academy\"  founded<|end_of_query|>\n\n",
     "Fezeith Academy founded", "\n\n"),
    ("<|begin_of_query|>a<|end_of_query|>", "a", ""),
    ("no opening tag<|end_of_query|>", None, ""),
    ("<|begin_of_query|>   <|end_of_query|>>", "", ">"),
])
def test_split_at_query(segment, query, overshoot):
    assert rollout_lib.split_at_query(segment) == (query, overshoot)


def test_insert_text_continues_the_overshoot_or_inserts_the_whole_block():
    block = prompts.documents_block(["Title: A Text: b"])
    assert rollout_lib.insert_text(block, "\n\n") == (block[2:], True)
    assert rollout_lib.insert_text(block, "") == (block, True)
    assert rollout_lib.insert_text(block, " and") == (block, False)


def test_qwen_overshoot_token_reads_as_the_spec(reference_dir):
    """With Qwen2.5, `|>\\n\\n` is `|` + `>\\n\\n`: the policy's token already holds the
    block's first newlines, and the insert continues after them."""
    qwen_tokenizer = hf_io.load_tokenizer(reference_dir / "tokenizers" / "qwen2.5")
    sampled = qwen_tokenizer.encode("<|begin_of_query|> Paris mayor<|end_of_query|>\n\n",
                                    add_special_tokens=False)
    text = qwen_tokenizer.decode(sampled)
    query, overshoot = rollout_lib.split_at_query(text)
    assert (query, overshoot) == ("Paris mayor", "\n\n")
    block = prompts.documents_block(["Title: Paris Text: x"])
    insert, fitted = rollout_lib.insert_text(block, overshoot)
    assert fitted
    whole = qwen_tokenizer.decode(sampled + qwen_tokenizer.encode(insert, add_special_tokens=False))
    assert whole == "<|begin_of_query|> Paris mayor<|end_of_query|>" + block


def test_a_row_ends_at_any_of_the_models_eos_ids(world, trajectories):
    """An instruct model has several end-of-sequence ids; here the token the policy samples
    most often plays the second one: no row samples past it, and a row that writes it ends."""
    out, _ = trajectories
    sampled = np.concatenate([out.tokens[b][out.loss_mask[b]] for b in range(ROWS)])
    values, counts = np.unique(sampled, return_counts=True)
    second = int(values[np.argmax(counts)])
    eos_ids = (*world["eos_ids"], second)
    again = rollout_lib.rollout(world["sampler"], world["tokenizer"], world["retriever"],
                                world["prompt_ids"], rollout_lib.RolloutConfig(3, 3),
                                jax.random.key(0), eos_ids=eos_ids)
    ended_there = 0
    for b in range(ROWS):
        tokens = again.tokens[b][again.loss_mask[b]]
        assert not np.isin(tokens[:-1], eos_ids).any()  # nothing sampled after an end
        if again.end_reasons[b] == "eos":
            assert tokens[-1] in eos_ids
            ended_there += tokens[-1] == second
        else:
            assert len(tokens) == 0 or tokens[-1] not in eos_ids
    assert ended_there >= 1, f"token {second} was sampled {counts.max()} times before"


def test_rows_in_groups_give_the_trajectories_of_one_call(world, trajectories):
    """rollout.sampler_rows: the sampler decodes 4 rows at a time (a KV cache of 4 rows), and
    the batch's trajectories are those of one call with every row."""
    out, calls = trajectories
    assert len(out.tokens) == ROWS == 12 and len(calls) > 1
    grouped = world["run"](world["sampler"], world["retriever"],
                           rollout_lib.RolloutConfig(max_retrievals=3, top_k=3, sampler_rows=4),
                           jax.random.key(0))
    assert grouped.tokens.shape == out.tokens.shape
    np.testing.assert_array_equal(grouped.tokens, out.tokens)
    np.testing.assert_array_equal(grouped.loss_mask, out.loss_mask)
    np.testing.assert_array_equal(grouped.sampler_logprobs, out.sampler_logprobs)
    assert grouped.queries == out.queries and grouped.end_reasons == out.end_reasons
    with pytest.raises(ValueError, match="sampler_rows=5 does not divide the 12 rows"):
        world["run"](world["sampler"], world["retriever"],
                     rollout_lib.RolloutConfig(sampler_rows=5), jax.random.key(0))


CONTINUOUS = rollout_lib.RolloutConfig(max_retrievals=3, top_k=3, sampler_rows=4,
                                       schedule="continuous", decode_steps=16)


def _same_trajectories(a, b, logprob_atol=0.0):
    for name in ("tokens", "loss_mask", "lengths", "prompt_lengths", "overshoot_mismatches"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.queries == b.queries and a.end_reasons == b.end_reasons
    assert a.responses == b.responses
    np.testing.assert_allclose(a.sampler_logprobs, b.sampler_logprobs, rtol=0, atol=logprob_atol)


def test_the_continuous_schedule_gives_the_barrier_trajectories(world, trajectories):
    """rollout.schedule=continuous: 12 rows through 4 slots, 16 tokens a call. Rows pause at
    different calls, search on a host thread while the others decode, resume at a later call
    than their neighbours, and a slot whose row ended takes the next prompt; the trajectories
    are the barrier schedule's (all 12 rows in one round-by-round call). The log-probs agree
    to a few 1e-6, not bit for bit: XLA's matmuls round a row's sums by the row count of the
    whole call (on CPU, four classes of row count were measured), and the last rows decode
    in fewer slots (compaction); with no compaction these 12 rows agreed bit for bit, but at
    64 slots the extends' shapes differ too (see the README's rollout benchmark)."""
    barrier, barrier_calls = trajectories
    recorder = RecordingRetriever(world["retriever"])
    out = world["run"](world["sampler"], recorder, CONTINUOUS, jax.random.key(0))
    _same_trajectories(out, barrier, logprob_atol=1e-5)
    for b in range(ROWS):
        _assert_row_is_consistent(out, b, world["prompt_ids"][b], world["tokenizer"], 768)
    # Searches went out at several boundaries, not one round: each call holds the rows that
    # paused at one boundary, and the calls hold every query once.
    assert len(recorder.calls) > len(barrier_calls)
    assert sorted(q for queries, _ in recorder.calls for q in queries) == sorted(
        q for row in barrier.queries for q in row)
    utilisation = out.metrics()["slot_utilisation"]
    assert 0 < utilisation <= 1
    assert world["sampler"].traces["reset"] >= 1  # freed slots took the next prompts


class SlowRetriever(RecordingRetriever):
    """The world's BM25 retriever, answering each call delay_s late (a search service on the
    network)."""

    def __init__(self, inner, delay_s):
        super().__init__(inner)
        self.delay_s = delay_s

    def search(self, queries, k):
        time.sleep(self.delay_s)
        return super().search(queries, k)


def test_rows_waiting_for_documents_leave_their_slots_and_return_unchanged(world, trajectories,
                                                                           monkeypatch):
    """rollout.parked_rows=2, each search 0.3 s late: rows that wait for their documents move
    off the 4 decode slots (KV cache and all) so the next prompts can start, and move back
    into a free slot once their documents are in. Every trajectory is still the barrier
    schedule's (log-probs within 1e-5, as above)."""
    barrier, _ = trajectories
    sampler, moves = world["sampler"], []
    move = sampler.move

    def recording_move(source, target, source_rows, target_rows):
        moves.append((source.tokens.shape[0], target.tokens.shape[0], len(source_rows)))
        return move(source, target, source_rows, target_rows)
    monkeypatch.setattr(sampler, "move", recording_move)
    out = world["run"](sampler, SlowRetriever(world["retriever"], 0.3),
                       dataclasses.replace(CONTINUOUS, parked_rows=2), jax.random.key(0))
    _same_trajectories(out, barrier, logprob_atol=1e-5)
    for b in range(ROWS):
        _assert_row_is_consistent(out, b, world["prompt_ids"][b], world["tokenizer"], 768)
    parked = sum(n for source, target, n in moves if (source, target) == (4, 2))
    returned = sum(n for source, target, n in moves if (source, target) == (2, 4))
    # Every parked row came back: no row's documents overflowed its buffer here.
    assert "truncated" not in out.end_reasons
    assert parked >= 1 and returned == parked, moves


def test_a_single_slot_parks_its_waiting_row_rather_than_wait(world, monkeypatch):
    """One slot, 2 parked rows, searches 0.3 s late: when the one row pauses, it parks and
    the next prompt starts, rather than the host waiting for the search with prompts queued
    (the loop once waited there, as no slot was free). Same trajectories as the barrier's."""
    sampler, calls = world["sampler"], collections.Counter()
    move = sampler.move

    def counting_move(source, target, source_rows, target_rows):
        calls[(source.tokens.shape[0], target.tokens.shape[0])] += len(source_rows)
        return move(source, target, source_rows, target_rows)
    monkeypatch.setattr(sampler, "move", counting_move)
    prompt_ids = world["prompt_ids"][:4]
    out = world["run"](sampler, SlowRetriever(world["retriever"], 0.3),
                       dataclasses.replace(CONTINUOUS, sampler_rows=1, parked_rows=2),
                       jax.random.key(0), prompt_ids=prompt_ids)
    barrier = world["run"](sampler, world["retriever"], rollout_lib.RolloutConfig(3, 3),
                           jax.random.key(0), prompt_ids=prompt_ids)
    _same_trajectories(out, barrier, logprob_atol=1e-5)
    assert calls[(1, 2)] >= 2 and calls[(2, 1)] == calls[(1, 2)], calls


def test_a_batch_invariant_sampler_gives_both_schedules_bit_for_bit(world, trajectories):
    """SamplerConfig.batch_invariant: the barrier schedule in groups of 4 rows and the
    continuous one through 4 slots (2 parked rows, searches 0.05 s late, so rows pause,
    park and resume at other calls than in the barrier's rounds) give the same tokens,
    masks, queries and log-probs, bit for bit. The mode samples what the default sampler
    does: the same tokens, log-probs within 1e-5 (on this float32 model)."""
    sampler = world["make_sampler"](batch_invariant=True)
    barrier = world["run"](sampler, world["retriever"],
                           rollout_lib.RolloutConfig(max_retrievals=3, top_k=3, sampler_rows=4),
                           jax.random.key(0))
    out = world["run"](sampler, SlowRetriever(world["retriever"], 0.05),
                       dataclasses.replace(CONTINUOUS, parked_rows=2), jax.random.key(0))
    _same_trajectories(out, barrier)
    assert sampler.traces["move"] >= 1 and sampler.traces["compact"] == 0
    _same_trajectories(barrier, trajectories[0], logprob_atol=1e-5)


def test_prompts_that_fill_the_buffer_alone_end_truncated_in_both_schedules(world):
    """Both slots of the first refill get a prompt longer than the buffer: they end at once
    ("truncated"), no row is left held, and the continuous schedule still admits the prompts
    behind them; every row is the barrier schedule's."""
    long = list(world["prompt_ids"][0]) * 8  # > 768 tokens
    prompt_ids = [long, long] + world["prompt_ids"][:2]
    config = rollout_lib.RolloutConfig(max_retrievals=3, top_k=3, sampler_rows=2)
    barrier = world["run"](world["sampler"], world["retriever"], config, jax.random.key(0),
                           prompt_ids=prompt_ids)
    out = world["run"](world["sampler"], world["retriever"],
                       dataclasses.replace(config, schedule="continuous", decode_steps=16),
                       jax.random.key(0), prompt_ids=prompt_ids)
    assert out.end_reasons[:2] == ["truncated", "truncated"] == barrier.end_reasons[:2]
    assert "truncated" not in out.end_reasons[2:]
    _same_trajectories(out, barrier, logprob_atol=1e-5)


def test_a_long_continuous_rollout_compiles_a_fixed_set_of_programs(world):
    """24 trajectories (6 waves through 4 slots), then 24 more, compile no more programs than
    the sampler's buckets allow, a number set by its config and the slots alone: for each
    state size (4 slots, and 2 and 1 once the last rows are compacted), decode at each attend
    window, extend at each chunk x attend window x row count, window and finish; reset once,
    compact once per pair of sizes, and move into 2 parked rows and back into each size
    (searches answered 0.05 s late, so rows do park)."""
    sampler = world["make_sampler"]()
    config = sampler.config
    reach = range(1, config.max_len + 1)
    attend = {sampling.attend_bucket(n, config.min_attend_bucket, config.max_len) for n in reach}
    extend_attend = {sampling.power_of_two_bucket(n, config.min_attend_bucket, config.max_len)
                     for n in reach}
    chunks = {sampling.extend_chunk(n, config.min_extend_bucket, config.max_extend_chunk)
              for n in reach}
    sizes = (4, 2, 1)
    row_counts = {size: {n for n in (1, 2, 4) if n <= size} for size in sizes}
    bound = sum(len(attend) + len(chunks) * len(extend_attend) * len(row_counts[size]) + 2
                for size in sizes) + 1 + 3 + 1 + len(sizes)
    config = dataclasses.replace(CONTINUOUS, parked_rows=2)
    retriever = SlowRetriever(world["retriever"], 0.05)
    for key in (1, 2):
        out = world["run"](sampler, retriever, config, jax.random.key(key),
                           prompt_ids=world["prompt_ids"] * 2)
        assert len(out.end_reasons) == 24 and None not in out.end_reasons
        assert sampler.num_compiled <= bound, sampler.traces
        print(f"after {24 * key} trajectories: {sampler.num_compiled} programs "
              f"({dict(sampler.traces)}), bound {bound}")
    assert sampler.traces["compact"] >= 1  # the last rows did move into fewer slots
    assert sampler.traces["move"] >= 2  # rows parked and came back
