"""Per-token estimators of KL(policy || reference) from log-probs of the sampled tokens.

With log_ratio = log pi(y) - log pi_ref(y) at a token y sampled from pi:
  k1 = log_ratio                          (unbiased, high variance, can be negative)
  k2 = log_ratio**2 / 2                   (biased, non-negative)
  k3 = exp(-log_ratio) - 1 + log_ratio    (unbiased, non-negative, low variance)
k3's log ratio is clamped to [-K3_CLAMP, K3_CLAMP] so exp cannot overflow when
the policy has drifted far from the reference on one token.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

K3_CLAMP = 10.0


def k1(logp, ref_logp):
    return logp - ref_logp


def k2(logp, ref_logp):
    return 0.5 * jnp.square(logp - ref_logp)


def k3(logp, ref_logp):
    log_ratio = jnp.clip(logp - ref_logp, -K3_CLAMP, K3_CLAMP)
    return jnp.exp(-log_ratio) - 1.0 + log_ratio


KL_ESTIMATORS: dict[str, Callable] = {"k1": k1, "k2": k2, "k3": k3}


def token_kl(logp, ref_logp, estimator: str):
    """[B, T] per-token KL estimate (unmasked; callers apply the loss mask)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)
