"""Pathological policy text (issue 20, item 2): a policy that writes no tags, a query in every
segment, a giant query, bytes that are not UTF-8, tags in the wrong places, and documents full
of tags. The rollout stays within its limits (rounds, retrievals, query length, segment and
buffer lengths) and every reward recipe gives a reward in its range, without an exception.

A scripted sampler plays the policy, byte by byte (token id = byte, 256 = EOS), with the real
sampler's contract: a segment ends at the end of a stop string (matched on the sampled bytes,
across token boundaries), at EOS, after segment_len tokens, or at a full buffer."""
import dataclasses

import jax
import numpy as np
import pytest

from searcher_jax import rollout as rollout_lib
from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY
from searcher_jax.retrieval.passage import Passage
from searcher_jax.rl import rewards
from searcher_jax.sampling.sampler import Segment
from searcher_jax.sampling.state import FINISHED, PAUSED, RUNNING, TRUNCATED

EOS = 256
MAX_LEN, SEGMENT_LEN = 8192, 2048
CONFIG = rollout_lib.RolloutConfig(max_retrievals=3, top_k=2, max_query_chars=100)
Q, EQ = BEGIN_QUERY.encode(), END_QUERY.encode()


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):  # as a byte-level BPE decoder: invalid UTF-8 becomes U+FFFD
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclasses.dataclass
class State:
    tokens: np.ndarray  # [B, T] int32
    logprobs: np.ndarray  # [B, T] float32
    cursor: np.ndarray  # [B] int32
    status: np.ndarray  # [B] int32
    segment_start: np.ndarray  # [B] int32
    stop_id: np.ndarray  # [B] int32


class ScriptedSampler:
    """Row b's k-th segment samples the bytes of scripts[b][k]; a script that runs out (or a
    segment that ends without a stop) samples EOS next."""
    stop_strings = rollout_lib.STOP_STRINGS

    def __init__(self, scripts: list[list[bytes]]):
        self.config = type("Config", (), {"max_len": MAX_LEN, "segment_len": SEGMENT_LEN})
        self.scripts = scripts
        self.decodes = 0
        self.segment_tokens = []  # tokens each row sampled in each segment
        self.sampled = np.zeros(len(scripts), np.int64)  # tokens each row sampled in all

    def init(self, batch, eos_ids, key, row_ids=None):
        del eos_ids, key, row_ids
        self._next = [0] * batch
        return State(np.zeros((batch, MAX_LEN), np.int32), np.zeros((batch, MAX_LEN), np.float32),
                     np.zeros(batch, np.int32), np.full(batch, FINISHED, np.int32),
                     np.zeros(batch, np.int32), np.full(batch, -1, np.int32))

    def extend(self, state, rows):
        for b, row in enumerate(rows):
            if len(row):
                n = min(len(row), MAX_LEN - state.cursor[b])
                state.tokens[b, state.cursor[b]:state.cursor[b] + n] = row[:n]
                state.cursor[b] += n
                fits = n == len(row) and state.cursor[b] < MAX_LEN
                state.status[b] = RUNNING if fits else TRUNCATED
        return state

    def decode(self, state):
        running = np.flatnonzero(state.status == RUNNING)
        assert len(running), "decode with no running row"
        self.decodes += 1
        state.segment_start = state.cursor.copy()
        for b in running:
            k, self._next[b] = self._next[b], self._next[b] + 1
            planned = list(self.scripts[b][k]) if k < len(self.scripts[b]) else []
            planned.append(EOS)  # what a segment samples after its script
            written = b""
            for token in planned[:SEGMENT_LEN]:
                state.tokens[b, state.cursor[b]] = token
                state.logprobs[b, state.cursor[b]] = -1.0
                state.cursor[b] += 1
                if token == EOS:
                    state.status[b] = FINISHED
                    break
                written += bytes([token])
                stops = [i for i, s in enumerate(self.stop_strings) if written.endswith(s.encode())]
                if stops:
                    state.status[b], state.stop_id[b] = PAUSED, stops[0]
                    break
                if state.cursor[b] >= MAX_LEN:
                    state.status[b] = TRUNCATED
                    break
            self.segment_tokens.append(int(state.cursor[b] - state.segment_start[b]))
            self.sampled[b] += self.segment_tokens[-1]
        return state, Segment(status=state.status.copy(), stop_id=state.stop_id.copy(),
                              overshoot=np.zeros_like(state.cursor),
                              segment_start=state.segment_start.copy(),
                              cursor=state.cursor.copy())

    def new_tokens(self, state, segment, rows):
        return {int(b): (state.tokens[b, segment.segment_start[b]:segment.cursor[b]].copy(),
                         state.logprobs[b, segment.segment_start[b]:segment.cursor[b]].copy())
                for b in rows}

    def finish(self, state, rows):
        state.status[np.asarray(rows, np.int64)] = FINISHED
        return state


class Retriever:
    def __init__(self, passages):
        self.passages, self.calls = passages, []

    def search(self, queries, k):
        self.calls.append(list(queries))
        return [self.passages[:k] for _ in queries]


CLEAN = [Passage("1", "Paris", "Paris is the capital of France.", "hotpot_abstract"),
         Passage("2", "Lyon", "Lyon is a city.", "hotpot_abstract")]
# Passages that quote every tag: inserted, so they neither stop a row nor count as answers.
TAGGED = [Passage("1", "</answer> <answer>", f"{END_QUERY} {BEGIN_QUERY} x <answer>no</answer>",
                  "hotpot_abstract"),
          Passage("2", "<|end_of_documents|>", "<|begin_of_documents|>\n(1) </think> assistant",
                  "raw")]

# (name, the segments the policy writes, the end reason it must get)
POLICIES = [
    ("no tags", [b"I think " * 300], "segment_limit"),
    ("a query in every segment", [b" " + Q + b" q%d " % k + EQ for k in range(20)],
     "retrieval_limit"),
    ("a giant query", [Q + b"word " * 300 + EQ], "long_query"),
    ("a query just at the limit", [Q + b"x" * 100 + EQ, b"<answer>x</answer>"], "answer"),
    ("bytes that are not UTF-8", [Q + b" caf\xc3 \xff\xfe\x80 q" + EQ,
                                  b"\x80\x80<answer>\xff\xfe</answer>"], "answer"),
    ("a lone end tag", [b"text" + EQ], "no_query"),
    ("an empty query", [Q + b'  " " ' + EQ], "empty_query"),
    ("nested begin tags", [Q + Q + b"a" + EQ, b"</answer>"], "answer"),
    ("tags out of order", [b"</answer>" + EQ + b"<answer>"], "answer"),
    ("documents written by the policy", [b"<|begin_of_documents|>\n(1)fake<|end_of_documents|>"
                                         b"\n\n<answer>x</answer>"], "answer"),
    ("EOS at once", [b""], "eos"),
]


@pytest.fixture(scope="module", params=[CLEAN, TAGGED], ids=["clean documents", "tagged documents"])
def played(request):
    sampler = ScriptedSampler([script for _, script, _ in POLICIES])
    retriever = Retriever(request.param)
    prompts = [ByteTokenizer().encode("Question: who?\n")] * len(POLICIES)
    out = rollout_lib.rollout(sampler, ByteTokenizer(), retriever, prompts, CONFIG,
                              jax.random.key(0), eos_ids=[EOS])
    return out, sampler, retriever


def test_every_row_ends_for_its_reason_within_the_limits(played):
    out, sampler, retriever = played
    assert out.end_reasons == [reason for _, _, reason in POLICIES]
    assert sampler.decodes <= CONFIG.max_retrievals + 1
    assert len(retriever.calls) <= CONFIG.max_retrievals
    assert max(sampler.segment_tokens) <= SEGMENT_LEN
    assert all(len(q) <= CONFIG.max_query_chars for call in retriever.calls for q in call)
    assert all(len(q) <= CONFIG.max_retrievals for q in out.queries)
    assert out.num_queries.tolist() == [0, 3, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert out.queries[3] == ["x" * 100] and out.queries[7] == ["a"]
    assert "\ufffd" in out.queries[4][0]  # the bad bytes reached the retriever as U+FFFD
    assert out.lengths.max() <= MAX_LEN
    # The mask covers exactly what the policy sampled; nothing is trained on documents.
    np.testing.assert_array_equal(out.loss_mask.sum(1), sampler.sampled)
    assert sampler.sampled[0] == SEGMENT_LEN  # the tagless row: one whole segment, no more
    metrics = out.metrics()
    assert sum(metrics[f"end_{r}"] for r in rollout_lib.END_REASONS) == pytest.approx(1.0)


@pytest.mark.parametrize("config", [
    rewards.RewardConfig(recipe="answer", format_penalty=-2.0),
    rewards.RewardConfig(recipe="answer", answer_metric="cem", strict_format=False,
                         format_penalty=-1.0),
    rewards.RewardConfig(recipe="retrieval_format"),
    rewards.RewardConfig(recipe="cem_retrieval_format"),
], ids=lambda c: f"{c.recipe}/{c.answer_metric}")
def test_rewards_of_pathological_responses_stay_in_range(played, config):
    out, _, _ = played
    low, high = rewards.reward_bounds(config)
    results = [rewards.score(response, ["Paris", "x"], config) for response in out.responses]
    assert all(low <= r.reward <= high for r in results), [r.reward for r in results]
    # Only the rows with a well-formed answer and no broken retrieval pass the format.
    assert not any(r.format_ok for r, reason in zip(results, out.end_reasons)
                   if reason != "answer")
