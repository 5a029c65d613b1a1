"""Policy losses and loss aggregations, each registered by name; the sampler/trainer correction.

All functions take per-token arrays [b, T] aligned to the token they score
(see logprobs.py) and a loss mask [b, T]. Aggregation divides by counts of
the whole optimizer step (`Normalizer`), not of the piece of it at hand, so
the losses of micro-batches of unequal lengths sum to the loss of the whole.

The losses read a `LossConfig`, defined here with every choice resolved;
config.RLConfig builds it (`RLConfig.loss`), so the dependency runs one way:
config.py imports this module for its registries, never the reverse.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from searcher_jax.rl import kl as kl_lib


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the loss of an optimizer step reads: RLConfig's choices, their defaults resolved."""
    policy_loss: str  # a name in POLICY_LOSSES
    clip_eps_low: float
    clip_eps_high: float
    aggregation: str  # a name in AGGREGATIONS
    dual_clip: float | None = None
    norm_tokens: int = 0  # seq_sum_batch_mean's constant length; 0: the batch's length T
    tis_cap: float | None = None  # truncated importance sampling against the sampler; None: off
    kl_coef: float = 0.0  # the KL's coefficient in the loss (0 when it is in the reward, or off)
    kl_estimator: str = "k1"


@dataclasses.dataclass(frozen=True)
class PolicyLossOutput:
    loss: jax.Array  # [b, T] per-token loss (to be aggregated over the mask)
    clipped: jax.Array  # [b, T] float: 1 where a clip bound decided the loss


# --- Policy losses ---------------------------------------------------------------------------

def _clipped_surrogate(ratio, advantages, config: LossConfig) -> PolicyLossOutput:
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), with the dual clip when configured: a
    negative-advantage token's loss is at most -c A. `ratio` broadcasts against [b, T]."""
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    was_clipped = clipped < unclipped
    if config.dual_clip is not None:
        bound = -config.dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = jnp.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return PolicyLossOutput(loss, was_clipped.astype(jnp.float32))


def ppo_clipped(logp, old_logp, advantages, loss_mask, config: LossConfig) -> PolicyLossOutput:
    """ppo: PPO's clipped surrogate on the token ratio (Schulman et al. 2017, arXiv 1707.06347).

    loss[t] = -min(r[t] A[t], clip(r[t], 1 - eps_low, 1 + eps_high) A[t]),
    r[t] = exp(logp[t] - old_logp[t]); with dual_clip c (Ye et al. 2020, arXiv 1912.09729) a
    negative-advantage token's loss is at most -c A[t].
    Defaults: eps 0.2, eps_high equal to eps_low unless set (the released R1-Searcher recipe),
    seq_mean_batch_mean.
    All inputs [b, T] float32; the mask is not needed (aggregation applies it).
    """
    del loss_mask
    return _clipped_surrogate(jnp.exp(logp - old_logp), advantages, config)


def dapo_clip_higher(logp, old_logp, advantages, loss_mask,
                     config: LossConfig) -> PolicyLossOutput:
    """dapo: DAPO's loss (Yu et al. 2025, arXiv 2503.14476, eq. 8): PPO's token surrogate with
    decoupled clip ranges ("clip-higher": a wider upper range leaves low-probability tokens room
    to grow, against entropy collapse), aggregated as one mean over every token of the batch.

    loss[t] = -min(r[t] A[t], clip(r[t], 1 - eps_low, 1 + eps_high) A[t]).
    Defaults: eps_low 0.2, eps_high 0.28, token_mean. DAPO's other parts are RLConfig fields:
    dynamic_sampling="refill" (dynamic_sampling.py) and overlong_buffer (rewards.py).
    """
    return ppo_clipped(logp, old_logp, advantages, loss_mask, config)


def _sequence_log_ratio(logp, old_logp, loss_mask):
    """[b, T] -> [b, 1]: each row's mean of logp - old_logp over its mask tokens (0 for none)."""
    mask = loss_mask.astype(bool)
    total = jnp.where(mask, logp - old_logp, 0.0).sum(axis=-1, keepdims=True)
    return total / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)


def gspo(logp, old_logp, advantages, loss_mask, config: LossConfig) -> PolicyLossOutput:
    """gspo: GSPO's sequence-level ratio, clipped per sequence (Zheng et al. 2025, arXiv
    2507.18071, eq. 5-7).

    s_i = exp(mean over row i's mask tokens of (logp - old_logp)) (the length-normalised
    sequence ratio), loss[i, t] = -min(s_i A[i, t], clip(s_i, 1 - eps_low, 1 + eps_high) A[i, t]):
    one ratio, and one clip decision, for the whole row. With a row-constant advantage (no KL in
    the reward) and seq_mean_batch_mean this is GSPO's objective, -1/G sum_i min(s_i A_i, ...).
    Defaults: eps_low 3e-4, eps_high 4e-4 (the paper's ranges; the sequence ratio moves far
    less than a token's), seq_mean_batch_mean. Inputs [b, T] float32; rows are whole.
    """
    ratio = jnp.exp(_sequence_log_ratio(logp, old_logp, loss_mask))  # [b, 1]
    return _clipped_surrogate(ratio, advantages, config)


def gspo_token(logp, old_logp, advantages, loss_mask, config: LossConfig) -> PolicyLossOutput:
    """gspo_token: GSPO-token (arXiv 2507.18071, eq. 13-14), for per-token advantages.

    s_i,t = sg[s_i] * exp(logp[t] - sg[logp[t]]): its value is row i's sequence ratio s_i, so
    the clip decision is still per sequence, while its gradient is s_i * grad logp[t], each
    token carrying its own advantage. Equal to gspo in value and gradient when every token of a
    row has the same advantage. Defaults as gspo: eps 3e-4 / 4e-4, seq_mean_batch_mean.
    """
    sequence = jax.lax.stop_gradient(jnp.exp(_sequence_log_ratio(logp, old_logp, loss_mask)))
    ratio = sequence * jnp.exp(logp - jax.lax.stop_gradient(logp))
    return _clipped_surrogate(ratio, advantages, config)


def cispo(logp, old_logp, advantages, loss_mask, config: LossConfig) -> PolicyLossOutput:
    """cispo: CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): REINFORCE with the clipped,
    stop-gradient importance weight, on every token (no token's gradient is dropped by a clip).

    w[t] = sg(clip(r[t], 1 - eps_low, 1 + eps_high)), r[t] = exp(logp[t] - old_logp[t]);
    the gradient of the token loss is -w[t] A[t] grad logp[t], as is that of the paper's
    -w A logp. It is written -w A exp(logp - sg(logp)), whose value is -w A, so that pg_loss
    reads on PPO's scale instead of carrying log-probabilities.
    Defaults: eps_low 1.0 (no lower bound, as the paper sets it), eps_high 4.0 (the paper tunes
    it without publishing a value; 4 is the slime framework's CISPO default), token_mean (the
    paper normalises by the group's total tokens). `clipped` marks tokens whose weight was
    capped.
    """
    del loss_mask
    ratio = jnp.exp(logp - old_logp)
    low, high = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
    loss = -weight * advantages * jnp.exp(logp - jax.lax.stop_gradient(logp))
    return PolicyLossOutput(loss, ((ratio < low) | (ratio > high)).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A registered loss and its paper's defaults, which RLConfig's unset (None) fields take."""
    fn: Callable[..., PolicyLossOutput]  # (logp, old_logp, advantages, loss_mask, LossConfig)
    clip_eps_low: float
    clip_eps_high: float | None  # None: symmetric, the (resolved) clip_eps_low
    aggregation: str
    ratio_clipped: bool = True  # a clipped ratio surrogate, to which a dual clip can apply


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": PolicyLoss(ppo_clipped, 0.2, None, "seq_mean_batch_mean"),
    "dapo": PolicyLoss(dapo_clip_higher, 0.2, 0.28, "token_mean"),
    "gspo": PolicyLoss(gspo, 3e-4, 4e-4, "seq_mean_batch_mean"),
    "gspo_token": PolicyLoss(gspo_token, 3e-4, 4e-4, "seq_mean_batch_mean"),
    "cispo": PolicyLoss(cispo, 1.0, 4.0, "token_mean", ratio_clipped=False),
}


# --- Aggregation -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Global counts of the optimizer step's batch: rows and loss-mask tokens (scalars).

    A row without any loss-mask token (a prompt dynamic sampling dropped) is not counted: it
    holds no sample, and a batch with it must average as the batch without it.
    """
    rows: jax.Array
    tokens: jax.Array

    @classmethod
    def of(cls, loss_mask) -> "Normalizer":
        """The counts of `loss_mask` [..., T] itself: every leading index is a row."""
        mask = loss_mask.astype(bool)
        return cls(rows=mask.any(axis=-1).sum().astype(jnp.float32),
                   tokens=mask.sum().astype(jnp.float32))


jax.tree_util.register_dataclass(Normalizer, data_fields=["rows", "tokens"], meta_fields=[])


def seq_mean_batch_mean(masked, mask, normalizer: Normalizer, norm_tokens: int):
    """Each row's mean over its mask tokens, summed, over the step's row count (the released
    R1-Searcher recipe; GRPO, Shao et al. 2024, arXiv 2402.03300, eq. 3)."""
    del norm_tokens
    row_means = masked.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1)
    return row_means.sum() / jnp.maximum(normalizer.rows, 1.0)


def token_mean(masked, mask, normalizer: Normalizer, norm_tokens: int):
    """The sum over mask tokens over the step's token count: every token weighs the same,
    whatever its row's length (DAPO, arXiv 2503.14476, section 3.3)."""
    del mask, norm_tokens
    return masked.sum() / jnp.maximum(normalizer.tokens, 1.0)


def seq_sum_batch_mean(masked, mask, normalizer: Normalizer, norm_tokens: int):
    """Each row's sum over its mask tokens over a constant length (norm_tokens; 0: the batch's
    length T), averaged over the step's rows: no per-row length normalisation, so a long wrong
    answer is not penalised less per token than a short one (Dr. GRPO, Liu et al. 2025,
    arXiv 2503.20783, section 3.1, with the generation budget as the constant)."""
    del mask
    length = norm_tokens or masked.shape[-1]
    return masked.sum() / (jnp.maximum(normalizer.rows, 1.0) * length)


AGGREGATIONS: dict[str, Callable] = {"seq_mean_batch_mean": seq_mean_batch_mean,
                                     "token_mean": token_mean,
                                     "seq_sum_batch_mean": seq_sum_batch_mean}


def aggregate(values, loss_mask, mode: str, normalizer: Normalizer, norm_tokens: int = 0):
    """This piece's share of the step's loss under the aggregation `mode` (a name in
    AGGREGATIONS). Masked-out values are excluded with `where`, so a NaN there cannot leak."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; use one of {', '.join(AGGREGATIONS)}")
    mask = loss_mask.astype(bool)
    return AGGREGATIONS[mode](jnp.where(mask, values, 0.0), mask, normalizer, norm_tokens)


def _token_mean(values, loss_mask, normalizer: Normalizer):
    """A metric's share: its mean over the step's mask tokens."""
    return aggregate(values, loss_mask, "token_mean", normalizer)


# --- Sampler/trainer mismatch ----------------------------------------------------------------

def truncated_is_weight(old_logp, sampler_logp, cap: float):
    """[b, T] min(pi_trainer / pi_sampler, cap) = min(exp(old_logp - sampler_logp), cap), with
    no gradient: the truncated importance weight (Ionides 2008, "Truncated importance
    sampling") that corrects a loss computed on the sampler's tokens for the sampler's
    kernels differing from the trainer's (a bf16 sampler, another attention kernel), as in
    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training".
    old_logp is the trainer's recomputation with the rollout params. Suggested cap: 2."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - sampler_logp), cap))


def policy_objective(logp, old_logp, advantages, loss_mask, config: LossConfig,
                     normalizer: Normalizer, ref_logp=None, entropy=None, sampler_logp=None):
    """The loss of one piece of an optimizer step's batch, and its metrics.

    Args:
      logp, old_logp, advantages, loss_mask: [b, T].
      config: the resolved loss configuration (RLConfig.loss).
      ref_logp: [b, T] reference log-probs, used when the KL goes into the loss.
      entropy: [b, T] policy entropy (a metric only).
      sampler_logp: [b, T] the sampler's log-probs of its tokens, needed when config.tis_cap
        is set: each token's loss is then weighted by truncated_is_weight.
    Returns:
      (loss scalar, metrics dict of scalars); both are this piece's share,
      so they add up over the pieces of the step.
    """
    out = POLICY_LOSSES[config.policy_loss].fn(logp, old_logp, advantages, loss_mask, config)
    token_loss = out.loss
    metrics = {}
    if config.tis_cap is not None:
        weight = truncated_is_weight(old_logp, sampler_logp, config.tis_cap)
        token_loss = weight * token_loss
        metrics["tis_weight_mean"] = _token_mean(weight, loss_mask, normalizer)
        metrics["tis_capped_frac"] = _token_mean(
            (weight >= config.tis_cap).astype(jnp.float32), loss_mask, normalizer)
    pg_loss = aggregate(token_loss, loss_mask, config.aggregation, normalizer, config.norm_tokens)
    loss = pg_loss
    metrics.update({
        "pg_loss": pg_loss,
        "clip_frac": _token_mean(out.clipped, loss_mask, normalizer),
        "approx_kl": _token_mean(jax.lax.stop_gradient(kl_lib.k3(logp, old_logp)), loss_mask,
                                 normalizer),
    })
    if config.kl_coef > 0:
        kl_loss = aggregate(kl_lib.token_kl(logp, ref_logp, config.kl_estimator), loss_mask,
                            config.aggregation, normalizer, config.norm_tokens)
        loss = loss + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    if entropy is not None:
        metrics["entropy"] = _token_mean(jax.lax.stop_gradient(entropy), loss_mask, normalizer)
    metrics["loss"] = loss
    return loss, metrics
