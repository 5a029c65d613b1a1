"""Policy losses, registered by name, and their aggregation over mask tokens.

All functions take per-token arrays [b, T] aligned to the token they score
(see logprobs.py) and a loss mask [b, T]. Aggregation divides by counts of
the whole optimizer step (`Normalizer`), not of the piece of it at hand, so
the losses of micro-batches of unequal lengths sum to the loss of the whole.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from searcher_jax.rl import kl as kl_lib


class LossConfig(Protocol):
    """The fields of the loss's configuration read here; config.RLConfig has them all.

    A structural type, so this module does not import config.py, which imports this module to
    check `policy_loss` against POLICY_LOSSES.
    """
    policy_loss: str
    clip_eps_low: float
    dual_clip: float | None
    aggregation: str
    kl_coef: float
    kl_estimator: str
    kl_in: str

    @property
    def clip_high(self) -> float: ...

    @property
    def uses_reference(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class PolicyLossOutput:
    loss: jax.Array  # [b, T] per-token loss (to be aggregated over the mask)
    clipped: jax.Array  # [b, T] float: 1 where a clip bound decided the loss


def ppo_clipped(logp, old_logp, advantages, config: LossConfig) -> PolicyLossOutput:
    """PPO's clipped surrogate, optionally with separate high eps and dual clip.

    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old_logp);
    with dual clip c, a negative-advantage token's loss is at most -c A.
    """
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps_low, 1.0 + config.clip_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    was_clipped = clipped < unclipped
    if config.dual_clip is not None:
        bound = -config.dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = jnp.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return PolicyLossOutput(loss, was_clipped.astype(jnp.float32))


POLICY_LOSSES: dict[str, Callable[..., PolicyLossOutput]] = {"ppo": ppo_clipped}


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Global counts of the optimizer step's batch: rows and loss-mask tokens (scalars)."""
    rows: jax.Array
    tokens: jax.Array

    @classmethod
    def of(cls, loss_mask) -> "Normalizer":
        """The counts of `loss_mask` [..., T] itself: every leading index is a row."""
        rows = math.prod(loss_mask.shape[:-1])
        tokens = loss_mask.astype(bool).sum().astype(jnp.float32)
        return cls(rows=jnp.asarray(rows, jnp.float32), tokens=tokens)


jax.tree_util.register_dataclass(Normalizer, data_fields=["rows", "tokens"], meta_fields=[])


def aggregate(values, loss_mask, mode: str, normalizer: Normalizer):
    """Sum of this piece's share of the step's loss.

    "seq_mean_batch_mean": each row's mean over its mask tokens, summed and
      divided by the step's row count (the released recipe).
    "token_mean": the sum over mask tokens divided by the step's token count.
    Masked-out values are excluded with `where`, so a NaN there cannot leak.
    """
    mask = loss_mask.astype(bool)
    masked = jnp.where(mask, values, 0.0)
    if mode == "token_mean":
        return masked.sum() / jnp.maximum(normalizer.tokens, 1.0)
    if mode == "seq_mean_batch_mean":
        row_means = masked.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1)
        return row_means.sum() / jnp.maximum(normalizer.rows, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; use seq_mean_batch_mean or token_mean")


def token_mean(values, loss_mask, normalizer: Normalizer):
    return aggregate(values, loss_mask, "token_mean", normalizer)


def policy_objective(logp, old_logp, advantages, loss_mask, config: LossConfig,
                     normalizer: Normalizer, ref_logp=None, entropy=None):
    """The loss of one piece of an optimizer step's batch, and its metrics.

    Args:
      logp, old_logp, advantages, loss_mask: [b, T].
      ref_logp: [b, T] reference log-probs, used when the KL goes into the loss.
      entropy: [b, T] policy entropy (a metric only).
    Returns:
      (loss scalar, metrics dict of scalars); both are this piece's share,
      so they add up over the pieces of the step.
    """
    out = POLICY_LOSSES[config.policy_loss](logp, old_logp, advantages, config)
    pg_loss = aggregate(out.loss, loss_mask, config.aggregation, normalizer)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss,
        "clip_frac": token_mean(out.clipped, loss_mask, normalizer),
        "approx_kl": token_mean(jax.lax.stop_gradient(kl_lib.k3(logp, old_logp)), loss_mask,
                                normalizer),
    }
    if config.uses_reference and config.kl_in == "loss":
        kl_loss = aggregate(kl_lib.token_kl(logp, ref_logp, config.kl_estimator), loss_mask,
                            config.aggregation, normalizer)
        loss = loss + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    if entropy is not None:
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy), loss_mask, normalizer)
    metrics["loss"] = loss
    return loss, metrics
