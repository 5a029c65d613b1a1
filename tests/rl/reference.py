"""Independent references for the RL tests, written from SPEC section 4 in plain numpy.

Nothing here calls searcher_jax. Group statistics are exact (fractions of the float32 rewards):
the published formulas are stated in exact arithmetic, where a group of equal rewards has
deviations of exactly 0, and a float64 mean would carry the very rounding residue the
product must not amplify. Everything else is float64.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

GRPO_STD_EPS = 1e-9  # (r - mean) / (std + 1e-9), std with ddof 1 (SPEC section 4).
WHITEN_VAR_FLOOR = 1e-8  # (x - mean) / sqrt(max(var, 1e-8)) over mask tokens, var with ddof 0.


def f1_values(max_tokens: int = 10) -> list[Fraction]:
    """Every token-level F1 value 2 * overlap / (len_pred + len_gold), lengths 1..max_tokens."""
    return sorted({Fraction(2 * overlap, pred + gold)
                   for pred in range(1, max_tokens + 1) for gold in range(1, max_tokens + 1)
                   for overlap in range(0, min(pred, gold) + 1)})


def shaped_rewards(estimator: str, rewards, n: int) -> np.ndarray:
    """[B] float32 rewards, groups of n contiguous rows -> [B] float64 shaped rewards."""
    out = []
    for start in range(0, len(rewards), n):
        group = [Fraction(float(r)) for r in rewards[start:start + n]]
        mean = sum(group) / n
        for r in group:
            if estimator == "reinforce_pp":
                out.append(float(r))
            elif estimator in ("reinforce_baseline", "dr_grpo"):  # dr_grpo: no std division
                out.append(float(r - mean))
            elif estimator == "rloo":
                out.append(float(r - (sum(group) - r) / (n - 1)))
            elif estimator == "grpo":
                std = math.sqrt(float(sum((x - mean) ** 2 for x in group) / (n - 1)))
                out.append(float(r - mean) / (std + GRPO_STD_EPS))
            else:
                raise ValueError(estimator)
    return np.asarray(out)


def returns(shaped, mask, kl_tokens=None, kl_coef: float = 0.0) -> np.ndarray:
    """[B] shaped rewards, [B, T] mask -> [B, T] returns, row by row.

    The scalar sits on the last mask token; -kl_coef * KL on every mask token; the return is
    the gamma-1 sum of everything from t on, and a mask hole never resets it.
    """
    b, t = mask.shape
    out = np.zeros((b, t))
    for row in range(b):
        per_token = np.zeros(t)
        for col in range(t):
            if mask[row, col] and kl_tokens is not None:
                per_token[col] -= kl_coef * float(kl_tokens[row, col])
        per_token[np.nonzero(mask[row])[0][-1]] += shaped[row]
        running = 0.0
        for col in reversed(range(t)):
            running += per_token[col]
            out[row, col] = running
    return out


def whiten(x, mask) -> np.ndarray:
    """(x - mean) / sqrt(max(var, 1e-8)), mean and var (ddof 0) over mask tokens."""
    x = np.asarray(x, np.float64)
    values = x[np.asarray(mask).astype(bool)]
    return (x - values.mean()) / math.sqrt(max(values.var(), WHITEN_VAR_FLOOR))


def advantages(estimator: str, rewards, mask, n: int, kl_tokens=None,
               kl_coef: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) [B, T] float64: grpo and dr_grpo unwhitened, every other estimator
    whitened."""
    ret = returns(shaped_rewards(estimator, rewards, n), mask, kl_tokens, kl_coef)
    return (ret if estimator in ("grpo", "dr_grpo") else whiten(ret, mask)), ret
