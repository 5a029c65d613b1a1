"""Log-probs and entropy of given tokens under a policy, without a [B, T, vocab] tensor.

The shift, once for the whole package: the logits at position t predict the
token at t + 1. Every per-token array here and downstream is aligned to the
token it scores:

    logp[b, t] = log pi(tokens[b, t] | tokens[b, :t])   for t >= 1
    logp[b, 0] = 0                                       (nothing predicts the first token)

so a loss mask [B, T] that is 1 on the policy-sampled tokens lines up with
logp directly (its column 0 is a prompt token and always 0). Rows are right
padded and start at position 0; the causal mask keeps padding out of every
real token's log-prob.

The vocabulary projection runs over `chunk` positions at a time under
`jax.checkpoint`, so the forward holds at most [B, chunk, vocab] logits and
the backward recomputes them chunk by chunk instead of storing them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _chunk_stats(model, hidden, targets):
    """hidden [B, C, E], targets [B, C] -> (log-prob of the target, entropy), [B, C] each."""
    logits = model.logits(hidden)  # [B, C, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    # A select-and-sum, not a gather, so a vocab-sharded logits chunk reduces in place.
    target_logit = jnp.where(vocab_ids == targets[..., None], logits, 0.0).sum(axis=-1)
    logits = jax.lax.stop_gradient(logits)
    probs = jnp.exp(logits - jax.lax.stop_gradient(lse)[..., None])
    entropy = jax.lax.stop_gradient(lse) - (probs * logits).sum(axis=-1)
    return target_logit - lse, entropy


def token_logprobs(model: nnx.Module, tokens, chunk: int):
    """tokens [B, T] int32 -> (logp [B, T], entropy [B, T]) float32, aligned as above.

    entropy[b, t] is the entropy of the distribution that predicted tokens[b, t]
    (0 at t = 0); it carries no gradient.
    """
    b, t = tokens.shape
    if t < 2:
        raise ValueError(f"token_logprobs needs sequences of at least 2 tokens, got T={t}")
    hidden, _ = model.forward_hidden(tokens)  # [B, T, E]
    hidden, targets = hidden[:, :-1], tokens[:, 1:]  # position t predicts token t + 1
    n = t - 1
    chunk = min(chunk, n)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, num_chunks, chunk, -1).swapaxes(0, 1)  # [nc, B, C, E]
    targets = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)  # [nc, B, C]

    stats = jax.checkpoint(lambda h, y: _chunk_stats(model, h, y))
    logp, entropy = jax.lax.map(lambda hy: stats(*hy), (hidden, targets))  # [nc, B, C] each

    def unchunk(x):
        x = x.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :n]
        return jnp.pad(x, ((0, 0), (1, 0)))  # column 0: no prediction

    return unchunk(logp), unchunk(entropy)


def policy_logprobs(graphdef, params, tokens, chunk: int):
    """The pure form over (graphdef, params): tokens [B, T] -> (logp, entropy) [B, T]."""
    return token_logprobs(nnx.merge(graphdef, params), tokens, chunk)
