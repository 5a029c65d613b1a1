"""Checks that a model writes the search format: sample after the prompt, count queries.

Sampling runs through the real sampler (searcher_jax/sampling) with no stop
strings, so a row ends at end-of-sequence or after `max_new_tokens`.
"""
import re
from collections.abc import Sequence

import jax

from searcher_jax.model.decoder import Decoder
from searcher_jax.sampling import select
from searcher_jax.sampling.sampler import Sampler, SamplerConfig

_QUERY = re.compile(r"<\|begin_of_query\|>(.*?)<\|end_of_query\|>", re.DOTALL)


def has_well_formed_query(text: str) -> bool:
    """A `<|begin_of_query|>`, then non-blank text, then `<|end_of_query|>`."""
    match = _QUERY.search(text)
    return match is not None and bool(match.group(1).strip())


def sample(model: Decoder, prompts: list[list[int]], max_new_tokens: int, seed: int,
           eos_ids: Sequence[int], temperature: float = 1.0, greedy: bool = False,
           batch_size: int | None = None) -> list[list[int]]:
    """Up to `max_new_tokens` sampled ids after each prompt, cut before the first of `eos_ids`.

    Prompts go through one sampler in fixed batches of `batch_size` (None: all at once; the
    last batch padded with repeats), so a whole set compiles its programs once. Row i draws
    with its own key (row id i), whichever batch it is in.
    """
    if not prompts:
        return []
    batch = min(batch_size or len(prompts), len(prompts))
    config = SamplerConfig(max_len=max(map(len, prompts)) + max_new_tokens,
                           segment_len=max_new_tokens,
                           select=select.SelectConfig(greedy=greedy, temperature=temperature))
    sampler = Sampler(model, config)
    ends = set(eos_ids)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        rows = len(chunk)
        chunk += [chunk[-1]] * (batch - rows)
        state = sampler.extend(sampler.init(batch, list(eos_ids), jax.random.key(seed),
                                            row_ids=range(start, start + batch)), chunk)
        state, segment = sampler.decode(state)
        new = sampler.new_tokens(state, segment, range(rows))
        for row in range(rows):
            tokens = new[row][0].tolist()
            out.append(next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens))
    return out


def query_rate(model: Decoder, tokenizer, prompts: list[str], max_new_tokens: int,
               seed: int, eos_ids: Sequence[int]) -> tuple[float, list[str]]:
    """The share of samples with a well-formed query, and the sampled texts.

    eos_ids: every id that ends a sample (`hf_io.eos_token_ids`), as in the rollout.
    """
    ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    texts = [tokenizer.decode(new) for new in sample(model, ids, max_new_tokens, seed, eos_ids)]
    return sum(map(has_well_formed_query, texts)) / len(texts), texts
