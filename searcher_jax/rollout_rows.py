"""What both rollout schedules share: the config, the output, and one row's bookkeeping.

A row's fate at the end of a segment (search, answer, end) and the block inserted after a
search depend only on the row's own text, never on which rows it was decoded beside or when,
so the barrier schedule (`rollout.py`) and the continuous one (`continuous_rollout.py`) call
the same functions here and give the same trajectories (SPEC section 2 for every rule).

The response is kept on the host as it grows, piece by piece (a sampled segment with its
log-probs, or an inserted block), and the loss mask is built from those pieces, never by
searching token patterns afterwards.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY
from searcher_jax.retrieval.passage import documents_block
from searcher_jax.sampling.state import FINISHED, PAUSED, RUNNING, TRUNCATED

ANSWER_END = "</answer>"
STOP_STRINGS = (END_QUERY, ANSWER_END)  # the sampler's stop ids 0 and 1

# Why a trajectory ended.
END_REASONS = ("answer", "eos", "segment_limit", "no_query", "empty_query", "long_query",
               "retrieval_limit", "truncated")
SCHEDULES = ("barrier", "continuous")


class Tokenizer(Protocol):
    """What the rollout needs of a HF tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Searcher(Protocol):
    def search(self, queries: Sequence[str], k: int) -> list[list]: ...


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    max_retrievals: int = 8  # 8 in training, 9 in evaluation; one more segment follows the last
    top_k: int = 3  # passages per search: 3 in training, 5 in evaluation
    # A query longer than this (characters, after clean_query) ends its row ("long_query")
    # unsearched. SPEC section 2 asks for keywords of one triple, and bounds a query only by
    # its segment (512 tokens, a few thousand characters): past this it is the policy
    # rambling, not a search, and the retrieval server refuses queries over its own
    # max_query_chars (4096) for the whole batch.
    max_query_chars: int = 2048
    # Rows the sampler decodes at once (its KV cache holds this many). 0 (or at least the
    # batch's rows): all rows at once. A row's tokens depend only on the key and its row id
    # (sampling/select.py), so the schedule never changes a trajectory.
    sampler_rows: int = 0
    # "barrier": a round decodes until every row has paused or ended, searches for all paused
    # rows in one call, extends them, and goes on; more rows than sampler_rows run as
    # consecutive groups (sampler_rows must divide them). "continuous": the device decodes
    # decode_steps tokens at a time; at each boundary paused rows' queries go to retrieval on
    # host threads while the others decode on, rows resume once their documents are in, and a
    # slot whose row ended takes the next prompt (continuous_rollout.py).
    schedule: str = "barrier"
    decode_steps: int = 32  # continuous: tokens per row between two boundaries
    retrieval_threads: int = 8  # continuous: searches in flight at once
    # continuous: rows that wait for their documents can leave the decode batch for a store
    # of this many rows (their KV cache moved, not re-encoded) while prompts or returned rows
    # wait for a slot; 0: a waiting row keeps its slot. Costs this many rows of KV cache.
    parked_rows: int = 0

    def __post_init__(self):
        if self.max_retrievals < 0 or self.top_k < 1 or self.max_query_chars < 1:
            raise ValueError(f"RolloutConfig: max_retrievals ({self.max_retrievals}) must be >= 0, "
                             f"top_k ({self.top_k}) and max_query_chars "
                             f"({self.max_query_chars}) >= 1")
        if self.sampler_rows < 0:
            raise ValueError(f"RolloutConfig: sampler_rows must be >= 0, got {self.sampler_rows}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RolloutConfig: schedule must be one of {SCHEDULES}, "
                             f"got {self.schedule!r}")
        if self.parked_rows < 0:
            raise ValueError(f"RolloutConfig: parked_rows must be >= 0, got {self.parked_rows}")
        if self.decode_steps < 1 or self.retrieval_threads < 1:
            raise ValueError(f"RolloutConfig: decode_steps ({self.decode_steps}) and "
                             f"retrieval_threads ({self.retrieval_threads}) must be >= 1")


@dataclasses.dataclass(frozen=True)
class Trajectories:
    """B finished trajectories as host arrays, right padded to T with token 0."""
    tokens: np.ndarray  # [B, T] int32: prompt, sampled and inserted tokens
    loss_mask: np.ndarray  # [B, T] bool: True exactly on the tokens the policy sampled
    sampler_logprobs: np.ndarray  # [B, T] float32: the sampler's log-prob of each sampled token
    prompt_lengths: np.ndarray  # [B] int32
    lengths: np.ndarray  # [B] int32: tokens held (prompt + response)
    responses: list[str]  # the decoded response of each row (everything after the prompt)
    queries: list[list[str]]  # the queries each row searched (documents inserted), in order
    end_reasons: list[str]  # one of END_REASONS per row
    overshoot_mismatches: np.ndarray  # [B] int32: inserts whose overshoot did not fit the block
    # Slot-steps the device ran while decoding these rows (sampler rows x loop steps, summed
    # over decode calls); the sampled tokens over it is the slot utilisation. 0: not counted.
    decode_slot_steps: int = 0

    @property
    def num_queries(self) -> np.ndarray:
        return np.array([len(q) for q in self.queries], np.int32)

    def metrics(self) -> dict[str, float]:
        """Means over rows: queries, lengths, the share of each end reason; slot utilisation."""
        reasons = collections.Counter(self.end_reasons)
        rows = len(self.end_reasons)
        out = {"queries_per_row": float(self.num_queries.mean()),
               "sampled_tokens": float(self.loss_mask.sum(1).mean()),
               "response_tokens": float((self.lengths - self.prompt_lengths).mean()),
               "overshoot_mismatches": float(self.overshoot_mismatches.sum())}
        out.update({f"end_{reason}": reasons[reason] / rows for reason in END_REASONS})
        if self.decode_slot_steps:
            out["slot_utilisation"] = float(self.loss_mask.sum() / self.decode_slot_steps)
        return out


def concatenate(parts: Sequence[Trajectories]) -> Trajectories:
    """Trajectories of several groups of rows as one batch, padded to the widest."""
    width = max(part.tokens.shape[1] for part in parts)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # pylint: disable=unnecessary-lambda-assignment
    return Trajectories(
        tokens=np.concatenate([pad(p.tokens) for p in parts]),
        loss_mask=np.concatenate([pad(p.loss_mask) for p in parts]),
        sampler_logprobs=np.concatenate([pad(p.sampler_logprobs) for p in parts]),
        prompt_lengths=np.concatenate([p.prompt_lengths for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        responses=[r for p in parts for r in p.responses],
        queries=[q for p in parts for q in p.queries],
        end_reasons=[e for p in parts for e in p.end_reasons],
        overshoot_mismatches=np.concatenate([p.overshoot_mismatches for p in parts]),
        decode_slot_steps=sum(p.decode_slot_steps for p in parts))


def clean_query(text: str) -> str:
    """The query as the released code sent it: `"` removed, whitespace collapsed."""
    return " ".join(text.replace('"', "").split())


def split_at_query(segment_text: str) -> tuple[str | None, str]:
    """(query or None if no `<|begin_of_query|>` precedes the tag, text sampled past the tag)."""
    head, _, overshoot = segment_text.rpartition(END_QUERY)
    if BEGIN_QUERY not in head:
        return None, overshoot
    return clean_query(head.rpartition(BEGIN_QUERY)[2]), overshoot


def insert_text(block: str, overshoot: str) -> tuple[str, bool]:
    """(what to append after the sampled overshoot, whether the overshoot fitted the block)."""
    if block.startswith(overshoot):
        return block[len(overshoot):], True
    return block, False


@dataclasses.dataclass
class Row:
    """Host bookkeeping of one trajectory while it runs."""
    prompt: np.ndarray  # [P] int32
    # The response so far: (tokens [n] int32, log-probs [n] float32, sampled) per piece.
    pieces: list[tuple[np.ndarray, np.ndarray, bool]] = dataclasses.field(default_factory=list)
    segments: int = 0  # segments decoded (searches done + 1 while it runs)
    queries: list[str] = dataclasses.field(default_factory=list)
    end_reason: str | None = None
    mismatches: int = 0

    def end_segment(self, tokens: np.ndarray, logprobs: np.ndarray, status: int, stop_id: int,
                    config: RolloutConfig, tokenizer: Tokenizer) -> tuple[str, str] | None:
        """Records a segment the sampler ended with `status`; (query, overshoot) when the row
        searches next, else None with end_reason set (RUNNING: the segment ran out)."""
        self.pieces.append((np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32), True))
        self.segments += 1
        if status == TRUNCATED:
            self.end_reason = "truncated"
        elif status == FINISHED:
            self.end_reason = "eos"
        elif status == RUNNING:
            self.end_reason = "segment_limit"
        elif status == PAUSED and STOP_STRINGS[stop_id] == ANSWER_END:
            self.end_reason = "answer"
        else:
            query, overshoot = split_at_query(tokenizer.decode(np.asarray(tokens).tolist()))
            if query is None:
                self.end_reason = "no_query"
            elif not query:
                self.end_reason = "empty_query"
            elif len(query) > config.max_query_chars:
                self.end_reason = "long_query"
            elif self.segments > config.max_retrievals:
                self.end_reason = "retrieval_limit"
            else:
                return query, overshoot
        return None

    def add_documents(self, query: str, overshoot: str, passages, room: int,
                      tokenizer: Tokenizer) -> list[int] | None:
        """The ids to extend the row with after its search, or None (end_reason "truncated")
        when the block does not fit whole in the `room` tokens left: a block cut inside a
        passage is text the environment never writes (SPEC section 2)."""
        text, fitted = insert_text(documents_block(passages), overshoot)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > room:
            self.end_reason = "truncated"
            return None
        self.mismatches += not fitted
        self.queries.append(query)
        self.pieces.append((np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), False))
        return ids


def assemble(rows: Sequence[Row], max_len: int, tokenizer: Tokenizer,
             decode_slot_steps: int = 0) -> Trajectories:
    """Trajectories from the rows' pieces (a prompt longer than max_len is cut there, as the
    sampler's buffer holds it).

    Raises:
      RuntimeError: a row that neither ended nor kept running (a bug, not input).
    """
    held = []
    for row in rows:
        if row.end_reason is None:
            raise RuntimeError("rollout: a row neither ended nor kept running")
        pieces = [(row.prompt, np.zeros(len(row.prompt), np.float32), False)] + row.pieces
        tokens = np.concatenate([p[0] for p in pieces])[:max_len]
        logprobs = np.concatenate([p[1] for p in pieces])[:max_len]
        sampled = np.concatenate([np.full(len(p[0]), p[2]) for p in pieces])[:max_len]
        held.append((tokens, logprobs, sampled))
    lengths = np.array([len(h[0]) for h in held], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((len(rows), width), np.int32)
    logprobs = np.zeros((len(rows), width), np.float32)
    loss_mask = np.zeros((len(rows), width), bool)
    responses = []
    for b, (row, (row_tokens, row_logprobs, sampled)) in enumerate(zip(rows, held)):
        tokens[b, :lengths[b]], loss_mask[b, :lengths[b]] = row_tokens, sampled
        logprobs[b, :lengths[b]] = np.where(sampled, row_logprobs, 0.0)
        ids = row_tokens[len(row.prompt):].tolist()
        if ids and row.end_reason == "eos":
            ids = ids[:-1]  # the end-of-sequence token is trained on but is not text
        responses.append(tokenizer.decode(ids))
    return Trajectories(
        tokens=tokens, loss_mask=loss_mask, sampler_logprobs=logprobs,
        prompt_lengths=np.array([len(r.prompt) for r in rows], np.int32), lengths=lengths,
        responses=responses, queries=[r.queries for r in rows],
        end_reasons=[r.end_reason for r in rows],
        overshoot_mismatches=np.array([r.mismatches for r in rows], np.int32),
        decode_slot_steps=decode_slot_steps)
