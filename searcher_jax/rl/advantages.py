"""Advantage estimators (SPEC section 4), registered by name; pure jnp over [B, T] arrays.

Every estimator follows the same three steps:
  1. shape the scalar rewards [B] within each prompt's group of n rows
     (rows of one prompt are contiguous, B = prompts * n);
  2. per-token rewards [B, T]: -kl_coef * KL on loss-mask tokens, plus the
     shaped scalar on the row's last policy-sampled token (a truncated row
     may end inside a document block: the reward goes on the last token the
     policy wrote, not the last token of the row);
  3. returns = reverse cumulative sum over the whole row (gamma 1), then,
     for all but grpo, whitening over the loss-mask tokens of the batch.
The loss mask weights the KL and the whitening statistics only: it never
zeroes the running return, so a document block inside a response leaves
the returns before and after it as they would be without the block.

Called inside jit on global arrays, the sums are over the whole rollout
batch on every host (XLA inserts the cross-device reductions).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

GRPO_STD_EPS = 1e-9  # (r - mean) / (std + eps), std with ddof 1.
WHITEN_VAR_FLOOR = 1e-8  # (x - mean) * rsqrt(max(var, floor)), var over mask tokens (ddof 0).


def _groups(rewards, n: int):
    """[B] -> [B / n, n]; raises when B is not whole groups."""
    if rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of {n} samples")
    return rewards.reshape(-1, n)


def no_baseline(rewards, n: int):
    del n
    return rewards


def group_mean_baseline(rewards, n: int):
    groups = _groups(rewards, n)
    return (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)


def group_normalize(rewards, n: int):
    groups = _groups(rewards, n)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    return ((groups - groups.mean(axis=1, keepdims=True)) / (std + GRPO_STD_EPS)).reshape(-1)


def leave_one_out_baseline(rewards, n: int):
    groups = _groups(rewards, n)
    others_mean = (groups.sum(axis=1, keepdims=True) - groups) / (n - 1)
    return (groups - others_mean).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Estimator:
    shape_rewards: Callable  # (rewards [B], n) -> shaped rewards [B]
    whiten: bool


ESTIMATORS: dict[str, Estimator] = {
    "reinforce_pp": Estimator(no_baseline, whiten=True),
    "reinforce_baseline": Estimator(group_mean_baseline, whiten=True),
    "grpo": Estimator(group_normalize, whiten=False),
    "rloo": Estimator(leave_one_out_baseline, whiten=True),
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
    """(x - mean) / std with statistics over mask tokens only; applied to every token."""
    mean, var = masked_mean_var(x, mask)
    return (x - mean) * jnp.reciprocal(jnp.sqrt(jnp.maximum(var, WHITEN_VAR_FLOOR)))


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
