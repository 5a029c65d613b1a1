"""Advantage estimators and KL estimators against numpy references written from SPEC section 4."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.rl import advantages, kl

N = 4  # samples per prompt
PROMPTS = 3
T = 24


def _rollout(seed):
    """Rows of unequal lengths, document holes in the mask, and truncated rows ending in a block."""
    rng = np.random.default_rng(seed)
    b = PROMPTS * N
    mask = np.zeros((b, T), np.float32)
    for row in range(b):
        prompt_len = int(rng.integers(2, 6))
        end = int(rng.integers(prompt_len + 4, T + 1))
        mask[row, prompt_len:end] = 1
        if rng.random() < 0.7:  # a document block inside the response
            start = int(rng.integers(prompt_len + 1, end - 2))
            mask[row, start:start + int(rng.integers(1, 5))] = 0
    # Truncated rows: the sampled text stops at a block that runs to the end of the row.
    mask[1, 15:] = 0
    mask[5, 10:] = 0
    mask[5, 7:10] = 1
    rewards = rng.normal(size=b).astype(np.float32)
    kl_tokens = rng.normal(scale=0.3, size=(b, T)).astype(np.float32)
    return rewards, mask, kl_tokens


def _reference(estimator, rewards, mask, kl_tokens, kl_coef):
    """SPEC section 4, row by row, in float64."""
    rewards = rewards.astype(np.float64)
    b = rewards.shape[0]
    shaped = np.empty(b)
    for g in range(b // N):
        group = rewards[g * N:(g + 1) * N]
        for i in range(N):
            r = group[i]
            if estimator == "reinforce_pp":
                shaped[g * N + i] = r
            elif estimator == "reinforce_baseline":
                shaped[g * N + i] = r - group.mean()
            elif estimator == "grpo":
                std = math.sqrt(sum((x - group.mean()) ** 2 for x in group) / (N - 1))
                shaped[g * N + i] = (r - group.mean()) / (std + 1e-9)
            elif estimator == "rloo":
                shaped[g * N + i] = r - (group.sum() - r) / (N - 1)
    returns = np.zeros((b, T))
    for row in range(b):
        sampled = np.nonzero(mask[row])[0]
        per_token = np.zeros(T)
        for t in range(T):
            if mask[row, t]:
                per_token[t] -= kl_coef * kl_tokens[row, t]
        per_token[sampled[-1]] += shaped[row]  # the last token the policy sampled
        running = 0.0
        for t in reversed(range(T)):  # gamma 1; the mask never resets the running return
            running += per_token[t]
            returns[row, t] = running
    if estimator == "grpo":
        return returns, returns
    values = returns[mask.astype(bool)]
    mean, var = values.mean(), values.var()
    return (returns - mean) / math.sqrt(max(var, 1e-8)), returns


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_baseline", "grpo", "rloo"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_estimator_matches_reference(estimator, kl_coef):
    rewards, mask, kl_tokens = _rollout(seed=len(estimator) + int(kl_coef * 100))
    got_adv, got_ret = advantages.compute_advantages(
        estimator, jnp.asarray(rewards), jnp.asarray(mask), N, kl=jnp.asarray(kl_tokens),
        kl_coef=kl_coef)
    want_adv, want_ret = _reference(estimator, rewards, mask, kl_tokens, kl_coef)
    on = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got_ret)[on], want_ret[on], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_adv)[on], want_adv[on], rtol=1e-4, atol=1e-5)
    if estimator != "grpo":  # whitened over mask tokens: zero mean, unit variance there
        assert abs(np.asarray(got_adv)[on].mean()) < 1e-5
        assert abs(np.asarray(got_adv)[on].std() - 1) < 1e-4


def test_reward_sits_on_last_sampled_token_of_truncated_row():
    _, mask, _ = _rollout(seed=0)
    onehot = np.asarray(advantages.last_sampled_onehot(jnp.asarray(mask)))
    assert onehot[5].argmax() == 9 and onehot[5].sum() == 1  # row 5 ends inside a block at 10
    assert onehot[1].argmax() == np.nonzero(mask[1])[0][-1]
    assert np.all(onehot.sum(axis=1) == 1)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "grpo"])
def test_document_block_does_not_cut_returns(estimator):
    """Returns before and after a mid-response block equal those of the same response without it."""
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=N).astype(np.float32)
    prompt, before, block, after = 3, 5, 4, 6
    full_len = prompt + before + block + after
    with_block = np.zeros((N, full_len), np.float32)
    with_block[:, prompt:prompt + before] = 1
    with_block[:, prompt + before + block:] = 1
    without = np.zeros((N, prompt + before + after), np.float32)
    without[:, prompt:] = 1
    kl_full = rng.normal(size=(N, full_len)).astype(np.float32)
    kl_without = np.concatenate([kl_full[:, :prompt + before], kl_full[:, prompt + before + block:]],
                                axis=1)
    _, ret_block = advantages.compute_advantages(estimator, jnp.asarray(rewards),
                                                 jnp.asarray(with_block), N,
                                                 kl=jnp.asarray(kl_full), kl_coef=0.1)
    _, ret_plain = advantages.compute_advantages(estimator, jnp.asarray(rewards),
                                                 jnp.asarray(without), N,
                                                 kl=jnp.asarray(kl_without), kl_coef=0.1)
    ret_block, ret_plain = np.asarray(ret_block), np.asarray(ret_plain)
    kept = np.concatenate([np.arange(prompt, prompt + before),
                           np.arange(prompt + before + block, full_len)])
    np.testing.assert_allclose(ret_block[:, kept], ret_plain[:, prompt:], rtol=1e-6, atol=1e-6)
    # The tokens before the block carry the reward that comes after it.
    assert np.all(np.abs(ret_block[:, prompt]) > 0)


def test_groups_are_real_groups():
    """grpo normalises within each prompt's contiguous n rows, not across prompts."""
    rewards = jnp.asarray([0.0, 1.0, 0.0, 1.0, 10.0, 10.0, 10.0, 11.0])
    shaped = np.asarray(advantages.group_normalize(rewards, 4))
    std = np.std([0, 1, 0, 1], ddof=1)
    np.testing.assert_allclose(shaped[:4], (np.array([0, 1, 0, 1]) - 0.5) / (std + 1e-9), rtol=1e-6)
    np.testing.assert_allclose(shaped[4:], (np.array([10, 10, 10, 11]) - 10.25)
                               / (np.std([10, 10, 10, 11], ddof=1) + 1e-9), rtol=1e-5)
    with pytest.raises(ValueError, match="whole groups"):
        advantages.group_normalize(rewards, 3)


def test_kl_estimators():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=100).astype(np.float32) - 2
    ref = rng.normal(size=100).astype(np.float32) - 2
    log_ratio = logp.astype(np.float64) - ref
    np.testing.assert_allclose(kl.token_kl(logp, ref, "k1"), log_ratio, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl.token_kl(logp, ref, "k2"), log_ratio ** 2 / 2, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(kl.token_kl(logp, ref, "k3"), np.exp(-log_ratio) - 1 + log_ratio,
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(kl.token_kl(logp, ref, "k3")) >= 0)
    far = kl.token_kl(jnp.asarray([-200.0]), jnp.asarray([0.0]), "k3")
    assert np.isfinite(np.asarray(far)).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl.token_kl(logp, ref, "k4")
