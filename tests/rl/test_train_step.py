"""The train step: gradient accumulation, sharded parity, non-finite skips, first-step ratio."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.model import sharding
from searcher_jax.rl import train_step as ts
from searcher_jax.rl.batch import RolloutBatch, split_rows, unsplit_rows
from searcher_jax.rl.config import RLConfig

ROWS, LENGTH, VOCAB = 48, 16, 64
CONFIG = RLConfig(estimator="reinforce_baseline", samples_per_prompt=4, kl_coef=0.01,
                  kl_in="reward", mini_batch_size=16, micro_batch_size=8, learning_rate=1e-2,
                  total_steps=20, logprob_chunk=8)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(num_layers=2, scan_layers=True)


def _mask(rng, rows):
    """Responses of unequal lengths with a document hole in some."""
    mask = np.zeros((rows, LENGTH), np.float32)
    for row in range(rows):
        start, end = int(rng.integers(2, 6)), int(rng.integers(9, LENGTH + 1))
        mask[row, start:end] = 1
        if row % 3 == 0:
            mask[row, start + 2:start + 4] = 0
    return mask


@pytest.fixture(scope="module")
def batch(model):
    graphdef, params = model
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (ROWS, LENGTH)), jnp.int32)
    logprob_fn = ts.make_logprob_fn(graphdef, CONFIG)
    reference = jax.tree.map(lambda x: x + 0.01 * jnp.sin(7 * x), params)
    return RolloutBatch(tokens=tokens, loss_mask=jnp.asarray(_mask(rng, ROWS)),
                        rewards=jnp.asarray(rng.normal(size=ROWS), jnp.float32),
                        ref_logprobs=logprob_fn(reference, tokens),
                        sampler_logprobs=logprob_fn(params, tokens))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _run(model, batch, mesh_shape, devices=None):
    graphdef, params = model
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    init = ts.make_init_fn(CONFIG, params, mesh)
    state = init(_copy(params))
    step = ts.make_train_step(graphdef, state, CONFIG, mesh)
    batch = jax.device_put(batch, ts.batch_shardings(batch, mesh))
    state, metrics = step(state, batch)
    return state, jax.device_get(metrics), step, batch


def _flat(params):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])


@pytest.fixture(scope="module")
def single_device(model, batch):
    return _run(model, batch, {}, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"data": 8}])
def test_sharded_step_matches_one_device(model, batch, single_device, mesh_shape):
    assert len(jax.devices()) == 8
    state, metrics, _, _ = _run(model, batch, mesh_shape)
    reference_state, reference_metrics, _, _ = single_device
    start = _flat(model[1])
    moved = _flat(reference_state.params) - start
    moved_sharded = _flat(state.params) - start
    assert int(state.step) == 3 == int(reference_state.step)  # 48 rows / 16 per step
    # Params moved by far more than the tolerance (lr 1e-2 over 3 Adam steps).
    assert np.linalg.norm(moved) > 1e-2 * np.linalg.norm(start)
    assert np.linalg.norm(moved_sharded - moved) <= 1e-4 * np.linalg.norm(moved)
    for name in ("loss", "clip_frac", "approx_kl", "ref_kl_mean", "advantage_std"):
        np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-4,
                                   atol=1e-7)


def test_step_metrics(single_device):
    state, metrics, _, _ = single_device
    assert metrics["skipped_steps"] == 0 and int(state.skipped) == 0
    assert metrics["optimizer_steps"] == 3
    # The step's old log-probs are the policy's own: the separately computed ones agree.
    assert metrics["sampler_logp_abs_diff_max"] < 1e-5
    assert metrics["ref_kl_mean"] != 0
    np.testing.assert_allclose(metrics["advantage_mean"], 0.0, atol=1e-5)  # whitened
    assert 0 < metrics["clip_frac"] < 1 and metrics["approx_kl"] > 0  # later steps moved
    assert np.isfinite(metrics["grad_norm"]) and metrics["entropy"] > 0
    np.testing.assert_allclose(metrics["learning_rate"],
                               np.mean([float(ts.learning_rate_schedule(CONFIG)(i))
                                        for i in range(3)]), rtol=1e-6)


def test_nan_in_batch_skips_steps_and_keeps_state(single_device):
    state, _, step, batch = single_device
    before = jax.device_get(state)
    rewards = np.asarray(batch.rewards).copy()
    rewards[5] = np.nan
    poisoned = RolloutBatch(tokens=batch.tokens, loss_mask=batch.loss_mask,
                            rewards=jax.device_put(rewards, batch.rewards.sharding),
                            ref_logprobs=batch.ref_logprobs,
                            sampler_logprobs=batch.sampler_logprobs)
    state, metrics = step(_copy(state), poisoned)
    assert float(metrics["skipped_steps"]) == 3  # whitening spreads the NaN to every step
    assert int(state.skipped) == 3 and int(state.step) == int(before.step)
    after = jax.device_get(state)
    for new, old in zip(jax.tree.leaves((after.params, after.opt_state)),
                        jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(new, old)
    state, metrics = step(state, batch)  # a clean batch trains again
    assert float(metrics["skipped_steps"]) == 0 and int(state.step) == int(before.step) + 3


def _micro_inputs(model, batch, num_micro):
    """One mini-batch of 16 rows split into num_micro micro-batches."""
    graphdef, params = model
    rows = slice(0, 16)
    logp = ts.make_logprob_fn(graphdef, CONFIG)(params, batch.tokens)[rows]
    rng = np.random.default_rng(1)
    full = {"tokens": batch.tokens[rows], "loss_mask": batch.loss_mask[rows].astype(bool),
            "advantages": jnp.asarray(rng.normal(size=(16, LENGTH)), jnp.float32),
            "old_logp": logp + jnp.asarray(rng.normal(scale=0.2, size=(16, LENGTH)), jnp.float32)}
    return jax.tree.map(lambda x: split_rows(x, 1, num_micro)[0], full)


@pytest.fixture(scope="module")
def accumulate(model):
    """Gradients of one mini-batch under both aggregations, in one compiled function."""
    graphdef, _ = model
    configs = {a: dataclasses.replace(CONFIG, aggregation=a)
               for a in ("token_mean", "seq_mean_batch_mean")}
    return jax.jit(lambda p, micro, old_is_current: {
        a: ts.accumulate_gradients(p, graphdef, micro, c, old_is_current)
        for a, c in configs.items()})


def test_gradient_accumulation_equals_full_batch(model, batch, accumulate):
    _, params = model
    whole = accumulate(params, _micro_inputs(model, batch, 1), False)
    split = accumulate(params, _micro_inputs(model, batch, 4), False)  # unequal token counts
    for aggregation in whole:
        (full_grads, full_metrics), (micro_grads, micro_metrics) = whole[aggregation], split[
            aggregation]
        full, micro = _flat(full_grads), _flat(micro_grads)
        assert np.linalg.norm(full) > 1e-3
        assert np.linalg.norm(micro - full) <= 1e-6 * np.linalg.norm(full), aggregation
        for name in ("loss", "clip_frac", "approx_kl", "entropy"):
            np.testing.assert_allclose(micro_metrics[name], full_metrics[name], rtol=1e-6)


def test_ratio_is_exactly_one_on_the_first_mini_batch(model, batch, accumulate):
    _, params = model
    micro = _micro_inputs(model, batch, 4)  # its old_logp is deliberately off
    _, first = accumulate(params, micro, True)["seq_mean_batch_mean"]
    assert float(first["clip_frac"]) == 0.0 and float(first["approx_kl"]) == 0.0
    mask, adv = np.asarray(micro["loss_mask"]), np.asarray(micro["advantages"])
    # seq_mean_batch_mean of -A * ratio with ratio 1.
    want = np.mean([-adv[j, r][mask[j, r]].mean() for j in range(4) for r in range(4)])
    np.testing.assert_allclose(float(first["pg_loss"]), want, rtol=1e-5)
    _, later = accumulate(params, micro, False)["seq_mean_batch_mean"]
    assert float(later["clip_frac"]) > 0 and float(later["approx_kl"]) > 0


def test_row_split_round_trips():
    x = jnp.arange(48 * 3).reshape(48, 3)
    split = split_rows(x, 3, 2)
    assert split.shape == (3, 2, 8, 3)
    np.testing.assert_array_equal(unsplit_rows(split), x)
    # Rows of each device's contiguous block (8 devices x 6 rows) reach every micro-batch.
    owners = np.asarray(split[..., 0]) // 3 // 6
    assert all(sorted(owners[i, j]) == list(range(8)) for i in range(3) for j in range(2))
