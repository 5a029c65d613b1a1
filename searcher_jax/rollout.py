"""The search-augmented rollout (SPEC section 2): sampler <-> retriever, round by round.

    trajectories = rollout(sampler, tokenizer, retriever, prompt_ids, RolloutConfig(), key)

Every round decodes one segment for the live rows; a row that paused at
`<|end_of_query|>` gets its query searched (one batch per round) and the
document block appended with `Sampler.extend`, which writes at the row's
cursor, so no prefix is ever re-encoded. Rows end at `</answer>`, any of the
model's end-of-sequence ids (`hf_io.eos_token_ids`: an instruct model has
several), the segment limit, a missing, empty or over-long query, the retrieval
limit (the segment after the last retrieval is final) or a full buffer.

A row whose document block would not fit whole in the buffer ends there,
truncated, with nothing inserted (SPEC section 2: log rows that hit the
buffer): a block cut inside a passage is text the environment never writes,
and the policy would be scored on a response that reads as if it had
stopped the documents itself. Its query is not counted as a search.

The loss mask is built as tokens are appended (1 for a segment the policy
sampled, 0 for the prompt and every inserted block), never by searching
token patterns afterwards, and the trajectory's tokens are the sampler's
buffer itself, so the tokens trained on are exactly the tokens sampled.

A stop string need not end on a token boundary: the token that completes
`<|end_of_query|>` may carry characters past it (with Qwen2.5, `|>\\n\\n` is
`|` + `>\\n\\n`). The query is the text up to the tag; the insert is what
remains of the environment's text after what the policy already wrote, so
the decoded whole reads exactly as the spec's. When the overshoot is not a
prefix of that text, the sampled tokens stay, the whole block is inserted and
the row counts in `overshoot_mismatches`.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from searcher_jax.data.prompts import BEGIN_QUERY, END_QUERY
from searcher_jax.model import sharding
from searcher_jax.retrieval.passage import documents_block
from searcher_jax.sampling.sampler import Sampler
from searcher_jax.sampling.state import FINISHED, PAUSED, RUNNING, TRUNCATED

ANSWER_END = "</answer>"
STOP_STRINGS = (END_QUERY, ANSWER_END)  # the sampler's stop ids 0 and 1

# Why a trajectory ended.
END_REASONS = ("answer", "eos", "segment_limit", "no_query", "empty_query", "long_query",
               "retrieval_limit", "truncated")


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
    # Rows the sampler decodes at once (its KV cache holds this many): a rollout of more rows
    # runs as consecutive groups of this many, which must divide it. 0 (or at least the
    # batch's rows): all rows at once. A
    # row's tokens depend only on the key and its row id (sampling/select.py), so the groups
    # give the trajectories of one call.
    sampler_rows: int = 0

    def __post_init__(self):
        if self.max_retrievals < 0 or self.top_k < 1 or self.max_query_chars < 1:
            raise ValueError(f"RolloutConfig: max_retrievals ({self.max_retrievals}) must be >= 0, "
                             f"top_k ({self.top_k}) and max_query_chars "
                             f"({self.max_query_chars}) >= 1")
        if self.sampler_rows < 0:
            raise ValueError(f"RolloutConfig: sampler_rows must be >= 0, got {self.sampler_rows}")


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

    @property
    def num_queries(self) -> np.ndarray:
        return np.array([len(q) for q in self.queries], np.int32)

    def metrics(self) -> dict[str, float]:
        """Means over rows: queries, lengths, and the share of each end reason."""
        reasons = collections.Counter(self.end_reasons)
        rows = len(self.end_reasons)
        out = {"queries_per_row": float(self.num_queries.mean()),
               "sampled_tokens": float(self.loss_mask.sum(1).mean()),
               "response_tokens": float((self.lengths - self.prompt_lengths).mean()),
               "overshoot_mismatches": float(self.overshoot_mismatches.sum())}
        out.update({f"end_{reason}": reasons[reason] / rows for reason in END_REASONS})
        return out


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
class _Row:
    """Host bookkeeping of one trajectory while it runs."""
    prompt_len: int
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # sampled [start, end)
    pieces: list[np.ndarray] = dataclasses.field(default_factory=list)  # response token pieces
    queries: list[str] = dataclasses.field(default_factory=list)
    end_reason: str | None = None
    mismatches: int = 0


def rollout(sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
            prompt_ids: Sequence[Sequence[int]], config: RolloutConfig, key, *,
            eos_ids: Sequence[int]) -> Trajectories:
    """Samples one trajectory per prompt, searching whenever a row writes a query.

    Args:
      prompt_ids: B prompts of token ids (none empty).
      key: the PRNG key of the whole batch.
      eos_ids: every id that ends a row (`hf_io.eos_token_ids(model_dir, tokenizer)`).
    Raises:
      ValueError: a sampler without the rollout's stop strings, no eos id, an empty prompt,
        config.sampler_rows that does not divide B.
    """
    batch = len(prompt_ids)
    group = min(config.sampler_rows or batch, batch)
    if batch % group:
        raise ValueError(f"rollout: rollout.sampler_rows={group} does not divide the {batch} "
                         "rows of the batch (prompts x samples per prompt)")
    if group < batch:
        return concatenate([
            _rollout_rows(sampler, tokenizer, retriever, prompt_ids[start:start + group], config,
                          key, eos_ids, row_ids=np.arange(start, start + group, dtype=np.int32))
            for start in range(0, batch, group)])
    return _rollout_rows(sampler, tokenizer, retriever, prompt_ids, config, key, eos_ids)


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
        overshoot_mismatches=np.concatenate([p.overshoot_mismatches for p in parts]))


def _rollout_rows(sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
                  prompt_ids: Sequence[Sequence[int]], config: RolloutConfig, key,
                  eos_ids: Sequence[int], row_ids: np.ndarray | None = None) -> Trajectories:
    """One sampler call's rows (row_ids: their ids in the whole batch; None: 0..B-1)."""
    if list(sampler.stop_strings) != list(STOP_STRINGS):
        raise ValueError(f"the rollout's sampler must stop at {STOP_STRINGS} (in that order), "
                         f"it stops at {tuple(sampler.stop_strings)}")
    batch = len(prompt_ids)
    eos_ids = [int(i) for i in eos_ids]
    if not eos_ids:
        raise ValueError("rollout: eos_ids is empty; a rollout needs an id that ends rows")
    rows = [_Row(prompt_len=len(p)) for p in prompt_ids]
    empty = [b for b, row in enumerate(rows) if row.prompt_len == 0]
    if empty:
        raise ValueError(f"rollout: empty prompt at row(s) {empty}")
    state = sampler.extend(sampler.init(batch, eos_ids, key, row_ids=row_ids), prompt_ids)
    live = _fetch(state.status) == RUNNING
    for b in np.flatnonzero(~live):
        rows[b].end_reason = "truncated"  # the prompt alone fills the buffer

    for round_ in range(config.max_retrievals + 1):
        if not live.any():
            break
        state, segment = sampler.decode(state)
        sampled = sampler.new_tokens(state, segment, np.flatnonzero(live))
        to_finish, searches = [], []  # searches: (row, query, overshoot)
        for b, (tokens, _) in sampled.items():
            row = rows[b]
            row.spans.append((int(segment.segment_start[b]), int(segment.cursor[b])))
            row.pieces.append(tokens)
            status = segment.status[b]
            if status == TRUNCATED:
                row.end_reason = "truncated"
            elif status == FINISHED:
                row.end_reason = "eos"
            elif status == RUNNING:
                row.end_reason = "segment_limit"
            elif status == PAUSED and STOP_STRINGS[segment.stop_id[b]] == ANSWER_END:
                row.end_reason = "answer"
            else:
                query, overshoot = split_at_query(tokenizer.decode(tokens.tolist()))
                if query is None:
                    row.end_reason = "no_query"
                elif not query:
                    row.end_reason = "empty_query"
                elif len(query) > config.max_query_chars:
                    row.end_reason = "long_query"
                elif round_ == config.max_retrievals:
                    row.end_reason = "retrieval_limit"
                else:
                    searches.append((b, query, overshoot))
            if row.end_reason is not None and status in (RUNNING, PAUSED):
                to_finish.append(b)
        if to_finish:
            state = sampler.finish(state, to_finish)
        if not searches:
            break

        found = retriever.search([query for _, query, _ in searches], config.top_k)
        room = sampler.config.max_len - segment.cursor  # finish() moves no cursor
        inserts, overflowing = [[] for _ in range(batch)], []
        for (b, query, overshoot), passages in zip(searches, found):
            text, fitted = insert_text(documents_block(passages), overshoot)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > room[b]:
                rows[b].end_reason = "truncated"
                overflowing.append(b)
                continue
            rows[b].mismatches += not fitted
            rows[b].queries.append(query)
            inserts[b] = ids
            rows[b].pieces.append(np.asarray(ids, np.int32))
        if overflowing:
            state = sampler.finish(state, overflowing)
        state = sampler.extend(state, inserts)
        live = _fetch(state.status) == RUNNING
        for b, _, _ in searches:
            if not live[b]:
                rows[b].end_reason = "truncated"  # the block filled the buffer exactly
    for row in rows:
        if row.end_reason is None:
            raise RuntimeError("rollout: a row neither ended nor kept running")  # a bug, not input
    return _assemble(state, rows, tokenizer)


def _assemble(state, rows: list[_Row], tokenizer: Tokenizer) -> Trajectories:
    """Host arrays from the sampler's buffer, the loss mask from the recorded spans."""
    lengths = _fetch(state.cursor).astype(np.int32)
    width = int(lengths.max())
    tokens = _fetch(state.tokens)[:, :width].astype(np.int32)
    logprobs = _fetch(state.logprobs)[:, :width].astype(np.float32)
    loss_mask = np.zeros(tokens.shape, bool)
    responses = []
    for b, row in enumerate(rows):
        for start, end in row.spans:
            loss_mask[b, start:end] = True
        response = (np.concatenate(row.pieces) if row.pieces else np.zeros(0, np.int32))
        held = tokens[b, row.prompt_len:lengths[b]]
        # The host's pieces and the device buffer must agree, token for token.
        if not np.array_equal(held, response):
            raise RuntimeError(f"rollout row {b}: host pieces differ from the sampler's buffer")
        tokens[b, lengths[b]:] = 0
        ids = held.tolist()
        if ids and row.end_reason == "eos":
            ids = ids[:-1]  # the end-of-sequence token is trained on but is not text
        responses.append(tokenizer.decode(ids))
    return Trajectories(
        tokens=tokens, loss_mask=loss_mask, sampler_logprobs=np.where(loss_mask, logprobs, 0.0),
        prompt_lengths=np.array([r.prompt_len for r in rows], np.int32), lengths=lengths,
        responses=responses, queries=[r.queries for r in rows],
        end_reasons=[r.end_reason for r in rows],
        overshoot_mismatches=np.array([r.mismatches for r in rows], np.int32))


def _fetch(array) -> np.ndarray:
    return sharding.host_array(array)
