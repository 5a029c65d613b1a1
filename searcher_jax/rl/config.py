"""Static configuration of the RL update (SPEC section 4); defaults are the released Qwen recipe."""
from __future__ import annotations

import dataclasses

from searcher_jax.rl import advantages, kl, losses

KL_PLACEMENTS = ("reward", "loss")
AGGREGATIONS = ("seq_mean_batch_mean", "token_mean")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """How one rollout batch becomes optimizer steps.

    A rollout batch holds `prompts * samples_per_prompt` rows, the samples of
    one prompt contiguous. It is split into `rows / mini_batch_size`
    mini-batches (one optimizer step each), and each mini-batch into
    micro-batches of `micro_batch_size` rows whose gradients are summed.
    """
    estimator: str = "reinforce_baseline"  # A name in advantages.ESTIMATORS.
    samples_per_prompt: int = 16
    kl_coef: float = 0.0  # 0: no reference model, its forward is skipped.
    kl_estimator: str = "k1"
    kl_in: str = "reward"  # "reward": -kl_coef * KL per token; "loss": kl_coef * KL added.
    policy_loss: str = "ppo"  # A name in losses.POLICY_LOSSES.
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None  # None: the same as clip_eps_low.
    dual_clip: float | None = None  # c > 1 bounds the loss of negative advantages by -c * A.
    aggregation: str = "seq_mean_batch_mean"
    learning_rate: float = 2e-6
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    final_lr_fraction: float = 0.1  # Cosine decay from learning_rate to this fraction of it.
    total_steps: int = 1000  # Optimizer steps of the whole run (the schedule's length).
    mini_batch_size: int = 256  # Rows per optimizer step.
    micro_batch_size: int = 8  # Rows per forward/backward; gradients are accumulated.
    logprob_chunk: int = 512  # Sequence positions per logits chunk ([rows, chunk, vocab] at most).

    def __post_init__(self):
        _check_choice("estimator", self.estimator, tuple(advantages.ESTIMATORS))
        _check_choice("policy_loss", self.policy_loss, tuple(losses.POLICY_LOSSES))
        _check_choice("kl_estimator", self.kl_estimator, tuple(kl.KL_ESTIMATORS))
        _check_choice("kl_in", self.kl_in, KL_PLACEMENTS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.samples_per_prompt < 1:
            raise ValueError(f"RLConfig.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"RLConfig.estimator={self.estimator!r} needs samples_per_prompt >= 2 "
                             f"(a group statistic over one sample is undefined)")
        if self.kl_coef < 0:
            raise ValueError(f"RLConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.clip_eps_low <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ValueError(f"RLConfig clip eps must be > 0, got low={self.clip_eps_low} "
                             f"high={self.clip_eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"RLConfig.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"RLConfig.mini_batch_size {self.mini_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        for name in ("total_steps", "mini_batch_size", "micro_batch_size", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"RLConfig.final_lr_fraction must be in [0, 1], "
                             f"got {self.final_lr_fraction}")

    @property
    def clip_high(self) -> float:
        return self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high

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
