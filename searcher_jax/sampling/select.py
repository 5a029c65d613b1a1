"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Every row draws with its own key, so its samples do not depend on which
other rows share the batch. Top-p looks only at the `candidates` most likely
tokens (one `lax.top_k`), never sorting a 152k vocabulary.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """How a token is drawn; static (part of the compiled program)."""
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut.
    top_p: float = 1.0  # 1.0: no nucleus cut.
    # Top-p keeps at most this many tokens (its pre-filter); with top_k set, top_k is used.
    top_p_candidates: int = 512

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when not greedy, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.top_p_candidates < 1:
            raise ValueError(f"top_k ({self.top_k}) must be >= 0 and top_p_candidates "
                             f"({self.top_p_candidates}) >= 1")


def row_keys(key, row_ids, positions):
    """[B] keys: the base key folded with each row's id, then the position it samples."""
    return jax.vmap(lambda r, p: jax.random.fold_in(jax.random.fold_in(key, r), p))(
        row_ids, positions)


def select_tokens(logits, keys, config: SelectConfig):
    """logits [B, V] float32, keys [B] -> tokens [B] int32."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / config.temperature
    if config.top_k == 0 and config.top_p >= 1.0:
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    vocab = scaled.shape[-1]
    k = config.top_k if config.top_k else config.top_p_candidates
    values, ids = jax.lax.top_k(scaled, min(k, vocab))  # [B, k], descending
    if config.top_p < 1.0:
        # Cumulative mass over the full distribution (or over the top-k, as
        # transformers applies top-p after top-k); keep each token whose
        # preceding mass is below top_p, so the most likely always stays.
        norm = jax.nn.logsumexp(values if config.top_k else scaled, axis=-1, keepdims=True)
        probs = jnp.exp(values - norm)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < config.top_p, values, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, values)  # [B]
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def token_logprobs(logits, tokens):
    """log softmax(logits) at tokens: logits [B, V] float32, tokens [B] -> [B] float32."""
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
