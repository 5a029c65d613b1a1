"""The optimizer of the RL step: grad-norm clipping, Adam, cosine decay to a fraction of the lr."""
from __future__ import annotations

import optax

from searcher_jax.rl.config import RLConfig


def learning_rate_schedule(config: RLConfig) -> optax.Schedule:
    """Cosine from learning_rate at step 0 to final_lr_fraction * learning_rate at total_steps; no warmup."""
    return optax.cosine_decay_schedule(init_value=config.learning_rate,
                                       decay_steps=config.total_steps,
                                       alpha=config.final_lr_fraction)


def make_optimizer(config: RLConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam (no weight decay) at the scheduled lr; fp32 state."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(learning_rate_schedule(config)),
    )
