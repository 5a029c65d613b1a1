"""The search-augmented rollout (SPEC section 2): sampler <-> retriever.

    trajectories = rollout(sampler, tokenizer, retriever, prompt_ids, RolloutConfig(), key)

Two schedules give the same trajectories (a row's tokens depend only on the key, its row
id and its own tokens). This module's, `schedule="barrier"`, goes round by round: every
round decodes one segment for the live rows; a row that paused at
`<|end_of_query|>` gets its query searched (one batch per round) and the
document block appended with `Sampler.extend`, which writes at the row's
cursor, so no prefix is ever re-encoded. `schedule="continuous"`
(continuous_rollout.py) lets each row pause, search and resume on its own and
refills the slots of rows that ended. Rows end at `</answer>`, any of the
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
token patterns afterwards (rollout_rows.py), and the barrier schedule checks
the host's tokens and log-probs against the sampler's buffer, so the tokens
trained on are exactly the tokens sampled.

A stop string need not end on a token boundary: the token that completes
`<|end_of_query|>` may carry characters past it (with Qwen2.5, `|>\\n\\n` is
`|` + `>\\n\\n`). The query is the text up to the tag; the insert is what
remains of the environment's text after what the policy already wrote, so
the decoded whole reads exactly as the spec's. When the overshoot is not a
prefix of that text, the sampled tokens stay, the whole block is inserted and
the row counts in `overshoot_mismatches`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from searcher_jax import continuous_rollout
from searcher_jax.model import sharding
from searcher_jax.rollout_rows import (ANSWER_END, END_REASONS, STOP_STRINGS,  # noqa: F401 - the API
                                       RolloutConfig, Row, Searcher, Tokenizer, Trajectories,
                                       assemble, clean_query, concatenate, insert_text,
                                       split_at_query)
from searcher_jax.sampling.sampler import Sampler
from searcher_jax.sampling.state import PAUSED, RUNNING


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
        config.sampler_rows that does not divide B (barrier schedule).
    """
    if list(sampler.stop_strings) != list(STOP_STRINGS):
        raise ValueError(f"the rollout's sampler must stop at {STOP_STRINGS} (in that order), "
                         f"it stops at {tuple(sampler.stop_strings)}")
    eos_ids = [int(i) for i in eos_ids]
    if not eos_ids:
        raise ValueError("rollout: eos_ids is empty; a rollout needs an id that ends rows")
    empty = [b for b, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"rollout: empty prompt at row(s) {empty}")
    batch = len(prompt_ids)
    group = min(config.sampler_rows or batch, batch)
    if config.schedule == "continuous":
        return continuous_rollout.rollout(sampler, tokenizer, retriever, prompt_ids, config, key,
                                          eos_ids=eos_ids, slots=group)
    if batch % group:
        raise ValueError(f"rollout: rollout.sampler_rows={group} does not divide the {batch} "
                         "rows of the batch (prompts x samples per prompt)")
    return concatenate([
        _barrier_rows(sampler, tokenizer, retriever, prompt_ids[start:start + group], config,
                      key, eos_ids, row_ids=np.arange(start, start + group, dtype=np.int32))
        for start in range(0, batch, group)])


def _barrier_rows(sampler: Sampler, tokenizer: Tokenizer, retriever: Searcher,
                  prompt_ids: Sequence[Sequence[int]], config: RolloutConfig, key,
                  eos_ids: Sequence[int], row_ids: np.ndarray) -> Trajectories:
    """One sampler call's rows, round by round (row_ids: their ids in the whole batch)."""
    batch = len(prompt_ids)
    rows = [Row(prompt=np.asarray(p, np.int32)) for p in prompt_ids]
    state = sampler.extend(sampler.init(batch, eos_ids, key, row_ids=row_ids), prompt_ids)
    live = _fetch(state.status) == RUNNING
    for b in np.flatnonzero(~live):
        rows[b].end_reason = "truncated"  # the prompt alone fills the buffer
    slot_steps = 0
    while live.any():
        state, segment = sampler.decode(state)
        slot_steps += batch * int((segment.cursor - segment.segment_start)[live].max())
        to_finish, searches = [], []  # searches: (row, query, overshoot)
        for b, (tokens, logprobs) in sampler.new_tokens(state, segment,
                                                        np.flatnonzero(live)).items():
            search = rows[b].end_segment(tokens, logprobs, segment.status[b],
                                         segment.stop_id[b], config, tokenizer)
            if search is None:
                if segment.status[b] in (RUNNING, PAUSED):
                    to_finish.append(b)
            else:
                searches.append((b, *search))
        if to_finish:
            state = sampler.finish(state, to_finish)
        if not searches:
            break

        found = retriever.search([query for _, query, _ in searches], config.top_k)
        room = sampler.config.max_len - segment.cursor  # finish() moves no cursor
        inserts, overflowing = [[] for _ in range(batch)], []
        for (b, query, overshoot), passages in zip(searches, found):
            ids = rows[b].add_documents(query, overshoot, passages, int(room[b]), tokenizer)
            if ids is None:
                overflowing.append(b)
            else:
                inserts[b] = ids
        if overflowing:
            state = sampler.finish(state, overflowing)
        state = sampler.extend(state, inserts)
        live = _fetch(state.status) == RUNNING
        for b, _, _ in searches:
            if not live[b]:
                rows[b].end_reason = "truncated"  # the block filled the buffer exactly
    out = assemble(rows, sampler.config.max_len, tokenizer, decode_slot_steps=slot_steps)
    # The host's pieces and the device buffer must agree, token for token.
    width = out.tokens.shape[1]
    held = np.arange(width)[None, :] < out.lengths[:, None]
    device_tokens = np.where(held, _fetch(state.tokens)[:, :width], 0)
    device_logprobs = np.where(out.loss_mask, _fetch(state.logprobs)[:, :width], 0.0)
    for b in range(batch):
        if not (np.array_equal(device_tokens[b], out.tokens[b])
                and np.array_equal(device_logprobs[b], out.sampler_logprobs[b])):
            raise RuntimeError(f"rollout row {b}: host pieces differ from the sampler's buffer")
    return out


def _fetch(array) -> np.ndarray:
    return sharding.host_array(array)
