"""Checks that a model writes the search format: sample after the prompt, count queries.

A deliberately plain sampler (one prefill, then one token per step through the
decoder's KV cache, no stop strings, no top-p); the real sampler is
searcher_jax/sampling.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from searcher_jax.model.decoder import Decoder

_QUERY = re.compile(r"<\|begin_of_query\|>(.*?)<\|end_of_query\|>", re.DOTALL)


def has_well_formed_query(text: str) -> bool:
    """A `<|begin_of_query|>`, then non-blank text, then `<|end_of_query|>`."""
    match = _QUERY.search(text)
    return match is not None and bool(match.group(1).strip())


def sample(model: Decoder, prompts: list[list[int]], max_new_tokens: int, seed: int,
           temperature: float = 1.0) -> list[list[int]]:
    """`max_new_tokens` sampled ids after each prompt (ancestral sampling, no stop)."""
    lengths = np.array([len(ids) for ids in prompts], np.int32)                # [B]
    padded = np.zeros((len(prompts), int(lengths.max())), np.int32)             # [B, P]
    for row, ids in enumerate(prompts):
        padded[row, :len(ids)] = ids
    width = padded.shape[1] + max_new_tokens
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, padded, lengths, key):
        model = nnx.merge(graphdef, state)
        rows = jnp.arange(padded.shape[0])
        # Right padding: a row's pad slots in the cache are overwritten by its own new tokens
        # before any query position reaches them.
        cache = model.init_cache(padded.shape[0], width)
        hidden, cache = model.forward_hidden(padded, cache=cache, write_index=jnp.zeros_like(
            lengths), attend_len=width)                                         # [B, P, E]
        last_hidden = hidden[rows, lengths - 1]                                 # [B, E]

        def step(carry, step_key):
            last_hidden, cache, cursor = carry
            logits = model.logits(last_hidden)                                  # [B, V]
            token = jax.random.categorical(step_key, logits / temperature)     # [B]
            hidden, cache = model.forward_hidden(token[:, None].astype(jnp.int32), cache=cache,
                                                 write_index=cursor, attend_len=width)
            return (hidden[:, 0], cache, cursor + 1), token

        keys = jax.random.split(key, max_new_tokens)
        _, tokens = jax.lax.scan(step, (last_hidden, cache, lengths), keys)    # [N, B]
        return tokens.T

    return np.asarray(run(state, padded, lengths, jax.random.key(seed))).tolist()


def query_rate(model: Decoder, tokenizer, prompts: list[str], max_new_tokens: int,
               seed: int) -> tuple[float, list[str]]:
    """The share of samples with a well-formed query, and the sampled texts."""
    ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    eos = tokenizer.eos_token_id
    samples = [new[:new.index(eos)] if eos in new else new
               for new in sample(model, ids, max_new_tokens, seed)]
    texts = [tokenizer.decode(new) for new in samples]
    return sum(map(has_well_formed_query, texts)) / len(texts), texts
