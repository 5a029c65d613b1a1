"""Pretraining pieces: rows, batches, the masked loss, the train step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.model.decoder import Decoder
from searcher_jax.synthetic import pretrain

TINY = pretrain.PretrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                               seq_len=16, batch_size=4, steps=60, warmup_steps=2,
                               learning_rate=1e-2, demo_fraction=0.5, short_steps=20,
                               short_seq_len=8, short_batch_size=4)


def test_demo_rows_pad_cut_and_end_with_eos():
    rows, num_cut = pretrain.demo_rows([[5, 6], list(range(1, 20))], eos_id=0, seq_len=8)
    np.testing.assert_array_equal(rows.tokens[0], [5, 6, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows.mask[0], [1, 1, 1, 0, 0, 0, 0, 0])   # EOS is learned
    np.testing.assert_array_equal(rows.tokens[1], range(1, 9))               # cut, no EOS
    assert rows.mask[1].all() and num_cut == 1


def test_sample_batch_mixes_demos_and_passage_windows():
    demos, _ = pretrain.demo_rows([[7] * 3] * 5, eos_id=0, seq_len=TINY.seq_len)
    stream = pretrain.passage_stream([[1, 2, 3]] * 20, eos_id=0)
    np.testing.assert_array_equal(stream[:8], [1, 2, 3, 0, 1, 2, 3, 0])
    batch = pretrain.sample_batch(np.random.default_rng(0), demos, stream, TINY)
    assert batch.tokens.shape == batch.mask.shape == (TINY.batch_size, TINY.seq_len)
    assert (batch.tokens[:2, 0] == 7).all() and batch.mask[:2].sum() == 2 * 4
    assert batch.mask[2:].all() and set(np.unique(batch.tokens[2:])) <= {0, 1, 2, 3}


def test_masked_loss_ignores_padding_and_matches_cross_entropy():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = pretrain.masked_next_token_loss(logits, tokens, mask)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    terms = [-log_probs[0, t, tokens[0, t + 1]] for t in range(4)]
    terms += [-log_probs[1, t, tokens[1, t + 1]] for t in range(2)]
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-6)
    # Logits at padded targets do not matter.
    changed = logits.at[1, 2:].set(100.0)
    np.testing.assert_allclose(pretrain.masked_next_token_loss(changed, tokens, mask), loss,
                               rtol=1e-6)


def test_pretrain_learns_the_short_rows_then_the_long_ones():
    model = Decoder(TINY.model_config(tokenizer_size=20, eos_token_id=0), rngs=nnx.Rngs(0))
    assert model.config.vocab_size == 128   # padded up like Qwen's vocab
    demos, _ = pretrain.demo_rows([[3, 4, 5, 6, 7, 8, 9, 10]] * 4, eos_id=0, seq_len=TINY.seq_len)
    stream = pretrain.passage_stream([[11, 12, 13]] * 30, eos_id=0)
    short, _ = pretrain.demo_rows([[14, 15, 16, 17]] * 4, eos_id=0, seq_len=TINY.short_seq_len)
    losses = pretrain.pretrain(model, demos, stream, short, TINY, log=lambda message: None)
    assert len(losses) == TINY.steps
    phase_1, phase_2 = losses[:TINY.short_steps], losses[TINY.short_steps:]
    assert np.mean(phase_1[-3:]) < 0.25 * phase_1[0]
    # The long rows are new text at the switch (their loss jumps), then learned too.
    assert phase_2[0] > 2 * np.mean(phase_1[-3:])
    assert np.mean(phase_2[-5:]) < 0.25 * phase_2[0]


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(TINY, warmup_steps=TINY.steps)
    with pytest.raises(ValueError, match="short_steps"):
        dataclasses.replace(TINY, short_steps=TINY.steps)
    with pytest.raises(ValueError, match="demo_fraction"):
        dataclasses.replace(TINY, demo_fraction=0.0)
