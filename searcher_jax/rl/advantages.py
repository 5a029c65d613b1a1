"""Advantage estimators (SPEC section 4), registered by name; pure jnp over [B, T] arrays.

Every estimator follows the same three steps:
  1. shape the scalar rewards [B] within each prompt's group of n rows
     (rows of one prompt are contiguous, B = prompts * n);
  2. per-token rewards [B, T]: -kl_coef * KL on loss-mask tokens, plus the
     shaped scalar on the row's last policy-sampled token (a truncated row
     may end inside a document block: the reward goes on the last token the
     policy wrote, not the last token of the row);
  3. returns = reverse cumulative sum over the whole row (gamma 1), then,
     for all but grpo and dr_grpo, whitening over the loss-mask tokens of the batch.
The loss mask weights the KL and the whitening statistics only: it never
zeroes the running return, so a document block inside a response leaves
the returns before and after it as they would be without the block.

Rewards (per group) and returns (over the batch) that are equal up to rounding
shape to exactly 0: the group mean of 16 copies of 0.4 is not 0.4 in float32,
and dividing the residue by its own std would turn a tie into a +-1 signal.

Called inside jit on global arrays, the sums are over the whole rollout
batch on every host (XLA inserts the cross-device reductions).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

GRPO_STD_EPS = 1e-9  # (r - mean) / (std + eps), std with ddof 1.
WHITEN_VAR_FLOOR = 1e-8  # (x - mean) * rsqrt(max(var, floor)), var over mask tokens (ddof 0).
# Values whose spread (max - min) is at most TIE_RTOL * max|value| are equal up to rounding and
# carry no signal: their deviations are 0, never divided by a std that is itself rounding noise.
# Four float32 ulps of the magnitude: rewards equal in exact arithmetic reach float32 at most one
# ulp apart (a float64 reward cast once; each F1 value p/q with up to 10 tokens a side lands on
# one float32 whichever (precision, recall) pair reaches it), while distinct rewards differ by
# far more (those F1 values are >= 1/190 apart). A KL term below four ulps of a return is below
# the float32 resolution of the sum that holds it.
TIE_RTOL = 4 * float(jnp.finfo(jnp.float32).eps)


def _groups(rewards, n: int):
    """[B] -> [B / n, n]; raises when B is not whole groups."""
    if rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of {n} samples")
    return rewards.reshape(-1, n)


def _equal_up_to_rounding(high, low, magnitude):
    """Bool array: whether sets with these maxima, minima and max |value| (arrays of one shape)
    are equal up to rounding (TIE_RTOL). A NaN or an infinity makes a set unequal, so it still
    reaches the loss and the step is skipped as non-finite."""
    return (high - low <= TIE_RTOL * magnitude) & jnp.isfinite(magnitude)


def _shifted_groups(rewards, n: int):
    """[B] -> ([B / n, n] rewards minus their group's first reward, [B / n, 1] tied flags).

    The mean of n equal float32 rewards is in general not that reward (16 x 0.4 sums to a
    float32 one rounding step off), so r - mean(r) would leave the same rounding residue on every
    row. Shifting by a member of the group first makes a tied group all exact zeros (x - x == 0 in
    IEEE arithmetic) and keeps an untied group's deviations accurate relative to its spread, not
    its magnitude; `tied` (compared on the unshifted rewards, against their magnitude) then zeroes
    the groups that are equal up to rounding, whatever the platform's summation order.
    """
    groups = _groups(rewards, n)
    return groups - groups[:, :1], tied_groups(rewards, n)[:, None]


def tied_groups(rewards, n: int):
    """[B] -> [B / n] bool: whether each prompt's group of n rewards is equal up to rounding
    (TIE_RTOL), so that every group-relative estimator shapes its rewards to exactly 0: the
    group carries no signal of its own (dynamic_sampling.py drops such prompts). Its advantage
    is 0 only without batch whitening (grpo, dr_grpo); reinforce_baseline and rloo whiten the
    returns over the batch, which moves a tied group's zeros to -mean / std of the batch.
    Raises ValueError when B is not whole groups."""
    groups = _groups(rewards, n)
    return _equal_up_to_rounding(groups.max(axis=1), groups.min(axis=1),
                                 jnp.abs(groups).max(axis=1))


def no_baseline(rewards, n: int):
    """reinforce_pp: [B] rewards as they are (SPEC section 4)."""
    del n
    return rewards


def group_mean_baseline(rewards, n: int):
    """reinforce_baseline: [B] r - mean of its prompt's group of n (SPEC section 4); 0 for a tied
    group. Raises ValueError when B is not whole groups."""
    shifted, tied = _shifted_groups(rewards, n)
    deviation = shifted - shifted.mean(axis=1, keepdims=True)
    return jnp.where(tied, 0.0, deviation).reshape(-1)


def group_normalize(rewards, n: int):
    """grpo: [B] (r - mean) / (std + 1e-9) within each group of n, std with ddof 1 (SPEC section
    4; Shao et al. 2024, DeepSeekMath section 4.1.2); 0 for a tied group, where the std is 0 or
    rounding noise. Needs n >= 2; raises ValueError when B is not whole groups."""
    shifted, tied = _shifted_groups(rewards, n)
    deviation = shifted - shifted.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.square(deviation).sum(axis=1, keepdims=True) / (n - 1))
    return jnp.where(tied, 0.0, deviation / (std + GRPO_STD_EPS)).reshape(-1)


def group_mean_unscaled(rewards, n: int):
    """dr_grpo: [B] r - mean of its prompt's group of n, no division by the group's std and no
    whitening (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, section 3.1: the std division
    weights too easy and too hard questions up); 0 for a tied group. The same shaping as
    reinforce_baseline, without the batch whitening. Its loss drops the per-row length
    normalisation too: RLConfig's aggregation defaults to seq_sum_batch_mean for it. Needs
    n >= 2; raises ValueError when B is not whole groups."""
    return group_mean_baseline(rewards, n)


def leave_one_out_baseline(rewards, n: int):
    """rloo: [B] r - mean of the other n - 1 rewards of its group (Kool et al. 2019; Ahmadian
    et al. 2024); 0 for a tied group. Needs n >= 2; raises ValueError when B is not whole groups."""
    shifted, tied = _shifted_groups(rewards, n)
    others_mean = (shifted.sum(axis=1, keepdims=True) - shifted) / (n - 1)
    return jnp.where(tied, 0.0, shifted - others_mean).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Estimator:
    shape_rewards: Callable  # (rewards [B], n) -> shaped rewards [B]
    whiten: bool
    # Its shaped reward is relative to the prompt's group (a tied group shapes to 0), and a
    # group statistic needs n >= 2 samples (reinforce_baseline, the released recipe, allows 1).
    group_relative: bool = True
    min_samples: int = 2
    # The loss aggregation its paper pairs it with (RLConfig.aggregation=None takes it); None:
    # the policy loss's.
    aggregation: str | None = None


ESTIMATORS: dict[str, Estimator] = {
    "reinforce_pp": Estimator(no_baseline, whiten=True, group_relative=False, min_samples=1),
    "reinforce_baseline": Estimator(group_mean_baseline, whiten=True, min_samples=1),
    "grpo": Estimator(group_normalize, whiten=False),
    "rloo": Estimator(leave_one_out_baseline, whiten=True),
    "dr_grpo": Estimator(group_mean_unscaled, whiten=False, aggregation="seq_sum_batch_mean"),
}


def last_sampled_onehot(loss_mask):
    """[B, T] -> [B, T] float: 1 at each row's last loss-mask token (a row with none: all 0)."""
    mask = loss_mask.astype(bool)
    t = mask.shape[1]
    positions = jnp.arange(t)[None, :]
    last = jnp.max(jnp.where(mask, positions, -1), axis=1, keepdims=True)  # [B, 1]
    return (positions == last).astype(jnp.float32)


def token_rewards(scalar_rewards, loss_mask, kl=None, kl_coef: float = 0.0):
    """[B] scalars, [B, T] mask, [B, T] KL or None -> [B, T] per-token rewards."""
    rewards = last_sampled_onehot(loss_mask) * scalar_rewards[:, None].astype(jnp.float32)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * jnp.where(loss_mask.astype(bool), kl, 0.0)
    return rewards


def reverse_cumsum(token_rewards_):
    """Returns with gamma 1: G[t] = sum over s >= t of r[s], over the whole row."""
    return jnp.flip(jnp.cumsum(jnp.flip(token_rewards_, axis=1), axis=1), axis=1)


def masked_mean_var(x, mask):
    """Mean and (ddof 0) variance of x over the mask's tokens."""
    mask = mask.astype(bool)
    count = jnp.maximum(mask.sum(), 1)
    mean = jnp.where(mask, x, 0.0).sum() / count
    var = jnp.where(mask, jnp.square(x - mean), 0.0).sum() / count
    return mean, var


def whiten(x, mask):
    """[B, T] -> [B, T]: (x - mean) * rsqrt(max(var, WHITEN_VAR_FLOOR)), statistics over mask tokens
    only (ddof 0, SPEC section 4), applied to every token; 0 everywhere when the mask
    tokens' values are equal up to rounding (TIE_RTOL), where the deviations are rounding residue.

    x is shifted by its value at the first mask token before the mean, for the reason given in
    _shifted_groups: a batch of one repeated value whitens to exact zeros.
    """
    mask = mask.astype(bool)
    shifted = x - x.reshape(-1)[jnp.argmax(mask.reshape(-1))]
    mean, var = masked_mean_var(shifted, mask)
    whitened = (shifted - mean) * jnp.reciprocal(jnp.sqrt(jnp.maximum(var, WHITEN_VAR_FLOOR)))
    tied = _equal_up_to_rounding(jnp.max(jnp.where(mask, x, -jnp.inf)),
                                 jnp.min(jnp.where(mask, x, jnp.inf)),
                                 jnp.max(jnp.where(mask, jnp.abs(x), 0.0)))
    return jnp.where(tied, 0.0, whitened)


def compute_advantages(estimator: str, rewards, loss_mask, n: int, kl=None, kl_coef: float = 0.0):
    """Advantages and returns for a whole rollout batch.

    Args:
      estimator: a name in ESTIMATORS.
      rewards: [B] scalar rewards, rows of one prompt contiguous in groups of n.
      loss_mask: [B, T], 1 exactly on the tokens the policy sampled.
      n: samples per prompt.
      kl: [B, T] per-token KL(policy || reference) of the rollout policy, or
        None (kl_coef 0, or the KL goes into the loss instead).
      kl_coef: the KL reward coefficient.
    Returns:
      (advantages [B, T], returns [B, T]), float32; only loss-mask tokens are meaningful.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use one of "
                         f"{', '.join(ESTIMATORS)}")
    if rewards.ndim != 1 or loss_mask.ndim != 2 or rewards.shape[0] != loss_mask.shape[0]:
        raise ValueError(f"rewards must be [B] and loss_mask [B, T]; got {rewards.shape} and "
                         f"{loss_mask.shape}")
    spec = ESTIMATORS[estimator]
    shaped = spec.shape_rewards(rewards.astype(jnp.float32), n)
    returns = reverse_cumsum(token_rewards(shaped, loss_mask, kl, kl_coef))
    advantages = whiten(returns, loss_mask) if spec.whiten else returns
    return advantages, returns
