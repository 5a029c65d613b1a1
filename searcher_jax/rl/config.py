"""Static configuration of the RL update (SPEC section 4); defaults are the released Qwen recipe.

Every choice is a name in a registry whose entries document their formula, paper and
defaults: advantages.ESTIMATORS, losses.POLICY_LOSSES, losses.AGGREGATIONS,
kl.KL_ESTIMATORS, dynamic_sampling.MODES.
"""
from __future__ import annotations

import dataclasses

from searcher_jax.rl import advantages, dynamic_sampling, kl, losses

KL_PLACEMENTS = ("reward", "loss")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """How one rollout batch becomes optimizer steps.

    A rollout batch holds `prompts * samples_per_prompt` rows, the samples of
    one prompt contiguous. It is split into `rows / mini_batch_size`
    mini-batches (one optimizer step each), and each mini-batch into
    micro-batches of `micro_batch_size` rows whose gradients are summed.

    Fields left None take the default of the chosen estimator or policy loss (`loss` gives the
    resolved values), so `policy_loss="gspo"` alone runs GSPO with its paper's clip ranges.
    """
    estimator: str = "reinforce_baseline"  # A name in advantages.ESTIMATORS.
    samples_per_prompt: int = 16
    kl_coef: float = 0.0  # 0: no reference model, its forward is skipped.
    kl_estimator: str = "k1"
    kl_in: str = "reward"  # "reward": -kl_coef * KL per token; "loss": kl_coef * KL added.
    policy_loss: str = "ppo"  # A name in losses.POLICY_LOSSES.
    clip_eps_low: float | None = None  # None: the policy loss's (ppo 0.2, gspo 3e-4, ...).
    # None: the policy loss's (dapo 0.28, gspo 4e-4, ...); ppo's is clip_eps_low (symmetric).
    clip_eps_high: float | None = None
    dual_clip: float | None = None  # c > 1 bounds the loss of negative advantages by -c * A.
    # A name in losses.AGGREGATIONS. None: the estimator's (dr_grpo: seq_sum_batch_mean), else
    # the policy loss's (ppo, gspo: seq_mean_batch_mean; dapo, cispo: token_mean).
    aggregation: str | None = None
    # seq_sum_batch_mean's constant length. 0: the batch's length T; a run config sets the
    # sampler's max_len (the generation budget), so that it is constant across steps.
    loss_norm_tokens: int = 0
    # Truncated importance sampling against the sampler (losses.truncated_is_weight): each
    # token's loss times min(pi_trainer / pi_sampler, tis_cap). None: off; 2 is usual.
    tis_cap: float | None = None
    # Prompts whose samples all got the same reward (dynamic_sampling.py): "off" keeps them,
    # "drop" leaves them out of the loss, "refill" also draws more prompts to replace them
    # (DAPO), up to `dynamic_sampling_draws` rollouts per step.
    dynamic_sampling: str = "off"
    dynamic_sampling_draws: int = 4
    # DAPO's soft overlong punishment (rewards.overlong_penalty): 0 off; DAPO uses 4096.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0  # The penalty of a row that reaches the length limit.
    learning_rate: float = 2e-6
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    final_lr_fraction: float = 0.1  # Cosine decay from learning_rate to this fraction of it.
    total_steps: int = 1000  # Optimizer steps of the whole run (the schedule's length).
    mini_batch_size: int = 256  # Rows per optimizer step.
    micro_batch_size: int = 8  # Rows per forward/backward; gradients are accumulated.
    # Length-aware micro-batches (length_buckets.py): after the advantages, each mini-batch's
    # rows are sorted by length and each micro-batch runs at the smallest of this many widths
    # (T * i / n) that holds its rows. 1: every micro-batch at the batch's width T. Exact
    # either way; more buckets skip more padding and compile more branches.
    length_buckets: int = 1
    logprob_chunk: int = 512  # Sequence positions per logits chunk ([rows, chunk, vocab] at most).

    def __post_init__(self):
        _check_choice("estimator", self.estimator, tuple(advantages.ESTIMATORS))
        _check_choice("policy_loss", self.policy_loss, tuple(losses.POLICY_LOSSES))
        _check_choice("kl_estimator", self.kl_estimator, tuple(kl.KL_ESTIMATORS))
        _check_choice("kl_in", self.kl_in, KL_PLACEMENTS)
        if self.aggregation is not None:
            _check_choice("aggregation", self.aggregation, tuple(losses.AGGREGATIONS))
        _check_choice("dynamic_sampling", self.dynamic_sampling, dynamic_sampling.MODES)
        if self.samples_per_prompt < 1:
            raise ValueError(f"RLConfig.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        estimator = advantages.ESTIMATORS[self.estimator]
        if self.samples_per_prompt < estimator.min_samples:
            raise ValueError(f"RLConfig.estimator={self.estimator!r} needs samples_per_prompt >= "
                             f"{estimator.min_samples} (a group statistic over one sample is "
                             f"undefined)")
        if self.dynamic_sampling != "off" and not estimator.group_relative:
            raise ValueError(f"RLConfig.dynamic_sampling={self.dynamic_sampling!r} drops prompts "
                             f"whose samples tie, whose rewards shape to 0 (no signal of their "
                             f"own) only under a group-relative estimator; "
                             f"estimator={self.estimator!r} is not one")
        if self.dynamic_sampling != "off" and self.samples_per_prompt < 2:
            raise ValueError(f"RLConfig.dynamic_sampling={self.dynamic_sampling!r} needs "
                             f"samples_per_prompt >= 2 (one sample always ties with itself)")
        if self.kl_coef < 0:
            raise ValueError(f"RLConfig.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("clip_eps_low", "clip_eps_high", "tis_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"RLConfig.{name} must be > 0 (or None), got {value}")
        if self.dual_clip is not None:
            if self.dual_clip <= 1:
                raise ValueError(f"RLConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
            if not losses.POLICY_LOSSES[self.policy_loss].ratio_clipped:
                raise ValueError(f"RLConfig.dual_clip bounds a clipped ratio surrogate; "
                                 f"policy_loss={self.policy_loss!r} has none (set it to None)")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"RLConfig.mini_batch_size {self.mini_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        for name in ("total_steps", "mini_batch_size", "micro_batch_size", "logprob_chunk",
                     "dynamic_sampling_draws", "length_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("loss_norm_tokens", "overlong_buffer", "overlong_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"RLConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"RLConfig.final_lr_fraction must be in [0, 1], "
                             f"got {self.final_lr_fraction}")

    @property
    def loss(self) -> losses.LossConfig:
        """The loss's configuration, each unset choice resolved to its registry default."""
        chosen = losses.POLICY_LOSSES[self.policy_loss]
        aggregation = (self.aggregation or advantages.ESTIMATORS[self.estimator].aggregation
                       or chosen.aggregation)
        low = chosen.clip_eps_low if self.clip_eps_low is None else self.clip_eps_low
        high = next(eps for eps in (self.clip_eps_high, chosen.clip_eps_high, low)
                    if eps is not None)
        return losses.LossConfig(
            policy_loss=self.policy_loss, clip_eps_low=low, clip_eps_high=high,
            aggregation=aggregation, dual_clip=self.dual_clip,
            norm_tokens=self.loss_norm_tokens, tis_cap=self.tis_cap,
            kl_coef=self.kl_coef if self.kl_in == "loss" else 0.0,
            kl_estimator=self.kl_estimator)

    @property
    def uses_reference(self) -> bool:
        """Whether reference log-probs are needed at all (the KL coefficient is not 0)."""
        return self.kl_coef > 0

    def steps_per_batch(self, rows: int) -> int:
        """Optimizer steps for a rollout batch of `rows` rows; raises if it does not split."""
        if rows % self.mini_batch_size:
            raise ValueError(f"rollout batch of {rows} rows does not split into mini-batches of "
                             f"{self.mini_batch_size} rows")
        if rows % self.samples_per_prompt:
            raise ValueError(f"rollout batch of {rows} rows is not whole groups of "
                             f"samples_per_prompt={self.samples_per_prompt}")
        return rows // self.mini_batch_size


def _check_choice(field: str, value: str, choices: tuple[str, ...]):
    if value not in choices:
        raise ValueError(f"RLConfig.{field}={value!r} is not one of {', '.join(choices)}")
