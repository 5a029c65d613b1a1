"""Advantage estimators and KL estimators against the numpy references of tests/rl/reference.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.rl import advantages, kl
from tests.rl import reference

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


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_baseline", "grpo", "rloo"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_estimator_matches_reference(estimator, kl_coef):
    rewards, mask, kl_tokens = _rollout(seed=len(estimator) + int(kl_coef * 100))
    got_adv, got_ret = advantages.compute_advantages(
        estimator, jnp.asarray(rewards), jnp.asarray(mask), N, kl=jnp.asarray(kl_tokens),
        kl_coef=kl_coef)
    want_adv, want_ret = reference.advantages(estimator, rewards, mask, N, kl_tokens, kl_coef)
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
    """grpo normalises within each prompt's contiguous n rows, not across prompts; a tied group
    (16 x float32 0.4, whose float32 mean is one rounding step off 0.4) shapes to exactly 0."""
    rewards = np.concatenate([np.tile([0.0, 1.0], 8), [10.0] * 15 + [11.0], [0.4] * 16])
    rewards = rewards.astype(np.float32)
    shaped = np.asarray(advantages.group_normalize(jnp.asarray(rewards), 16))
    for group in range(2):
        g = rewards[16 * group:16 * (group + 1)].astype(np.float64)
        np.testing.assert_allclose(shaped[16 * group:16 * (group + 1)],
                                   (g - g.mean()) / (g.std(ddof=1) + 1e-9), rtol=1e-5)
    np.testing.assert_array_equal(shaped[32:], 0.0)
    with pytest.raises(ValueError, match="whole groups"):
        advantages.group_normalize(jnp.asarray(rewards), 5)


GROUP_ESTIMATORS = ("reinforce_baseline", "grpo", "rloo")
F1 = np.asarray([float(v) for v in reference.f1_values()], np.float32)  # 65 values, 0 included


@functools.partial(jax.jit, static_argnames=("estimator", "n"))
def _shaped_and_advantages(rewards, mask, *, estimator, n):
    """Jitted, as the train step runs them (XLA fuses the reductions its own way)."""
    shaped = advantages.ESTIMATORS[estimator].shape_rewards(rewards, n)
    return shaped, advantages.compute_advantages(estimator, rewards, mask, n)[0]


def _mask(rows, length=6):
    """Responses at columns 2.. of unequal length, every row at least 2 tokens."""
    mask = np.zeros((rows, length), np.float32)
    for row in range(rows):
        mask[row, 2:4 + row % (length - 3)] = 1
    return mask


def test_sixteen_copies_of_one_reward_give_zero_advantage():
    total = np.float32(0.0)
    for _ in range(16):  # one summation order among those a platform may pick
        total = np.float32(total + np.float32(0.4))
    assert total / np.float32(16) != np.float32(0.4)  # 0.40000007: one float32 step off
    rewards = jnp.full((16,), 0.4, jnp.float32)
    mask = jnp.asarray(_mask(16))
    for estimator in advantages.ESTIMATORS:
        eager, _ = advantages.compute_advantages(estimator, rewards, mask, 16)
        np.testing.assert_array_equal(np.asarray(eager), 0.0, err_msg=estimator)
        shaped, jitted = _shaped_and_advantages(rewards, mask, estimator=estimator, n=16)
        np.testing.assert_array_equal(np.asarray(jitted), 0.0, err_msg=estimator)
        if estimator != "reinforce_pp":  # its shaped reward is the reward itself
            np.testing.assert_array_equal(np.asarray(shaped), 0.0, err_msg=estimator)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_every_tied_f1_group_shapes_to_exactly_zero(estimator):
    """All 65 F1 values reachable with up to 10 tokens a side, each as a tied group of n, n in
    2..16: shaped rewards are exactly 0, not rounding residue, and so are the (whitened)
    advantages (those for three sizes, as each size compiles the whole estimator)."""
    shape = jax.jit(advantages.ESTIMATORS[estimator].shape_rewards, static_argnums=1)
    for n in range(2, 17):
        shaped = np.asarray(shape(jnp.asarray(np.repeat(F1, n)), n)).reshape(-1, n)
        assert np.count_nonzero(shaped) == 0, (n, F1[np.any(shaped != 0, axis=1)])
    for n in (3, 7, 16):
        _, got = _shaped_and_advantages(jnp.asarray(np.repeat(F1, n)),
                                        jnp.asarray(_mask(len(F1) * n)), estimator=estimator, n=n)
        np.testing.assert_array_equal(np.asarray(got), 0.0, err_msg=f"n={n}")


def test_reinforce_pp_batch_of_one_reward_whitens_to_exactly_zero():
    """reinforce_pp has no groups: a batch whose rewards are all one F1 value has constant
    returns, and whitening them gives 0, for every value and batch size."""
    for n in range(2, 17):
        mask = jnp.asarray(_mask(n))
        rewards = jnp.asarray(np.repeat(F1[:, None], n, axis=1))  # [65, n]: one batch per value
        got = jax.vmap(lambda r, mask=mask, n=n: _shaped_and_advantages(
            r, mask, estimator="reinforce_pp", n=n)[1])(rewards)
        np.testing.assert_array_equal(np.asarray(got), 0.0, err_msg=f"n={n}")


def _mixed_rewards(rng, n, groups=12):
    """Groups of n F1 rewards: even groups tied (one value), odd groups holding two or more."""
    rows = []
    for g in range(groups):
        if g % 2 == 0:
            rows.append(np.full(n, rng.choice(F1)))
        else:
            group = rng.choice(F1, size=n)
            while np.all(group == group[0]):
                group = rng.choice(F1, size=n)
            rows.append(group)
    return np.concatenate(rows).astype(np.float32)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_tied_groups_leave_untied_groups_to_the_published_formula(estimator):
    """Tied groups beside untied ones: the tied are 0, the untied shape as they do alone, and
    the whole batch's advantages match the exact-arithmetic reference."""
    rng = np.random.default_rng(len(estimator))
    for n in (2, 3, 5, 7, 16):
        rewards = _mixed_rewards(rng, n)
        mask = _mask(len(rewards))
        shaped, got = _shaped_and_advantages(jnp.asarray(rewards), jnp.asarray(mask),
                                             estimator=estimator, n=n)
        shaped = np.asarray(shaped).reshape(-1, n)
        np.testing.assert_array_equal(shaped[0::2], 0.0)
        untied = rewards.reshape(-1, n)[1::2].ravel()
        alone, _ = _shaped_and_advantages(jnp.asarray(untied), jnp.asarray(_mask(len(untied))),
                                          estimator=estimator, n=n)
        np.testing.assert_array_equal(shaped[1::2].ravel(), np.asarray(alone))
        want = reference.shaped_rewards(estimator, rewards, n).reshape(-1, n)
        np.testing.assert_allclose(shaped[1::2], want[1::2], rtol=1e-5, atol=1e-6)
        want_adv, _ = reference.advantages(estimator, rewards, mask, n)
        on = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(got)[on], want_adv[on], rtol=1e-5, atol=1e-5)


def test_whitening_a_batch_equal_up_to_rounding_gives_zero():
    """Returns that are one value, or one value and its float32 neighbours, at any magnitude,
    whiten to 0 (not +-1, nor rounding residue times 1 / sqrt(floor)); a real spread does not."""
    rng = np.random.default_rng(0)
    mask = _mask(24, length=10)
    on = mask.astype(bool)
    whiten = jax.jit(advantages.whiten)
    for value in np.concatenate([F1[1:], [1e3, 3.3e4, -2.0, 1e-6]]).astype(np.float32):
        x = np.full(mask.shape, value, np.float32)
        np.testing.assert_array_equal(np.asarray(whiten(x, mask)), 0.0)
        neighbours = np.nextafter(value, np.float32([-np.inf, np.inf]))
        x[on] = rng.choice(np.concatenate([[value], neighbours]), size=on.sum())
        x[~on] = rng.normal(size=(~on).sum())  # off-mask values take no part
        np.testing.assert_array_equal(np.asarray(whiten(x, mask)), 0.0)
        x[on] += value * 1e-4 * rng.normal(size=on.sum()).astype(np.float32)
        got = np.asarray(whiten(x, mask))
        np.testing.assert_allclose(got[on], reference.whiten(x, mask)[on], rtol=1e-5, atol=1e-6)
        assert np.abs(got[on]).max() > 0


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


def test_an_infinite_value_is_not_a_tie():
    """inf - inf is NaN and inf <= inf holds: an infinite return must reach the loss (and the
    step be skipped as non-finite), not pass for a tie that whitens to 0."""
    mask = np.ones((2, 4), np.float32)
    x = np.array([[1, 2, 3, np.inf], [0, 1, 2, 3]], np.float32)
    assert not np.isfinite(np.asarray(advantages.whiten(x, mask))).all()
    shaped = advantages.group_normalize(jnp.array([np.inf, np.inf, 1.0, 2.0], jnp.float32), 2)
    assert not np.isfinite(np.asarray(shaped[:2])).all()
