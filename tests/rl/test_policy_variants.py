"""The policy-optimisation variants (GSPO, DAPO, Dr. GRPO, CISPO, truncated importance sampling)
against plain-numpy references written here from the published formulas, values and gradients,
on masks with document holes, truncated rows and a row with no sampled token; and their
configuration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax import run_config
from searcher_jax.rl import advantages, losses
from searcher_jax.rl.config import RLConfig
from tests.configs.test_base_config import _parse
from tests.rl import reference

B, T = 8, 20


def _mask(seed):
    """[B, T] float32: unequal ends, document holes, two truncated rows (the sampled text stops
    at a block that runs to the end of the row) and row 7 with no sampled token (a prompt that
    dynamic sampling dropped)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for row in range(B - 1):
        start = int(rng.integers(1, 4))
        end = int(rng.integers(start + 8, T + 1))
        mask[row, start:end] = 1
        if row % 2:
            hole = int(rng.integers(start + 2, end - 3))
            mask[row, hole:hole + 2] = 0
    mask[2, 12:] = 0  # truncated inside a document block
    mask[5, 9:] = 0
    return mask


def _inputs(seed, log_ratio_scale, row_shift=None):
    """(logp, old_logp, advantages [B, T] with a per-token part, mask). old_logp = logp -
    log-ratio; with row_shift, each row's log-ratios are noise of zero mean over its mask tokens
    plus row_shift[row], so its sequence ratio is exp(row_shift[row]) exactly (up to rounding)."""
    rng = np.random.default_rng(seed)
    mask = _mask(seed)
    logp = -rng.uniform(0.05, 4.0, (B, T))
    log_ratio = rng.normal(scale=log_ratio_scale, size=(B, T))
    if row_shift is not None:
        on = mask.astype(bool)
        for row in range(B):
            if on[row].any():
                log_ratio[row] -= log_ratio[row][on[row]].mean()
            log_ratio[row] += row_shift[row]
    # Row advantages of alternating sign, so that both clip bounds take part; a per-token part.
    sign = np.where(np.arange(B) % 2, 1.0, -1.0)[:, None]
    adv = sign * (0.5 + np.abs(rng.normal(size=(B, 1)))) + 0.3 * rng.normal(size=(B, T))
    f32 = lambda x: np.asarray(x, np.float32)  # pylint: disable=unnecessary-lambda-assignment
    return f32(logp), f32(logp - log_ratio), f32(adv), mask


# --- References (numpy, float64) --------------------------------------------------------------

def _weights(mask, aggregation, norm_tokens=0):
    """w[i, t] with loss = sum over mask tokens of w * token loss, for each aggregation."""
    on = mask.astype(bool)
    rows = on.any(axis=1).sum()  # rows with at least one sampled token
    if aggregation == "token_mean":
        w = np.ones(mask.shape) / on.sum()
    elif aggregation == "seq_mean_batch_mean":
        w = np.ones(mask.shape) / np.maximum(on.sum(axis=1, keepdims=True), 1) / rows
    elif aggregation == "seq_sum_batch_mean":  # Dr. GRPO: a constant length per row
        w = np.ones(mask.shape) / ((norm_tokens or mask.shape[1]) * rows)
    else:
        raise ValueError(aggregation)
    return np.where(on, w, 0.0)


def _surrogate(ratio, adv, low, high, dual=None):
    """PPO's -min(r A, clip(r) A) with dual clip, per token, and d(loss)/d(ratio) (0 where a
    clip bound decides the loss)."""
    unclipped, clipped = ratio * adv, np.clip(ratio, 1 - low, 1 + high) * adv
    loss = -np.minimum(unclipped, clipped)
    d_ratio = np.where(unclipped <= clipped, -adv, 0.0)
    if dual is not None:
        bounded = (adv < 0) & (loss > -dual * adv)
        loss = np.where(bounded, -dual * adv, loss)
        d_ratio = np.where(bounded, 0.0, d_ratio)
    return loss, d_ratio


def reference_loss(name, logp, old, adv, mask, low, high, aggregation, dual=None, tis=None,
                   norm_tokens=0):
    """(loss, d loss / d logp [B, T]) of the published objectives, to be minimised.

    ppo / dapo (arXiv 1707.06347, 2503.14476 eq. 8): r = exp(logp - old) per token.
    gspo (arXiv 2507.18071 eq. 5-7): s_i = exp(mean over the row's tokens of logp - old),
      every token of row i takes -min(s_i A, clip(s_i) A); d s_i / d logp[i, u] = s_i / |y_i|.
    gspo_token (eq. 13): the same value; d s_i,t / d logp[i, u] = s_i if u == t else 0.
    cispo (arXiv 2506.13585 eq. 4): J = sum sg(clip(r)) A logp, whose gradient is
      -clip(r) A per token (its value is reported as -clip(r) A, see losses.cispo).
    tis: each token's loss times sg(min(exp(old - sampler), cap)), given as that weight.
    """
    logp, old, adv = (np.asarray(x, np.float64) for x in (logp, old, adv))
    on = mask.astype(bool)
    w = _weights(mask, aggregation, norm_tokens)
    tis = np.ones(mask.shape) if tis is None else tis
    if name in ("ppo", "dapo"):
        ratio = np.exp(logp - old)
        token_loss, d_ratio = _surrogate(ratio, adv, low, high, dual)
        grad = w * tis * d_ratio * ratio
    elif name in ("gspo", "gspo_token"):
        lengths = np.maximum(on.sum(axis=1, keepdims=True), 1)
        seq = np.exp(np.where(on, logp - old, 0.0).sum(axis=1, keepdims=True) / lengths)
        token_loss, d_ratio = _surrogate(np.broadcast_to(seq, mask.shape), adv, low, high, dual)
        if name == "gspo":  # every token's loss reaches every token of its row through s_i
            grad = np.where(on, (w * tis * d_ratio * seq).sum(axis=1, keepdims=True) / lengths,
                            0.0)
        else:
            grad = w * tis * d_ratio * seq
    elif name == "cispo":
        weight = np.clip(np.exp(logp - old), 1 - low, 1 + high)
        token_loss = -weight * adv
        grad = w * tis * -weight * adv
    else:
        raise ValueError(name)
    return float((w * tis * token_loss).sum()), grad


# --- The product against the references --------------------------------------------------------

def _product(config: RLConfig, logp, old, adv, mask, sampler_logp=None):
    """(loss, d loss / d logp, metrics) of losses.policy_objective under config."""
    normalizer = losses.Normalizer.of(jnp.asarray(mask))

    def loss(lp):
        return losses.policy_objective(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                       config.loss, normalizer, sampler_logp=sampler_logp)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
    return float(value), np.asarray(grad), jax.device_get(metrics)


# Sequence log-ratios around GSPO's clip range (-3e-4, 4e-4), on rows of alternating advantage
# sign: rows 0, 1 and 3 are clipped, the others not.
GSPO_SHIFTS = [-1e-3, 1e-3, -1e-4, 5e-4, 0.0, -1e-3, 1e-3, 0.0]
CASES = [  # (config, log-ratio noise scale, per-row sequence log-ratio or None)
    (RLConfig(policy_loss="ppo"), 0.3, None),
    (RLConfig(policy_loss="ppo", dual_clip=2.0, aggregation="token_mean"), 0.5, None),
    (RLConfig(policy_loss="dapo"), 0.3, None),
    (RLConfig(policy_loss="gspo"), 0.3, GSPO_SHIFTS),
    (RLConfig(policy_loss="gspo_token"), 0.3, GSPO_SHIFTS),
    (RLConfig(policy_loss="gspo", dual_clip=3.0, clip_eps_low=0.1, clip_eps_high=0.1), 0.3,
     [-0.5, -0.15, -0.05, 0.0, 0.05, 0.15, 0.5, 0.0]),
    (RLConfig(policy_loss="cispo"), 1.5, None),
    (RLConfig(policy_loss="cispo", clip_eps_low=0.2, clip_eps_high=0.28), 0.5, None),
    (RLConfig(policy_loss="ppo", estimator="dr_grpo", samples_per_prompt=4, loss_norm_tokens=32),
     0.3, None),
    (RLConfig(policy_loss="ppo", aggregation="seq_sum_batch_mean"), 0.3, None),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_gradient_match_the_published_formula(case):
    config, scale, shift = CASES[case]
    logp, old, adv, mask = _inputs(seed=case, log_ratio_scale=scale, row_shift=shift)
    resolved = config.loss
    want, want_grad = reference_loss(
        config.policy_loss, logp, old, adv, mask, resolved.clip_eps_low, resolved.clip_eps_high,
        resolved.aggregation, config.dual_clip, norm_tokens=config.loss_norm_tokens)
    got, got_grad, metrics = _product(config, logp, old, adv, mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-4, atol=1e-7)
    assert np.all(got_grad[mask == 0] == 0)  # holes, truncated tails and the empty row
    assert np.abs(want_grad).max() > 1e-3  # a real signal
    assert 0 < metrics["clip_frac"] < 1  # the inputs reach both sides of the clip


@pytest.mark.parametrize("policy_loss", ["ppo", "gspo", "cispo"])
def test_truncated_importance_sampling_matches_the_reference(policy_loss):
    """Each token's loss times min(exp(old - sampler), cap), without gradient through it."""
    config = RLConfig(policy_loss=policy_loss, tis_cap=2.0)
    shift = [-1e-3, 0.0, 1e-4, 0.0, 2e-4, 5e-4, 1e-3, 0.0] if policy_loss == "gspo" else None
    logp, old, adv, mask = _inputs(seed=11, log_ratio_scale=0.3, row_shift=shift)
    rng = np.random.default_rng(12)
    sampler = (old - rng.normal(scale=0.6, size=(B, T))).astype(np.float32)
    weight = np.minimum(np.exp(old.astype(np.float64) - sampler), 2.0)
    resolved = config.loss
    want, want_grad = reference_loss(policy_loss, logp, old, adv, mask, resolved.clip_eps_low,
                                     resolved.clip_eps_high, resolved.aggregation, tis=weight)
    got, got_grad, metrics = _product(config, logp, old, adv, mask, jnp.asarray(sampler))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-4, atol=1e-7)
    on = mask.astype(bool)
    np.testing.assert_allclose(metrics["tis_weight_mean"], weight[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["tis_capped_frac"], (weight[on] >= 2.0).mean(), rtol=1e-5)
    assert 0 < metrics["tis_capped_frac"] < 1
    # A sampler that agrees with the trainer weighs every token 1: the loss without the weight.
    same, same_grad, _ = _product(config, logp, old, adv, mask, jnp.asarray(old))
    plain, plain_grad, _ = _product(RLConfig(policy_loss=policy_loss), logp, old, adv, mask)
    assert same == plain and np.array_equal(same_grad, plain_grad)


@pytest.mark.parametrize("policy_loss", ["gspo", "gspo_token", "cispo", "dapo"])
def test_ratio_is_exactly_one_when_old_is_the_same_forward(policy_loss):
    """The first mini-batch scores old log-probs as stop_gradient(logp) of the same forward
    (train_step.py): every ratio is exactly 1, nothing is clipped, and the loss is -A exactly."""
    logp, _, adv, mask = _inputs(seed=3, log_ratio_scale=0.0)
    config = RLConfig(policy_loss=policy_loss).loss
    lp = jnp.asarray(logp)
    out = losses.POLICY_LOSSES[policy_loss].fn(lp, jax.lax.stop_gradient(lp), jnp.asarray(adv),
                                               jnp.asarray(mask), config)
    on = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(out.loss)[on], -adv[on])
    assert float(np.asarray(out.clipped).sum()) == 0


def test_gspo_clips_per_sequence_not_per_token():
    """Row 0: token ratios far outside any clip range whose geometric mean is 1: GSPO clips
    nothing and every token keeps its gradient, where PPO would clip most tokens. Row 1: a
    sequence ratio above 1 + 4e-4 with A > 0: the whole row is clipped (no gradient on any
    token), though some of its token ratios are below 1."""
    logp = np.full((2, 6), -1.0, np.float32)
    log_ratio = np.asarray([[0.0, 0.5, -0.5, 0.8, -0.8, 0.0],
                            [0.0, 0.3, -0.2, 0.1, -0.1, 0.2]], np.float32)
    mask = np.asarray([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)
    adv = np.ones((2, 6), np.float32)
    old = logp - log_ratio
    _, grad, metrics = _product(RLConfig(policy_loss="gspo"), logp, old, adv, mask)
    assert np.all(grad[0, 1:5] != 0) and np.all(grad[1] == 0)
    # Row 0's tokens are unclipped, row 1's five are: the clip fraction over the 9 tokens.
    np.testing.assert_allclose(metrics["clip_frac"], 5 / 9, rtol=1e-6)
    _, ppo_grad, ppo_metrics = _product(RLConfig(policy_loss="ppo"), logp, old, adv, mask)
    assert np.sum(ppo_grad[0] == 0) > 2 and ppo_metrics["clip_frac"] < 5 / 9
    assert np.all(ppo_grad[1, [2, 4]] != 0)  # PPO keeps the tokens of row 1 with ratio < 1


# --- Estimators ----------------------------------------------------------------------------------

def _estimator_rollout(seed, n, prompts):
    rng = np.random.default_rng(seed)
    b, t = n * prompts, 24
    mask = np.zeros((b, t), np.float32)
    for row in range(b):
        start, end = int(rng.integers(2, 6)), int(rng.integers(12, t + 1))
        mask[row, start:end] = 1
        if row % 3 == 0:  # a document block inside the response
            mask[row, start + 3:start + 6] = 0
    mask[1, 9:] = 0  # truncated: the reward sits on token 8, inside a block at 9
    rewards = rng.normal(size=b).astype(np.float32)
    rewards[:n] = 0.4  # a tied group: 0.4 is not a float32 mean of its copies
    return rewards, mask, rng.normal(scale=0.3, size=(b, t)).astype(np.float32)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_dr_grpo_matches_the_published_formula(kl_coef):
    """A_i = r_i - mean of its group (Dr. GRPO, arXiv 2503.20783): no std, no whitening; the
    same per-token KL reward and returns as every estimator (tests/rl/reference.py)."""
    n = 4
    rewards, mask, kl_tokens = _estimator_rollout(seed=5, n=n, prompts=3)
    got_adv, got_ret = advantages.compute_advantages(
        "dr_grpo", jnp.asarray(rewards), jnp.asarray(mask), n, kl=jnp.asarray(kl_tokens),
        kl_coef=kl_coef)
    want_adv, want_ret = reference.advantages("dr_grpo", rewards, mask, n, kl_tokens, kl_coef)
    on = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got_ret)[on], want_ret[on], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_adv)[on], want_adv[on], rtol=1e-5, atol=1e-6)
    # Unlike grpo, the deviation is not divided by the group's std.
    grpo, _ = advantages.compute_advantages("grpo", jnp.asarray(rewards), jnp.asarray(mask), n)
    assert not np.allclose(np.asarray(grpo)[on], np.asarray(got_adv)[on])


@pytest.mark.parametrize("estimator", ["dr_grpo", "grpo"])
def test_zero_reward_variance_gives_zero_advantage_and_a_finite_gradient(estimator):
    """Every group tied (std 0, or 16 float32 copies of 0.4 whose mean is a rounding step off):
    advantages exactly 0, and the loss and its gradient finite (0)."""
    n = 16
    rewards = np.asarray([0.4] * n + [0.0] * n + [-2.0] * n, np.float32)
    mask = np.zeros((3 * n, 10), np.float32)
    mask[:, 2:9] = 1
    adv, returns = advantages.compute_advantages(estimator, jnp.asarray(rewards),
                                                 jnp.asarray(mask), n)
    assert np.all(np.asarray(adv) == 0) and np.all(np.isfinite(np.asarray(returns)))
    config = RLConfig(estimator=estimator, samples_per_prompt=n)
    logp = jnp.full(mask.shape, -1.0)
    value, grad, _ = _product(config, logp, logp, np.asarray(adv), mask)
    assert value == 0 and np.all(grad == 0)


# --- Configuration -------------------------------------------------------------------------------

def test_each_choice_takes_its_papers_defaults():
    loss = lambda **kw: RLConfig(**kw).loss  # pylint: disable=unnecessary-lambda-assignment
    assert (loss().clip_eps_low, loss().clip_eps_high, loss().aggregation) == (
        0.2, 0.2, "seq_mean_batch_mean")  # the released R1-Searcher recipe
    assert (loss(policy_loss="dapo").clip_eps_high, loss(policy_loss="dapo").aggregation) == (
        0.28, "token_mean")
    for name in ("gspo", "gspo_token"):
        assert (loss(policy_loss=name).clip_eps_low, loss(policy_loss=name).clip_eps_high) == (
            3e-4, 4e-4)
    cispo = loss(policy_loss="cispo")
    assert (cispo.clip_eps_low, cispo.clip_eps_high, cispo.aggregation) == (1.0, 4.0, "token_mean")
    assert loss(estimator="dr_grpo").aggregation == "seq_sum_batch_mean"
    assert loss(clip_eps_low=0.3).clip_eps_high == 0.3  # ppo's range is symmetric unless set
    # An explicit value wins over the choice's default.
    assert loss(policy_loss="gspo", clip_eps_high=1e-3).clip_eps_high == 1e-3
    assert loss(estimator="dr_grpo", aggregation="token_mean").aggregation == "token_mean"
    assert loss(kl_coef=0.1, kl_in="reward").kl_coef == 0.0  # the KL is in the reward
    assert loss(kl_coef=0.1, kl_in="loss").kl_coef == 0.1


@pytest.mark.parametrize("fields, field", [
    (dict(policy_loss="gspoo"), "policy_loss"),
    (dict(estimator="drgrpo"), "estimator"),
    (dict(aggregation="seq_sum"), "aggregation"),
    (dict(dynamic_sampling="on"), "dynamic_sampling"),
    (dict(dynamic_sampling="refill", estimator="reinforce_pp"), "dynamic_sampling"),
    (dict(dynamic_sampling="drop", samples_per_prompt=1), "dynamic_sampling"),
    (dict(dynamic_sampling_draws=0), "dynamic_sampling_draws"),
    (dict(estimator="dr_grpo", samples_per_prompt=1), "estimator"),
    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip"),
    (dict(clip_eps_high=0.0), "clip_eps_high"),
    (dict(clip_eps_low=-0.1), "clip_eps_low"),
    (dict(tis_cap=0.0), "tis_cap"),
    (dict(tis_cap=float("nan")), "tis_cap"),
    (dict(loss_norm_tokens=-1), "loss_norm_tokens"),
    (dict(overlong_buffer=-4), "overlong_buffer"),
    (dict(overlong_penalty=-1.0), "overlong_penalty"),
])
def test_a_bad_value_names_its_field(fields, field):
    with pytest.raises(ValueError, match=rf"RLConfig\.{field}"):
        RLConfig(**fields)


def test_every_choice_is_set_from_the_command_line():
    """Unset (None) fields are typed placeholders in the run config, so the sweep's
    `--config.rl.x=value` reaches them; loss_norm_tokens 0 becomes the sampler's buffer."""
    config = _parse("--config.rl.policy_loss=gspo", "--config.rl.clip_eps_high=1e-3",
                    "--config.rl.dual_clip=3", "--config.rl.tis_cap=2",
                    "--config.rl.aggregation=token_mean", "--config.rl.estimator=dr_grpo",
                    "--config.rl.dynamic_sampling=refill", "--config.rl.overlong_buffer=512")
    rl = run_config.rl_config(config, rollout_steps=1)
    assert (rl.policy_loss, rl.clip_eps_high, rl.dual_clip, rl.tis_cap, rl.aggregation) == (
        "gspo", 1e-3, 3.0, 2.0, "token_mean")
    assert (rl.estimator, rl.dynamic_sampling, rl.overlong_buffer) == ("dr_grpo", "refill", 512)
    assert rl.loss.clip_eps_low == 3e-4 and rl.loss_norm_tokens == config.sampler.max_len
    unset = run_config.rl_config(_parse(), rollout_steps=1)
    assert unset.clip_eps_low is None and unset.tis_cap is None and unset.aggregation is None
