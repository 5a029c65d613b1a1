"""The sampler's device state: static shapes, one row per trajectory.

Invariant: every token in `tokens[b, :cursor[b]]` has its keys and values in
the cache, and `last_hidden[b]` is the model's output at the last of them, so
the next token's logits are one matmul away and nothing is ever re-encoded.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# Row status.
RUNNING = 0  # Samples in the next segment.
PAUSED = 1  # Sampled a token that completed a stop string; waits for the host.
FINISHED = 2  # Sampled an end-of-sequence id, or the host ended it.
TRUNCATED = 3  # Its buffer is full.
STATUS_NAMES = ("running", "paused", "finished", "truncated")


@struct.dataclass
class SamplingState:
    tokens: jax.Array  # [B, T] int32; prompt, sampled and inserted tokens.
    logprobs: jax.Array  # [B, T] float32; log-prob of each sampled token, 0 elsewhere.
    cache: Any  # The decoder's KV cache for T slots, compute dtype.
    last_hidden: jax.Array  # [B, E] compute dtype; output at the row's last token.
    cursor: jax.Array  # [B] int32; next write position (= tokens held).
    segment_start: jax.Array  # [B] int32; cursor when the last segment began.
    status: jax.Array  # [B] int32; RUNNING / PAUSED / FINISHED / TRUNCATED.
    stop_state: jax.Array  # [B] int32; stop automaton state over the tokens sampled since extend.
    stop_id: jax.Array  # [B] int32; which stop string paused the row, or -1.
    overshoot: jax.Array  # [B] int32; bytes of the stopping token past the stop string.
    eos_ids: jax.Array  # [B, NE] int32; per-row end-of-sequence ids, -1 padded.
    row_ids: jax.Array  # [B] int32; folded into the PRNG key (global row index).
    key: jax.Array  # PRNG key shared by all rows (each folds in its row id).


def init_state(model, batch: int, max_len: int, eos_ids, row_ids, key) -> SamplingState:
    """An empty state: no tokens, every row FINISHED until `extend` gives it a prompt.

    eos_ids [B, NE] int32 (-1 padded), row_ids [B] int32.
    """
    return SamplingState(
        tokens=jnp.zeros((batch, max_len), jnp.int32),
        logprobs=jnp.zeros((batch, max_len), jnp.float32),
        cache=model.init_cache(batch, max_len),
        last_hidden=jnp.zeros((batch, model.config.hidden_size), model.compute_dtype),
        cursor=jnp.zeros((batch,), jnp.int32),
        segment_start=jnp.zeros((batch,), jnp.int32),
        status=jnp.full((batch,), FINISHED, jnp.int32),
        stop_state=jnp.zeros((batch,), jnp.int32),
        stop_id=jnp.full((batch,), -1, jnp.int32),
        overshoot=jnp.zeros((batch,), jnp.int32),
        eos_ids=jnp.asarray(eos_ids, jnp.int32),
        row_ids=jnp.asarray(row_ids, jnp.int32),
        key=key,
    )
