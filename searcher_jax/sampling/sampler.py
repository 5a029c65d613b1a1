"""The device side of the search-augmented rollout: extend, decode a segment, pause.

Two jitted programs over a `SamplingState` (donated, static shapes):
- `extend(state, tokens [B, E], lengths [B])` writes each row's new tokens at
  its cursor and fills the cache: prompt prefill and inserting retrieved
  documents are the same call. E is a power of two; a long insert is split
  into a few such chunks rather than padded (`extend_chunk`).
- `decode_segment(state)` samples up to `segment_len` tokens per row in one
  `lax.while_loop`, which ends early once no row is RUNNING (rows pause at a
  stop string, finish at an end-of-sequence id or fill the buffer). With
  `steps` it samples at most that many and each row goes on with the segment
  its last extend began (the continuous rollout's short calls), still ending
  a row's segment at `segment_len` tokens.
Both attend only to the first `attend_len` cache slots, a static bucket of the
longest row that the call can reach, so a long buffer costs nothing while
rows are short; decode cuts that window out of the cache once per segment.

`Sampler` is the thin host side: it owns the compiled functions, picks the
buckets, and reads back only per-row scalars and the new tokens of a segment.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searcher_jax.model import sharding
from searcher_jax.model.decoder import Decoder, cache_window, write_cache_window
from searcher_jax.sampling import select
from searcher_jax.sampling.state import (FINISHED, PAUSED, RUNNING, STATUS_NAMES, TRUNCATED,
                                         SamplingState, init_state)
from searcher_jax.sampling.stop_strings import NO_STOP, StopTable


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static configuration of a sampler (every field is part of the compiled programs)."""
    max_len: int  # T: tokens per row, prompt + sampled + inserted.
    segment_len: int = 512  # N: most tokens a row samples per segment.
    select: select.SelectConfig = select.SelectConfig()
    min_extend_bucket: int = 16  # Smallest padded length of an `extend` chunk.
    # Longer inputs are written in several chunks, which bounds the prefill's
    # attention scores ([B, heads, chunk, attended] float32) and the shapes compiled.
    max_extend_chunk: int = 512
    min_attend_bucket: int = 128  # Smallest number of cache slots attended.
    # Keep every step's logits ([B, N, V] float32 in the state's segment
    # output); for parity tests on tiny vocabularies only.
    record_logits: bool = False
    # A row's numbers independent of the rows beside it, so any schedule of the same rows
    # gives them bit for bit: XLA rounds a matmul's sums by the shape of the whole call, and
    # a softmax by the window it spans. Every extend is then `extend_rows` calls of B/8 rows
    # x invariant_chunk tokens, a row's inserts split at multiples of invariant_chunk from
    # their start; attention visits the cache in blocks of min_attend_bucket / 2 keys
    # (decoder.attend_cached); the continuous rollout never compacts. Costs more extend calls
    # and padding, and the compaction's tail.
    batch_invariant: bool = False
    invariant_chunk: int = 64

    def __post_init__(self):
        if min(self.max_len, self.segment_len, self.min_extend_bucket, self.max_extend_chunk,
               self.invariant_chunk) < 1:
            raise ValueError(f"max_len ({self.max_len}), segment_len ({self.segment_len}), "
                             f"min_extend_bucket ({self.min_extend_bucket}), max_extend_chunk "
                             f"({self.max_extend_chunk}) and invariant_chunk "
                             f"({self.invariant_chunk}) must be positive")
        if self.batch_invariant and (self.min_attend_bucket % 2
                                     or self.max_len % self.key_block):
            raise ValueError(f"batch_invariant attends blocks of min_attend_bucket / 2 = "
                             f"{self.min_attend_bucket / 2} keys: min_attend_bucket "
                             f"({self.min_attend_bucket}) must be even and max_len "
                             f"({self.max_len}) a multiple of it")

    @property
    def key_block(self) -> int:
        """Keys per attention block (0: the whole window at once)."""
        return self.min_attend_bucket // 2 if self.batch_invariant else 0


def power_of_two_bucket(n: int, minimum: int, maximum: int) -> int:
    """The smallest minimum * 2^i >= n, capped at maximum."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return min(size, maximum)


def extend_chunk(remaining: int, minimum: int, maximum: int) -> int:
    """How many of `remaining` tokens the next extend call writes (its padded length).

    Every padded token is paid for in every layer's matmuls, so a long insert
    is split at a power of two when that pads at least a fifth less: 300
    tokens go in as 256 + 64, not as 512. Chunks up to 4 * minimum are never
    split (the extra call would cost more than the padding).
    """
    def padded(n: int) -> int:
        total = 0
        while n > 0:
            chunk = extend_chunk(n, minimum, maximum)
            total, n = total + chunk, n - chunk
        return total

    whole = power_of_two_bucket(remaining, minimum, maximum)
    if whole <= remaining or whole <= 4 * minimum:
        return whole
    lower = whole // 2
    return lower if 5 * (lower + padded(remaining - lower)) <= 4 * whole else whole


def attend_bucket(n: int, minimum: int, maximum: int) -> int:
    """power_of_two_bucket(n, minimum, maximum), or three quarters of it when that holds n.

    A decode step reads every attended cache slot, so the bucket's slack is
    paid on every token: steps of 1.5x and 1.33x waste at most a third, where
    powers of two waste up to half, for one more compiled program per doubling
    (and one for three quarters of the cap).
    """
    size = power_of_two_bucket(n, minimum, maximum)
    if size > minimum and size * 3 // 4 >= n:
        return size * 3 // 4
    return size


def _whole_blocks(window: int, key_block: int) -> int:
    """window rounded up to whole key blocks (a three-quarter bucket of a capped one need not
    be); max_len is a multiple of key_block, so this stays within the buffer."""
    return -(-window // key_block) * key_block if key_block else window


# --- Pure programs ----------------------------------------------------------------------------

def _advance_stops(table, stop_state, tokens):
    """One token per row through the automaton: stop_state [B], tokens [B] -> (state, id, over)."""
    return (table["next_state"][stop_state, tokens].astype(jnp.int32),
            table["stop_id"][stop_state, tokens].astype(jnp.int32),
            table["overshoot"][stop_state, tokens].astype(jnp.int32))


def extend(graphdef, params, state: SamplingState, tokens, lengths, *,
           attend_len: int, key_block: int = 0) -> SamplingState:
    """Appends tokens [B, E] (row b's first lengths[b]) at each row's cursor.

    Rows with lengths[b] > 0 become RUNNING (TRUNCATED if they do not fit) and
    begin a new segment; the others are left as they were. Inserted tokens get log-prob 0. Stop
    strings are matched in what a row samples after its last extend (as a
    server matches them in a request's output, never in its prompt), so the
    automaton restarts.
    """
    model = nnx.merge(graphdef, params)
    batch, max_len = state.tokens.shape
    chunk = tokens.shape[1]
    room = max_len - state.cursor
    fits = lengths <= room
    lengths = jnp.minimum(lengths, room)  # [B]
    offsets = jnp.arange(chunk, dtype=jnp.int32)[None, :]  # [1, E]
    valid = offsets < lengths[:, None]  # [B, E]
    slots = jnp.where(valid, state.cursor[:, None] + offsets, max_len)  # past the end: dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, chunk))
    buffer = state.tokens.at[rows, slots].set(tokens, mode="drop")

    hidden, cache = model.forward_hidden(tokens, cache=state.cache, write_index=state.cursor,
                                         attend_len=attend_len,
                                         key_block=key_block)  # [B, E, H]
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    extended = lengths > 0
    cursor = state.cursor + lengths
    status = jnp.where(extended, RUNNING, state.status)
    status = jnp.where(extended & (~fits | (cursor >= max_len)), TRUNCATED, status)
    return state.replace(
        tokens=buffer, cache=cache, cursor=cursor, status=status,
        segment_start=jnp.where(extended, cursor, state.segment_start),
        stop_state=jnp.where(extended, 0, state.stop_state),
        last_hidden=jnp.where(extended[:, None], last.astype(state.last_hidden.dtype),
                              state.last_hidden),
        stop_id=jnp.where(extended, NO_STOP, state.stop_id),
        overshoot=jnp.where(extended, 0, state.overshoot))


def extend_rows(graphdef, params, state: SamplingState, slots, tokens, lengths, *,
                attend_len: int, key_block: int = 0) -> SamplingState:
    """`extend` for the rows `slots` [R] int32 alone (an index >= B pads: nothing is written
    back); tokens [R, E], lengths [R]. Their fields and cache rows are gathered into an R-row
    state, extended and written back, so the forward costs R rows, not B: the continuous
    rollout extends a few rows at each boundary while the others keep decoding."""
    batch_axes = _cache_batch_axes(graphdef, params)
    sub = extend(graphdef, params, take_rows(state, slots, batch_axes), tokens, lengths,
                 attend_len=attend_len, key_block=key_block)
    return _put_rows(state, slots, sub, batch_axes)


def move_rows(graphdef, params, source: SamplingState, target: SamplingState, source_rows,
              target_rows) -> SamplingState:
    """target with row target_rows[i] replaced by source's row source_rows[i] (both [R] int32;
    a target index past its rows pads: nothing is written): every field and the whole cache
    row, so the row decodes on in its new place as it would have in its old one. The
    continuous rollout parks rows that wait for documents off the decode batch with this."""
    batch_axes = _cache_batch_axes(graphdef, params)
    return _put_rows(target, target_rows,
                     take_rows(source, source_rows, batch_axes, per_layer=True), batch_axes)


def _put_rows(state: SamplingState, rows, sub: SamplingState, batch_axes) -> SamplingState:
    """state with row rows[i] set to sub's row i (an index >= B is dropped)."""
    scatter = lambda x, new, axis=0: x.at[(slice(None),) * axis + (rows,)].set(  # pylint: disable=unnecessary-lambda-assignment
        new, mode="drop")
    return state.replace(cache=jax.tree.map(scatter, state.cache, sub.cache, batch_axes),
                         **{name: scatter(x, getattr(sub, name))
                            for name, x in _row_fields(state).items()})


def take_rows(state: SamplingState, rows, batch_axes, per_layer: bool = False) -> SamplingState:
    """The R-row state of rows [R] int32 (an index past B repeats row B-1); batch_axes: each
    cache leaf's row axis (`_cache_batch_axes`). per_layer: a stacked cache ([L, B, ...]) is
    gathered one layer at a time. XLA gathers rows split over fsdp by all-reducing the whole
    result, so gathering half the rows of every layer at once held that half of the cache on
    every chip (Llama-3.1-8B's v5e-64 plan ran out of memory in `compact`)."""
    gather = lambda x, axis=0: jnp.take(x, rows, axis=axis, mode="clip")  # pylint: disable=unnecessary-lambda-assignment

    def gather_cache(x, axis):
        if per_layer and axis > 0:
            return jax.lax.map(lambda layer: gather(layer, axis - 1), x)
        return gather(x, axis)
    return state.replace(cache=jax.tree.map(gather_cache, state.cache, batch_axes),
                         **{name: gather(x) for name, x in _row_fields(state).items()})


def compact_rows(graphdef, params, state: SamplingState, rows, keep) -> SamplingState:
    """A smaller state of rows [R] int32 (keep [R] bool; False: an empty FINISHED slot): the
    continuous rollout's last rows decode in fewer slots once no prompt is left to fill them."""
    state = take_rows(state, rows, _cache_batch_axes(graphdef, params), per_layer=True)
    return state.replace(status=jnp.where(keep, state.status, FINISHED))


def _cache_batch_axes(graphdef, params):
    model = nnx.merge(graphdef, params)
    return jax.tree.map(lambda axes: axes.index("batch"), model.cache_logical_axes(),
                        is_leaf=_is_axes)


def _row_fields(state: SamplingState) -> dict:
    """Every field with a row axis first (all but the cache and the shared key)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name not in ("cache", "key")}


def _is_axes(tree) -> bool:
    return isinstance(tree, tuple) and all(isinstance(name, str) for name in tree)


def decode_segment(graphdef, params, state: SamplingState, stop_table, *, config: SamplerConfig,
                   attend_len: int, steps: int | None = None, min_stops=None):
    """Samples up to config.segment_len tokens for every RUNNING row.

    steps None: every RUNNING row begins a segment here. steps N: at most N tokens, each
    row going on with its segment (from segment_start) until it holds segment_len tokens;
    a row that does stays RUNNING for the host to end. min_stops (int32 [], with steps): the
    call also ends once that many of the rows it began with have stopped sampling, so the
    host can serve them while few slots idle.
    Returns (state, logits [B, steps, V] float32 if config.record_logits else None).
    Each step: logits from last_hidden -> a token per row -> its stop-automaton
    and end-of-sequence checks -> the token's forward pass (so its keys and
    values are cached even when it ends the row) -> the next last_hidden.
    """
    model = nnx.merge(graphdef, params)
    batch, max_len = state.tokens.shape
    rows = jnp.arange(batch)
    resume = steps is not None
    steps = steps if resume else config.segment_len
    record = None
    if config.record_logits:
        record = jnp.zeros((batch, steps, model.config.vocab_size), jnp.float32)

    def sampling(state):  # [B] bool: the rows that sample the next token
        return ((state.status == RUNNING)
                & (state.cursor - state.segment_start < config.segment_len))

    def cond(carry):
        step, state, _ = carry
        go_on = (step < steps) & jnp.any(sampling(state))
        if min_stops is not None:
            go_on &= jnp.sum(began & ~sampling(state)) < min_stops
        return go_on

    def body(carry):
        step, state, record = carry
        running = sampling(state)  # [B]
        logits = model.logits(state.last_hidden)  # [B, V] float32
        keys = select.row_keys(state.key, state.row_ids, state.cursor)
        token = select.select_tokens(logits, keys, config.select)  # [B]
        logprob = select.token_logprobs(logits, token)
        slot = jnp.where(running, state.cursor, max_len)  # non-running rows write nothing
        stop_state, stop_id, overshoot = _advance_stops(stop_table, state.stop_state, token)
        is_eos = jnp.any(token[:, None] == state.eos_ids, axis=-1)

        hidden, cache = model.forward_hidden(token[:, None], cache=state.cache,
                                             write_index=state.cursor,
                                             key_block=config.key_block)
        cursor = state.cursor + running
        status = jnp.where(running & (stop_id != NO_STOP), PAUSED, state.status)
        status = jnp.where(running & is_eos, FINISHED, status)
        status = jnp.where((status == RUNNING) & (cursor >= max_len), TRUNCATED, status)
        paused_now = running & (status == PAUSED)
        if record is not None:
            record = record.at[:, step].set(logits)
        state = state.replace(
            tokens=state.tokens.at[rows, slot].set(token, mode="drop"),
            logprobs=state.logprobs.at[rows, slot].set(logprob, mode="drop"),
            cache=cache,
            last_hidden=jnp.where(running[:, None], hidden[:, 0], state.last_hidden),
            cursor=cursor,
            status=status,
            stop_state=jnp.where(running, stop_state, state.stop_state),
            stop_id=jnp.where(paused_now, stop_id, state.stop_id),
            overshoot=jnp.where(paused_now, overshoot, state.overshoot))
        return step + 1, state, record

    # The loop runs on the first attend_len cache slots, cut out once here
    # and written back after it: slicing inside the step would copy them for
    # every token and layer.
    full_cache = state.cache
    if attend_len < max_len:
        state = state.replace(cache=cache_window(full_cache, attend_len))
    if not resume:
        state = state.replace(segment_start=state.cursor)
    began = sampling(state)  # [B]
    _, state, record = jax.lax.while_loop(cond, body, (jnp.int32(0), state, record))
    if attend_len < max_len:
        state = state.replace(cache=write_cache_window(full_cache, state.cache))
    return state, record


def reset_rows(state: SamplingState, rows_mask, row_ids) -> SamplingState:
    """Empties the rows in rows_mask [B] bool for new trajectories with ids row_ids [B] int32
    (FINISHED until `extend` gives them a prompt). Their cache needs no clearing: a slot is
    visible only below the row's cursor, which `extend` rewrites from 0."""
    keep = lambda new, old: jnp.where(  # pylint: disable=unnecessary-lambda-assignment
        rows_mask.reshape(rows_mask.shape + (1,) * (old.ndim - 1)), new, old)
    return state.replace(
        tokens=keep(0, state.tokens), logprobs=keep(0.0, state.logprobs),
        cursor=keep(0, state.cursor), segment_start=keep(0, state.segment_start),
        status=keep(FINISHED, state.status), stop_state=keep(0, state.stop_state),
        stop_id=keep(NO_STOP, state.stop_id), overshoot=keep(0, state.overshoot),
        row_ids=keep(row_ids, state.row_ids))


def finish_rows(state: SamplingState, rows_mask) -> SamplingState:
    """Marks the rows in rows_mask [B] bool FINISHED (e.g. the rollout ends them at `</answer>`)."""
    return state.replace(status=jnp.where(rows_mask, FINISHED, state.status))


def segment_window(state: SamplingState, width: int):
    """tokens and log-probs [B, width] from each row's segment_start (past T: 0)."""
    max_len = state.tokens.shape[1]
    index = state.segment_start[:, None] + jnp.arange(width)[None, :]
    inside = index < max_len
    index = jnp.minimum(index, max_len - 1)
    return (jnp.where(inside, jnp.take_along_axis(state.tokens, index, axis=1), 0),
            jnp.where(inside, jnp.take_along_axis(state.logprobs, index, axis=1), 0.0))


# --- Sharding ---------------------------------------------------------------------------------

def state_shardings(model: Decoder, state_shapes: SamplingState, mesh: Mesh,
                    rules=sharding.SAMPLING_RULES) -> SamplingState:
    """Rows over the batch axes (data, fsdp); the cache's KV heads over tensor."""

    def rows_first(x):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    cache = jax.tree.map(
        lambda axes, x: NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh, rules,
                                                                     "kv cache")),
        model.cache_logical_axes(), state_shapes.cache,
        is_leaf=_is_axes)
    shardings = jax.tree.map(rows_first, state_shapes.replace(cache=None))
    return shardings.replace(cache=cache, key=NamedSharding(mesh, PartitionSpec()))


def sampling_copy(model: Decoder, mesh: Mesh | None = None,
                  scan_layers: bool | None = None) -> Decoder:
    """The weights the sampler reads: compute dtype, split over `tensor` only (jitted reshard).

    A tied output head is stored a second time, transposed to [E, V]: a
    decode step's logits are then a plain [B, E] x [E, V] matmul, where
    reading the embedding transposed cost 1.3x in fp32 and 8x in bf16 on XLA CPU.
    scan_layers picks the copy's layer layout (None: the model's). A model
    trained with stacked layers can sample with one array per layer: on XLA
    CPU each scan step copied its layer's slice of the stacked weights, which
    made decoding about 1.6x slower.
    """
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    scan_layers = model.config.scan_layers if scan_layers is None else scan_layers
    config = dataclasses.replace(model.config, tie_word_embeddings=False, scan_layers=scan_layers)
    graphdef, copy = _copy_fn(mesh, config, model.config.scan_layers)
    return nnx.merge(graphdef, copy(nnx.to_pure_dict(nnx.state(model))))


@functools.lru_cache(maxsize=8)
def _copy_fn(mesh: Mesh, config, source_scanned: bool):
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract_params, mesh, sharding.SAMPLING_RULES)

    def copy(pure_params):
        if "lm_head" not in pure_params:
            pure_params = {**pure_params, "lm_head": pure_params["embed"].T}
        layers = pure_params["layers"]
        if source_scanned and not config.scan_layers:  # [L, ...] -> one tree per layer
            layers = {i: jax.tree.map(lambda x, i=i: x[i], layers)
                      for i in range(config.num_layers)}
        elif config.scan_layers and not source_scanned:
            layers = jax.tree.map(lambda *xs: jnp.stack(xs),
                                  *[layers[i] for i in range(config.num_layers)])
        pure_params = {**pure_params, "layers": layers}
        cast = jax.tree.map(
            lambda x: x.astype(config.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            pure_params)
        params = jax.tree.map(lambda x: x, abstract_params)  # a fresh State to fill
        nnx.replace_by_pure_dict(params, cast)
        return jax.lax.with_sharding_constraint(params, shardings)
    return graphdef, jax.jit(copy)


# --- Host side --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Segment:
    """What the host reads after a segment: per-row scalars (numpy, [B])."""
    status: np.ndarray
    stop_id: np.ndarray  # the stop string (index into the config's) that paused the row
    overshoot: np.ndarray  # bytes of the stopping token past the stop string
    segment_start: np.ndarray
    cursor: np.ndarray
    logits: np.ndarray | None = None  # [B, N, V] when config.record_logits
    steps: int = 0  # decode steps the call ran: the most tokens a row sampled in it

    @property
    def paused_rows(self) -> np.ndarray:
        return np.flatnonzero(self.status == PAUSED)

    def describe(self) -> dict[str, int]:
        return {name: int(np.sum(self.status == code)) for code, name in enumerate(STATUS_NAMES)}


class Sampler:
    """Owns the compiled `extend` and `decode_segment` of one model, config and mesh.

    The state is passed in and out (and donated); the host reads only [B]
    scalars and the new tokens of the rows it asks for.
    """

    def __init__(self, model: Decoder, config: SamplerConfig, stop_table: StopTable | None = None,
                 mesh: Mesh | None = None):
        self.config = config
        self.model_config = model.config
        self.mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        self._graphdef, self._params = nnx.split(model)
        vocab = model.config.vocab_size
        if stop_table is None:  # no stop strings: one state that never stops
            tables = {"next_state": np.zeros((1, vocab), np.int16),
                      "stop_id": np.full((1, vocab), NO_STOP, np.int8),
                      "overshoot": np.zeros((1, vocab), np.int16)}
        else:
            if stop_table.next_state.shape[1] != vocab:
                raise ValueError(f"stop table covers {stop_table.next_state.shape[1]} token ids, "
                                 f"the model's vocabulary has {vocab}; pass vocab_size={vocab} "
                                 "to build_stop_table")
            tables = {"next_state": stop_table.next_state, "stop_id": stop_table.stop_id,
                      "overshoot": stop_table.overshoot}
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._stop_table = {k: jax.device_put(v, replicated) for k, v in tables.items()}
        self.stop_strings = () if stop_table is None else stop_table.stop_strings
        # Python side effects run once per trace, i.e. once per compiled executable.
        self.traces: collections.Counter = collections.Counter()
        self._shardings: dict[int, SamplingState] = {}  # batch -> each field's sharding
        self._extend = jax.jit(self._traced("extend", extend),
                               static_argnames=("attend_len", "key_block"), donate_argnums=(2,))
        self._extend_rows = jax.jit(self._traced("extend_rows", extend_rows),
                                    static_argnames=("attend_len", "key_block"),
                                    donate_argnums=(2,))
        self._decode = jax.jit(self._traced("decode", decode_segment),
                               static_argnames=("config", "attend_len", "steps"),
                               donate_argnums=(2,))
        self._finish = jax.jit(self._traced("finish", finish_rows), donate_argnums=(0,))
        self._reset = jax.jit(self._traced("reset", reset_rows), donate_argnums=(0,))
        # Not donated: the smaller state cannot reuse the larger one's buffers.
        self._compact = jax.jit(self._traced("compact", compact_rows))
        self._window = jax.jit(self._traced("window", segment_window), static_argnames=("width",))
        self._move = jax.jit(self._traced("move", move_rows), donate_argnums=(3,))

    def _traced(self, name, fn):
        def counted(*args, **kwargs):
            self.traces[name] += 1
            out = fn(*args, **kwargs)
            if name in ("extend", "extend_rows", "finish", "reset", "compact", "move"):
                return jax.lax.with_sharding_constraint(
                    out, self._state_shardings(out.tokens.shape[0]))
            if name == "decode":
                return jax.lax.with_sharding_constraint(
                    out[0], self._state_shardings(out[0].tokens.shape[0])), out[1]
            return out
        return counted

    def set_model(self, model: Decoder) -> None:
        """Samples from new weights of the same architecture (e.g. after a train step).

        The compiled programs take the weights as an argument, so this compiles nothing.
        """
        if model.config != self.model_config:
            raise ValueError("set_model: the new weights are of another model config "
                             f"({model.config} vs {self.model_config})")
        self._params = nnx.state(model)

    @property
    def params(self) -> nnx.State:
        """The weights it samples from: the model's, or those of the last set_model."""
        return self._params

    @property
    def num_compiled(self) -> int:
        """Executables compiled so far by this sampler (traces of its jitted functions)."""
        return sum(self.traces.values())

    def init(self, batch: int, eos_ids: Sequence[int] | np.ndarray, key,
             row_ids: Sequence[int] | None = None) -> SamplingState:
        """An empty state for `batch` rows; eos_ids: ids for every row, or [B, NE] per row."""
        eos = np.asarray(eos_ids, np.int32)
        if eos.ndim == 1:
            eos = np.broadcast_to(eos, (batch, eos.size))
        if eos.shape[0] != batch:
            raise ValueError(f"eos_ids has {eos.shape[0]} rows, batch is {batch}")
        row_ids = np.arange(batch, dtype=np.int32) if row_ids is None else np.asarray(row_ids)
        make = functools.partial(init_state, nnx.merge(self._graphdef, self._params), batch,
                                 self.config.max_len, eos, row_ids)
        return jax.jit(make, out_shardings=self._state_shardings(batch))(key)

    def _state_shardings(self, batch: int) -> SamplingState:
        """Each field's sharding in a state of `batch` rows (`state_shardings`: rows split
        when the mesh's row shards divide them, else replicated)."""
        if batch not in self._shardings:
            model = nnx.merge(self._graphdef, self._params)
            shapes = jax.eval_shape(functools.partial(
                init_state, model, batch, self.config.max_len, np.zeros((batch, 1), np.int32),
                np.zeros(batch, np.int32)), jax.random.key(0))
            self._shardings[batch] = state_shardings(model, shapes, self.mesh)
        return self._shardings[batch]

    def extend(self, state: SamplingState, rows: Sequence[Sequence[int]]) -> SamplingState:
        """Appends rows[b] (token ids; empty: leave row b alone) at each row's cursor.

        When at most half the rows get tokens, only those are computed: `extend_rows` calls
        of B/8 rows each (or the mesh's row shards if more). Never more at once: XLA gathers
        rows split over fsdp by all-reducing the gathered whole, so a gather of half the rows
        would hold half the cache on every chip; the memory plan compiles this size."""
        batch = state.tokens.shape[0]
        if len(rows) != batch:
            raise ValueError(f"extend got {len(rows)} rows of tokens for a batch of {batch}")
        rows = [np.asarray(row, np.int32).reshape(-1) for row in rows]
        slots = np.array([b for b, row in enumerate(rows) if len(row)], np.int32)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]  # rows' shards
        size = max(batch // 8, shards)
        if self.config.batch_invariant:
            size = min(size, batch)
        elif 2 * len(slots) > batch or size >= batch or size % shards:
            return self._extend_rows_of(state, rows, None)  # every row, in place
        empty = np.zeros(0, np.int32)
        for start in range(0, len(slots), size):
            group = slots[start:start + size]
            picked = set(group.tolist())
            state = self._extend_rows_of(
                state, [row if b in picked else empty for b, row in enumerate(rows)],
                np.concatenate([group, np.full(size - len(group), batch, np.int32)]))
        return state

    def _extend_rows_of(self, state: SamplingState, rows: list[np.ndarray],
                        slots: np.ndarray | None) -> SamplingState:
        """Writes rows in chunks (`extend_chunk`), through the rows `slots` (None: all)."""
        longest, start = max(len(row) for row in rows), 0
        while start < longest:
            step = (self.config.invariant_chunk if self.config.batch_invariant else
                    extend_chunk(longest - start, self.config.min_extend_bucket,
                                 self.config.max_extend_chunk))
            state = self._extend_chunk(state, [row[start:start + step] for row in rows], step,
                                       slots)
            start += step
        return state

    def _extend_chunk(self, state: SamplingState, rows: list[np.ndarray], chunk: int,
                      slots: np.ndarray | None) -> SamplingState:
        """Writes rows (each at most `chunk` tokens) as one [B or R, chunk] padded call."""
        batch, max_len = state.tokens.shape
        lengths = np.array([len(r) for r in rows], np.int32)
        cursor = self._fetch(state.cursor)
        reach = int(np.max(np.where(lengths > 0, cursor + lengths, 0)))
        attend = _whole_blocks(power_of_two_bucket(reach, self.config.min_attend_bucket, max_len),
                               self.config.key_block)
        picked = np.arange(batch) if slots is None else slots
        tokens = np.zeros((len(picked), chunk), np.int32)
        for i, b in enumerate(picked):
            if b < batch:
                tokens[i, :len(rows[b])] = rows[b]
        lengths = np.where(picked < batch, lengths[np.minimum(picked, batch - 1)], 0)
        put = functools.partial(jax.device_put, device=self._state_shardings(batch).cursor)
        if slots is None:
            return self._extend(self._graphdef, self._params, state,
                                jax.device_put(tokens, self._state_shardings(batch).tokens),
                                put(lengths.astype(np.int32)), attend_len=attend,
                                key_block=self.config.key_block)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return self._extend_rows(self._graphdef, self._params, state,
                                 jax.device_put(slots, replicated),
                                 jax.device_put(tokens, replicated),
                                 jax.device_put(lengths.astype(np.int32), replicated),
                                 attend_len=attend, key_block=self.config.key_block)

    def decode(self, state: SamplingState, steps: int | None = None,
               min_stops: int | None = None) -> tuple[SamplingState, Segment]:
        """Runs one segment (steps None), or at most `steps` tokens of each row's current one,
        ending once `min_stops` rows have stopped (`decode_segment`); returns the new state
        and what the host needs of it."""
        max_len = state.tokens.shape[1]
        status, cursor = self._fetch(state.status), self._fetch(state.cursor)
        running = status == RUNNING
        if not running.any():
            raise ValueError("decode: no row is RUNNING; extend some rows first")
        reach = int(cursor[running].max()) + (self.config.segment_len if steps is None
                                              else min(steps, self.config.segment_len))
        attend = _whole_blocks(attend_bucket(reach, self.config.min_attend_bucket, max_len),
                               self.config.key_block)
        if min_stops is not None:
            min_stops = jax.device_put(np.int32(min_stops),
                                       NamedSharding(self.mesh, PartitionSpec()))
        state, logits = self._decode(self._graphdef, self._params, state, self._stop_table,
                                     config=self.config, attend_len=attend, steps=steps,
                                     min_stops=min_stops)
        after = self._fetch(state.cursor)
        segment = Segment(status=self._fetch(state.status), stop_id=self._fetch(state.stop_id),
                          overshoot=self._fetch(state.overshoot),
                          segment_start=self._fetch(state.segment_start), cursor=after,
                          logits=None if logits is None else np.asarray(logits),
                          steps=int((after - cursor)[running].max()))
        return state, segment

    def new_tokens(self, state: SamplingState, segment: Segment,
                   rows: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """row -> (tokens, log-probs) it sampled in the segment, for the rows asked for."""
        if len(rows) == 0:
            return {}
        tokens, logprobs = self._window(state, width=self.config.segment_len)
        tokens, logprobs = self._fetch(tokens), self._fetch(logprobs)
        out = {}
        for b in rows:
            n = int(segment.cursor[b] - segment.segment_start[b])
            out[int(b)] = (tokens[b, :n], logprobs[b, :n])
        return out

    def reset(self, state: SamplingState, rows: Sequence[int],
              row_ids: Sequence[int]) -> SamplingState:
        """Empties `rows` for new trajectories with global ids `row_ids` (`reset_rows`)."""
        mask = np.zeros(state.tokens.shape[0], bool)
        ids = np.zeros(state.tokens.shape[0], np.int32)
        mask[np.asarray(rows, np.int64)] = True
        ids[np.asarray(rows, np.int64)] = np.asarray(row_ids, np.int32)
        put = functools.partial(jax.device_put,
                                device=self._state_shardings(len(mask)).cursor)
        return self._reset(state, put(mask), put(ids))

    def compact(self, state: SamplingState, rows: Sequence[int], size: int) -> SamplingState:
        """A state of `size` rows: row i is row rows[i] of `state`, the rest empty (FINISHED).
        size must be a multiple of the mesh's row shards."""
        picked = np.full(size, state.tokens.shape[0], np.int32)
        picked[:len(rows)] = rows
        keep = np.arange(size) < len(rows)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return self._compact(self._graphdef, self._params, state,
                             jax.device_put(picked, replicated), jax.device_put(keep, replicated))

    def move(self, source: SamplingState, target: SamplingState, source_rows: Sequence[int],
             target_rows: Sequence[int]) -> SamplingState:
        """target with row target_rows[i] holding source's row source_rows[i] (`move_rows`),
        in calls of an eighth of target's rows (or the row shards if more): one program per
        pair of state sizes, and, as for `extend`'s few-row calls, a bounded share of the
        cache gathered at once. Raises ValueError when the two lists differ in length."""
        if len(source_rows) != len(target_rows):
            raise ValueError(f"move: {len(source_rows)} source rows for {len(target_rows)} "
                             "target rows")
        batch = target.tokens.shape[0]
        size = max(batch // 8, self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        for start in range(0, len(source_rows), size):
            picked = np.full((2, size), batch, np.int32)
            picked[0, :] = source.tokens.shape[0] - 1
            part = slice(start, start + size)
            picked[0, :len(source_rows[part])] = source_rows[part]
            picked[1, :len(target_rows[part])] = target_rows[part]
            target = self._move(self._graphdef, self._params, source, target,
                                jax.device_put(picked[0], replicated),
                                jax.device_put(picked[1], replicated))
        return target

    def finish(self, state: SamplingState, rows: Sequence[int]) -> SamplingState:
        """Ends the given rows (e.g. paused at `</answer>`, or out of retrieval rounds)."""
        mask = np.zeros(state.tokens.shape[0], bool)
        mask[np.asarray(rows, np.int64)] = True
        return self._finish(state, jax.device_put(mask, self._state_shardings(len(mask)).cursor))

    @staticmethod
    def _fetch(array) -> np.ndarray:
        return sharding.host_array(array)
