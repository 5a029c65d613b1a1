"""Length-aware micro-batches (rl/length_buckets.py) against the padded step: the same loss,
gradients and optimizer state after 3 steps on rows of 64 to 1,024 tokens."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.model import sharding
from searcher_jax.rl import length_buckets
from searcher_jax.rl import train_step as ts
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig

ROWS, LENGTH, VOCAB = 8, 1024, 64


def test_bucket_widths():
    assert length_buckets.bucket_widths(1024, 4) == (256, 512, 768, 1024)
    assert length_buckets.bucket_widths(100, 3) == (40, 72, 100)   # rounded up to 8s
    assert length_buckets.bucket_widths(1024, 1) == (1024,)
    with pytest.raises(ValueError, match="length_buckets must be >= 1"):
        length_buckets.bucket_widths(1024, 0)


def test_at_width_takes_the_smallest_width_that_holds_the_rows():
    widths = (4, 8, 12)
    width_of = lambda xs: jnp.int32(xs["x"].shape[1])  # pylint: disable=unnecessary-lambda-assignment
    x = {"x": jnp.zeros((2, 12))}
    for needed, expected in ((0, 4), (4, 4), (5, 8), (9, 12), (12, 12)):
        assert int(jax.jit(lambda n: length_buckets.at_width(width_of, widths, n, x))(
            jnp.int32(needed))) == expected


def test_rows_sorted_within_their_mini_batch_and_back():
    ends = jnp.asarray([[[5, 1], [3, 3]], [[0, 9], [2, 7]]], jnp.int32)   # [k=2, nm=2, m=2]
    order = length_buckets.mini_batch_order(ends)
    x = jnp.arange(8).reshape(2, 2, 2)   # row ids
    sorted_ids = length_buckets.permute(x, order)
    np.testing.assert_array_equal(length_buckets.permute(ends, order).reshape(2, 4),
                                  [[1, 3, 3, 5], [0, 2, 7, 9]])
    # Rows never leave their mini-batch (the optimizer steps keep their rows).
    assert set(np.asarray(sorted_ids[0]).ravel()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(length_buckets.unpermute(sorted_ids, order), x)


def _batch():
    """Rows of 64 to 1,024 tokens (prompt 16 to 48, then sampled tokens), right padded."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, LENGTH + 1, ROWS)
    lengths[3] = LENGTH   # one row the full width, as in a rollout batch
    tokens = np.zeros((ROWS, LENGTH), np.int32)
    mask = np.zeros((ROWS, LENGTH), np.float32)
    for row, length in enumerate(lengths):
        prompt = int(rng.integers(16, 49))
        tokens[row, :length] = rng.integers(1, VOCAB, length)
        mask[row, prompt:length] = 1
    return RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask),
                        rewards=jnp.asarray(rng.normal(size=ROWS), jnp.float32),
                        ref_logprobs=jnp.asarray(rng.normal(-3, 0.1, (ROWS, LENGTH)), jnp.float32))


def _three_steps(model, batch, config, mesh=None):
    graphdef, params = model
    params = jax.tree.map(jnp.array, params)
    if mesh is None:
        state = ts.init_train_state(params, config)
        step = jax.jit(ts.build_train_step(graphdef, config))
    else:
        state = ts.make_init_fn(config, params, mesh)(params)
        step = ts.make_train_step(graphdef, state, config, mesh)
        batch = jax.device_put(batch, ts.batch_shardings(batch, mesh))
    history = []
    for _ in range(3):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def _norm(tree):
    return np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree.leaves(tree)))


def test_length_aware_step_equals_the_padded_step(tiny_model):
    """Two mini-batches of 4 rows, micro-batches of 2 at widths 512 or 1,024 (two buckets: each
    is a compiled branch, and CI's time is counted); KL in the reward. The length-aware step
    runs sharded (rows over fsdp 2: the sort moves rows between devices), the padded one on
    one device. Dr. GRPO's seq_sum_batch_mean divides by the batch's width T (norm_tokens 0),
    which a micro-batch cut to its own width must not change."""
    model = tiny_model(num_layers=1)
    padded = RLConfig(estimator="reinforce_baseline", samples_per_prompt=4, kl_coef=0.01,
                      mini_batch_size=4, micro_batch_size=2, learning_rate=1e-2,
                      total_steps=10, logprob_chunk=256, aggregation="seq_sum_batch_mean")
    bucketed = dataclasses.replace(padded, length_buckets=2)
    batch = _batch()
    # Both branches run: sorted by length, some micro-batch fits 512 and some does not.
    ends = np.asarray(length_buckets.row_ends(batch.loss_mask.astype(bool)))
    by_mini = np.sort(ends.reshape(2, 4, order="F"), axis=1)   # rows strided over mini-batches
    widths = by_mini.reshape(2, 2, 2).max(axis=2).ravel()      # each micro-batch's longest row
    assert (widths <= 512).any() and (widths > 512).any(), widths
    state, history = _three_steps(model, batch, padded)
    mesh = sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    state_b, history_b = _three_steps(model, batch, bucketed, mesh)
    for metrics, metrics_b in zip(history, history_b):
        for name in ("loss", "pg_loss", "grad_norm", "clip_frac", "approx_kl", "entropy",
                     "ref_kl_mean", "advantage_std"):
            np.testing.assert_allclose(metrics_b[name], metrics[name], rtol=1e-4, atol=1e-7,
                                       err_msg=name)
    assert history[-1]["approx_kl"] > 0   # the later steps moved the policy
    assert int(state_b.step) == int(state.step) == 6   # 2 optimizer steps a batch, 3 batches
    # Within fp32 reassociation, as test_train_step holds the sharded step to one device: Adam
    # divides by sqrt(nu), so an element with a tiny gradient can differ by more on its own.
    start = model[1]
    moved = jax.tree.map(lambda x, x0: np.asarray(x) - np.asarray(x0), state.params, start)
    moved_b = jax.tree.map(lambda x, x0: np.asarray(x) - np.asarray(x0), state_b.params, start)
    assert _norm(moved) > 1e-2 * _norm(start)
    assert _norm(jax.tree.map(np.subtract, moved_b, moved)) <= 1e-4 * _norm(moved)
    for x, y in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(state_b.opt_state)):
        assert np.linalg.norm(np.asarray(y, np.float64) - np.asarray(x)) <= (
            1e-4 * np.linalg.norm(np.asarray(x, np.float64)) + 1e-12)
