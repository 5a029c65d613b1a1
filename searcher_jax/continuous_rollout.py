"""The rollout without a batch-wide barrier: rows pause, search and resume on their own.

    trajectories = rollout(sampler, tokenizer, retriever, prompt_ids,
                           RolloutConfig(schedule="continuous"), key, eos_ids=eos_ids)

Under the barrier schedule (`rollout.py`) a row that wrote its query early waits for the
slowest row of its round, the device waits for the retriever, and a row that ended keeps its
slot until the whole group ends. Here the sampler holds `slots` rows and decodes at most
`decode_steps` tokens per call, ending a call early once an eighth of its rows have stopped
(so a stopped row waits a few steps, not a segment); at each boundary:

1. rows that stopped are read: a row that ends frees its slot; the queries of the rows that
   paused at `<|end_of_query|>` go to the retriever as one call on a host thread, so the
   search overlaps the next decode calls of the rows still running;
2. every search call that has returned is collected (its rows' documents), and the next
   prompts take the free slots;
3. one `extend` writes those documents and prompts, and the rows resume at the next call;
   when at most half the rows get tokens, only those are computed (`extend_rows`, an
   eighth of the slots a call). When no row is left running and nothing has returned, the
   host waits for the first call;
4. with `parked_rows`, a row that waits for its documents leaves its slot (its whole KV
   cache row moves to a store of that many rows, `Sampler.move`) when prompts or returned
   rows want more slots than are free, and moves back into a free slot once its documents
   are in, before any new prompt. Without it a row keeps its slot idle for as long as its
   search takes;
5. once no prompt is left, the remaining rows (parked ones included) move into half, a
   quarter or an eighth of the slots (`compact`), so the rollout's last rows do not decode
   in every slot.

The KV cache is kept across searches (nothing is re-encoded), as in the barrier schedule.
A row's tokens depend only on the key, its global row id and its own tokens
(`select.row_keys`), and a row's segments, searches and inserts go through the same
`rollout_rows.Row` as the barrier schedule's, so both give the same tokens. The log-probs
agree to about 1e-5, not bit for bit: XLA rounds a row's sums by the shape of the whole
call (on CPU, by classes of row count: 1, 2-7, 8-48, 64 rows measured) and a softmax by
the window it spans, and which rows share a decode or extend call depends on when searches
return. With `SamplerConfig.batch_invariant` no shape depends on the neighbours (and
nothing is compacted): the log-probs are then the barrier schedule's bit for bit, at the
same sampler_rows. The compiled programs are a fixed set, whatever the number of
trajectories: for each state size, decode at the attend buckets and extend at the chunk
buckets and row counts; reset, compact, and move to and from the parked rows.

On several processes every decision comes from values all of them hold: the rows' status
(gathered from the device) and which search calls have returned, which process 0 decides
and broadcasts. With `search_on="process_0"` only process 0's threads search; the passages
reach the others through the same broadcast the barrier schedule uses, on the main thread.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from searcher_jax.model import sharding
from searcher_jax.retrieval.process_zero import ProcessZeroRetriever
from searcher_jax.rollout_rows import (RolloutConfig, Row, Searcher, Tokenizer, Trajectories,
                                       assemble)
from searcher_jax.sampling.sampler import Sampler
from searcher_jax.sampling.state import PAUSED, RUNNING


def rollout(sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
            prompt_ids: Sequence[Sequence[int]], config: RolloutConfig, key, *,
            eos_ids: Sequence[int], slots: int) -> Trajectories:
    """One trajectory per prompt (row b's id: b), at most `slots` rows on the device at a time.

    The caller (`rollout.rollout`) has checked the sampler's stop strings, the eos ids and
    the prompts. Raises ValueError when config.parked_rows is not a multiple of the mesh's
    row shards, and what the retriever raises (e.g. `on_failure="stop"`).
    """
    rows = [Row(prompt=np.asarray(p, np.int32)) for p in prompt_ids]
    queue = collections.deque(range(len(rows)))
    shards = sampler.mesh.shape["data"] * sampler.mesh.shape["fsdp"]
    if config.parked_rows % shards:  # else every chip would hold the whole park
        raise ValueError(f"rollout.parked_rows={config.parked_rows} must be a multiple of the "
                         f"mesh's {shards} row shards")
    table, park = _Slots.empty(slots), _Slots.empty(config.parked_rows)
    ready: dict[int, list[int]] = {}  # parked row -> the ids of its arrived documents
    pool = concurrent.futures.ThreadPoolExecutor(config.retrieval_threads,
                                                 thread_name_prefix="retrieval")
    searches = _Searches(retriever, pool, config.top_k, slots + config.parked_rows)
    slot_steps = 0
    try:
        parked = sampler.init(config.parked_rows, eos_ids, key) if config.parked_rows else None
        state = sampler.init(slots, eos_ids, key)
        state, status = _refill(sampler, state, rows, queue, table, {})
        # Held rows, or prompts left: every prompt of a refill can fill the buffer alone, and
        # end at once.
        while table.held.any() or park.held.any() or queue:
            if (table.held & ~table.waiting & (status == RUNNING)).any():
                state, segment = sampler.decode(state, steps=config.decode_steps,
                                                min_stops=max(1, len(table.holder) // 8))
                slot_steps += len(table.holder) * segment.steps
                status = segment.status
                state = _end_segments(sampler, state, segment, rows, table, searches, config,
                                      tokenizer)
            running = (table.held & ~table.waiting & (status == RUNNING)).any()
            # A slot is free, or a waiting row can leave one to the park.
            admits = bool(queue or ready) and (not table.held.all() or (
                parked is not None and (~park.held).any() and table.waiting.any()))
            if (table.held.any() or park.held.any()) and not (running or admits
                                                              or searches.pending):
                raise RuntimeError("continuous rollout: rows wait for searches none of which "
                                   "is in flight")  # a bug, not input
            inserts, overflowing = {}, []
            for trajectory, query, overshoot, passages in searches.arrived(
                    wait=not (running or admits)):
                home = table if (table.holder == trajectory).any() else park
                s = int(np.flatnonzero(home.holder == trajectory)[0])
                ids = rows[trajectory].add_documents(query, overshoot, passages,
                                                     int(home.room[s]), tokenizer)
                home.waiting[s] = False
                if ids is None:
                    home.holder[s] = -1  # a parked row's copy is never decoded again
                    if home is table:
                        overflowing.append(s)
                elif home is table:
                    inserts[s] = ids
                else:
                    ready[s] = ids
            if overflowing:
                state = sampler.finish(state, overflowing)
            if parked is not None:
                state, parked = _park_and_return(sampler, state, parked, table, park, ready,
                                                 inserts, len(queue))
            state, status = _refill(sampler, state, rows, queue, table, inserts)
            # Parked rows come back into this state: the compacted size holds them too.
            size = _compacted_size(int(table.held.sum() + park.held.sum()), len(table.holder),
                                   slots, shards)
            # A batch-invariant sampler decodes at one row count: its rows' numbers would
            # change with it.
            if (not queue and 0 < table.held.sum() and size < len(table.holder)
                    and not sampler.config.batch_invariant):
                kept = np.flatnonzero(table.held)
                state = sampler.compact(state, kept, size)
                status = _fetch(state.status)
                table = table.take(kept, size)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return assemble(rows, sampler.config.max_len, tokenizer, decode_slot_steps=slot_steps)


def _park_and_return(sampler: Sampler, state, parked, table: "_Slots", park: "_Slots",
                     ready: dict[int, list[int]], inserts: dict[int, list[int]], prompts: int):
    """Moves rows that wait for documents off the decode batch when prompts or returned rows
    want more slots than are free (as many as the park holds), then moves returned parked
    rows into free slots (before new prompts: they end trajectories and free the park).
    A moved row keeps its KV cache. Adds a returned row's slot and documents to inserts.
    Returns (state, parked)."""
    want = prompts + len(ready) - int((~table.held).sum())
    waiting = np.flatnonzero(table.held & table.waiting)[:max(want, 0)]
    room = np.flatnonzero(~park.held)[:len(waiting)]
    if len(room):
        out = waiting[:len(room)]
        parked = sampler.move(state, parked, out, room)
        park.holder[room], park.waiting[room], park.room[room] = (
            table.holder[out], True, table.room[out])
        table.holder[out], table.waiting[out] = -1, False
    back = sorted(ready)[:int((~table.held).sum())]
    if back:
        into = np.flatnonzero(~table.held)[:len(back)]
        state = sampler.move(parked, state, back, into)
        table.holder[into], table.room[into] = park.holder[back], park.room[back]
        for p, s in zip(back, into):
            inserts[int(s)] = ready.pop(p)
        park.holder[back] = -1
    return state, parked


@dataclasses.dataclass
class _Slots:
    """What the host knows of each of the sampler's S rows (its slots)."""
    holder: np.ndarray  # [S] int: the trajectory in the slot, -1 when free
    waiting: np.ndarray  # [S] bool: the slot's row waits for its documents
    room: np.ndarray  # [S] int: buffer left to a waiting row

    @classmethod
    def empty(cls, size: int) -> "_Slots":
        return cls(np.full(size, -1), np.zeros(size, bool), np.zeros(size, np.int64))

    @property
    def held(self) -> np.ndarray:
        return self.holder >= 0

    def take(self, kept: np.ndarray, size: int) -> "_Slots":
        """Slot i of the new table is slot kept[i]; the rest are free (`Sampler.compact`)."""
        out = _Slots.empty(size)
        out.holder[:len(kept)], out.waiting[:len(kept)] = self.holder[kept], self.waiting[kept]
        out.room[:len(kept)] = self.room[kept]
        return out


def _end_segments(sampler: Sampler, state, segment, rows: list[Row], table: _Slots,
                  searches: "_Searches", config: RolloutConfig, tokenizer: Tokenizer):
    """Reads the rows that stopped in the last decode call: a row that ended frees its slot,
    the queries of those that paused go out as one search call."""
    stopped = np.flatnonzero(table.held & ~table.waiting & (
        (segment.status != RUNNING)
        | (segment.cursor - segment.segment_start >= sampler.config.segment_len)))
    to_finish, calls = [], []
    for s, (tokens, logprobs) in sampler.new_tokens(state, segment, stopped).items():
        search = rows[table.holder[s]].end_segment(tokens, logprobs, segment.status[s],
                                                   segment.stop_id[s], config, tokenizer)
        if search is None:
            if segment.status[s] in (RUNNING, PAUSED):
                to_finish.append(s)
            table.holder[s] = -1
        else:
            calls.append((int(table.holder[s]), *search))
            table.waiting[s] = True
            table.room[s] = sampler.config.max_len - segment.cursor[s]
    if calls:
        searches.submit(calls)
    return sampler.finish(state, to_finish) if to_finish else state


def _refill(sampler: Sampler, state, rows: list[Row], queue: collections.deque, table: _Slots,
            inserts: dict[int, list[int]]):
    """Puts the next prompts into the free slots, extends them and the slots in `inserts`
    (slot -> its documents' ids), and frees the slots of rows the extend truncated.
    Returns (state, status [S] int32)."""
    admitted = []
    for s in np.flatnonzero(~table.held)[:len(queue)]:
        table.holder[s] = queue.popleft()
        inserts[s] = rows[table.holder[s]].prompt
        admitted.append(s)
    if admitted:
        state = sampler.reset(state, admitted, table.holder[admitted])
    if not inserts:
        return state, _fetch(state.status)
    state = sampler.extend(state, [inserts.get(s, []) for s in range(len(table.holder))])
    status = _fetch(state.status)
    for s in inserts:
        if status[s] != RUNNING:  # the prompt, or the block, filled the buffer
            rows[table.holder[s]].end_reason = "truncated"
            table.holder[s] = -1
    return state, status


def compaction_sizes(slots: int, shards: int) -> list[int]:
    """The slot counts the last rows may move into, fewest first: slots / 8, / 4 and / 2,
    those that divide evenly into a multiple of the row shards (rl/memory_plan.py compiles
    the largest)."""
    return [slots // fraction for fraction in (8, 4, 2)
            if slots % fraction == 0 and (slots // fraction) % shards == 0]


def _compacted_size(held: int, size: int, slots: int, shards: int) -> int:
    """The fewest of `compaction_sizes` that hold `held` rows; `size` when none is smaller."""
    return next((s for s in compaction_sizes(slots, shards) if held <= s < size), size)


class _Searches:
    """Search calls on host threads, one per boundary, and which of them have returned,
    agreed by every process (process 0 decides)."""

    def __init__(self, retriever: Searcher, pool: concurrent.futures.Executor, k: int,
                 most_calls: int):
        # most_calls: a bound on the calls in flight (each holds a waiting row).
        self._retriever, self._pool, self._k, self._most = retriever, pool, k, most_calls
        self._process_zero = isinstance(retriever, ProcessZeroRetriever)
        self._index = jax.process_index()
        self._in_flight: list[tuple[concurrent.futures.Future | None, list]] = []

    def submit(self, calls: list[tuple[int, str, str]]) -> None:
        """calls: (trajectory, query, overshoot) of the rows that paused at one boundary."""
        queries = [query for _, query, _ in calls]
        if self._process_zero:
            future = self._retriever.submit(self._pool, queries, self._k)
        else:
            future = self._pool.submit(self._retriever.search, queries, self._k)
        self._in_flight.append((future, calls))

    @property
    def pending(self) -> bool:
        return bool(self._in_flight)

    def arrived(self, wait: bool) -> list[tuple[int, str, str, list]]:
        """(trajectory, query, overshoot, passages) of every call that has returned; with `wait`,
        first waits until one has (when there is one)."""
        if not self._in_flight:
            return []
        futures = [future for future, _ in self._in_flight]
        if wait and self._index == 0:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        done = np.zeros(self._most, bool)  # one shape: each compiles a broadcast
        done[:len(futures)] = [f is not None and f.done() for f in futures]
        done = _agreed(done)
        out, kept = [], []
        for (future, calls), ready in zip(self._in_flight, done):
            if not ready:
                kept.append((future, calls))
                continue
            if self._process_zero:
                found = self._retriever.collect(future)
            else:
                found = future.result()  # another process's call returned; ours will too
            if len(found) != len(calls):
                raise ValueError(f"the retriever answered {len(found)} lists of passages for "
                                 f"{len(calls)} queries")
            out.extend((s, query, overshoot, passages)
                       for (s, query, overshoot), passages in zip(calls, found))
        self._in_flight = kept
        return out


def _agreed(flags: np.ndarray) -> np.ndarray:
    """Process 0's flags [S] bool on every process."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.broadcast_one_to_all(flags)).astype(bool)


def _fetch(array) -> np.ndarray:
    return sharding.host_array(array)
