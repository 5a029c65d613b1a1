"""The policy-optimisation variants inside the real train step on a tiny model: the first
mini-batch's ratio, the sampler/trainer mismatch metric (fp32 and bf16 samplers) with truncated
importance sampling, and two rollout batches of each new choice."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.rl import train_step as ts
from searcher_jax.rl.batch import RolloutBatch, split_rows
from searcher_jax.rl.config import RLConfig
from tests.rl.test_train_step import ROWS, _rollout

BASE = RLConfig(estimator="grpo", samples_per_prompt=4, mini_batch_size=16, micro_batch_size=8,
                learning_rate=1e-2, total_steps=20, logprob_chunk=8)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(num_layers=1)


@pytest.fixture(scope="module")
def rollouts(model, tiny_model):
    """The same prompts sampled by an fp32 and by a bf16 copy of the policy (the sampler's
    accelerator setting; the trainer recomputes in fp32): (tokens, mask, sampler log-probs)."""
    graphdef, params = model
    bf16_graphdef, _ = tiny_model(num_layers=1, dtype="bfloat16")
    return {"float32": _rollout(model, np.random.default_rng(0)),
            "bfloat16": _rollout((bf16_graphdef, params), np.random.default_rng(0))}


def _batch(rollout, rewards_seed=0):
    tokens, mask, sampler_logprobs = rollout
    rewards = np.random.default_rng(rewards_seed).normal(size=ROWS).astype(np.float32)
    rewards[:4] = 0.5  # one tied prompt
    return RolloutBatch(tokens=tokens, loss_mask=mask, rewards=jnp.asarray(rewards),
                        sampler_logprobs=sampler_logprobs)


def _runner(model, config):
    """batch, steps -> (state, metrics of each step) from the initial params; one compile."""
    graphdef, params = model
    def fresh():
        return ts.init_train_state(jax.tree.map(jnp.array, params), config)

    step = ts.make_train_step(graphdef, fresh(), config)

    def run(batch, steps=1):
        state, metrics = fresh(), []
        for _ in range(steps):
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
        return state, metrics

    return run


def test_mismatch_is_zero_when_sampler_and_trainer_agree_and_positive_with_a_bf16_sampler(
        model, rollouts):
    """The mean and max |sampler - trainer log-prob| over sampled tokens, every step: exactly 0
    for the trainer's own log-probs, at rounding level for the fp32 sampler (a KV-cached decode
    against one forward), and far above that for a bf16 sampler. Truncated importance sampling
    weighs the bf16 sampler's tokens away from 1, and leaves an agreeing sampler's loss as it is."""
    graphdef, params = model
    config = dataclasses.replace(BASE, mini_batch_size=ROWS, micro_batch_size=16)
    tokens, mask, _ = rollouts["float32"]
    own = ts.make_logprob_fn(graphdef, config)(params, tokens) * mask
    agree = dataclasses.replace(_batch(rollouts["float32"]), sampler_logprobs=own)
    run = _runner(model, config)
    _, (same,) = run(agree)
    assert same["sampler_logp_abs_diff_mean"] == 0 and same["sampler_logp_abs_diff_max"] == 0
    _, (fp32,) = run(_batch(rollouts["float32"]))
    _, (bf16,) = run(_batch(rollouts["bfloat16"]))
    # Measured: fp32 sampler 6.8e-8 mean, 7.2e-7 max; bf16 sampler 3.1e-4 mean, 1.5e-3 max.
    assert fp32["sampler_logp_abs_diff_max"] < 1e-5 and fp32["sampler_logp_abs_diff_mean"] < 1e-6
    assert bf16["sampler_logp_abs_diff_mean"] > 1e-4
    assert bf16["sampler_logp_abs_diff_mean"] > 1000 * fp32["sampler_logp_abs_diff_mean"]
    assert bf16["sampler_logp_abs_diff_max"] > 100 * fp32["sampler_logp_abs_diff_max"]

    run_tis = _runner(model, dataclasses.replace(config, tis_cap=2.0))
    _, (agree_tis,) = run_tis(agree)
    assert agree_tis["tis_weight_mean"] == 1 and agree_tis["tis_capped_frac"] == 0
    # Weights of exactly 1: the same loss and gradient up to the two programs' rounding (the
    # loss is a sum of group-centred advantages, about 1e-8).
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(agree_tis[name], same[name], rtol=1e-5, atol=1e-7)
    _, (bf16_tis,) = run_tis(_batch(rollouts["bfloat16"]))
    # The weights straddle 1 (measured mean 1 - 5e-7, all within 1.5e-3 of it): the gradient
    # moves, by little.
    assert bf16_tis["tis_weight_mean"] != 1 and bf16_tis["grad_norm"] != bf16["grad_norm"]
    np.testing.assert_allclose(bf16_tis["grad_norm"], bf16["grad_norm"], rtol=1e-2)


RATIO_LOSSES = ("gspo", "gspo_token", "cispo", "dapo")


@pytest.fixture(scope="module")
def first_and_later(model, rollouts):
    """policy loss -> (advantages, mask, first mini-batch's metrics, a later one's) on 16 rows
    whose given old log-probs are far off; every loss in one compiled function."""
    graphdef, params = model
    tokens, mask, _ = rollouts["float32"]
    rng = np.random.default_rng(1)
    rows = slice(0, 16)
    adv = rng.normal(size=(16, 1)).astype(np.float32) * np.ones((1, tokens.shape[1]), np.float32)
    logp = ts.make_logprob_fn(graphdef, BASE)(params, tokens)[rows]
    full = {"tokens": tokens[rows], "loss_mask": mask[rows].astype(bool),
            "advantages": jnp.asarray(adv),
            "old_logp": logp + jnp.asarray(rng.normal(size=logp.shape), jnp.float32)}
    micro = jax.tree.map(lambda x: split_rows(x, 1, 2)[0], full)
    configs = {name: dataclasses.replace(BASE, policy_loss=name) for name in RATIO_LOSSES}
    accumulate = jax.jit(lambda p, m: {
        name: [ts.accumulate_gradients(p, graphdef, m, c, first)[1] for first in (True, False)]
        for name, c in configs.items()})
    metrics = jax.device_get(accumulate(params, micro))
    return {name: (adv, np.asarray(mask[rows]).astype(bool), *metrics[name])
            for name in RATIO_LOSSES}


@pytest.mark.parametrize("policy_loss", RATIO_LOSSES)
def test_ratio_is_exactly_one_on_the_first_mini_batch(first_and_later, policy_loss):
    """With the rollout params, old log-probs are stop_gradient(logp) of the same forward, so the
    (sequence) ratio is exactly 1 however far off the given old log-probs are: nothing clipped,
    approx KL 0, and the loss is -A under the choice's aggregation."""
    adv, on, first, later = first_and_later[policy_loss]
    assert float(first["clip_frac"]) == 0.0 and float(first["approx_kl"]) == 0.0
    if RLConfig(policy_loss=policy_loss).loss.aggregation == "token_mean":
        want = -adv[on].mean()
    else:
        want = np.mean([-adv[r][on[r]].mean() for r in range(16)])
    np.testing.assert_allclose(float(first["pg_loss"]), want, rtol=1e-5)
    # The given old log-probs: ratios away from 1.
    assert float(later["clip_frac"]) > 0 and float(later["approx_kl"]) > 0


# Every new choice once (a compile each costs seconds): gspo, dr_grpo and tis together, on the
# bf16 sampler's rollout.
CHOICES = {
    "gspo_token": dict(policy_loss="gspo_token"),
    "cispo": dict(policy_loss="cispo"),
    "dapo": dict(policy_loss="dapo"),
    "dr_grpo_gspo_tis_bf16_sampler": dict(estimator="dr_grpo", policy_loss="gspo", tis_cap=2.0),
}


@pytest.mark.parametrize("name", CHOICES)
def test_two_rollout_batches_of_each_choice_train_with_finite_metrics(model, rollouts, name):
    """Two rollout batches of 3 optimizer steps each (the sampler's real log-probs, one tied
    prompt): every metric finite, no step skipped, the params moved."""
    config = dataclasses.replace(BASE, **CHOICES[name])
    sampler = "bfloat16" if name.endswith("bf16_sampler") else "float32"
    state, metrics = _runner(model, config)(_batch(rollouts[sampler]), steps=2)
    assert int(state.step) == 6 and int(state.skipped) == 0
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["grad_norm"] > 0
    start = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(model[1])])
    moved = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]) - start
    assert np.linalg.norm(moved) > 1e-3 * np.linalg.norm(start)
