"""The rollout batch the RL step consumes, and its split into mini- and micro-batches.

Layout (B = prompts * samples_per_prompt rows, the samples of one prompt contiguous):
  tokens [B, T] int32     prompt + response (with any inserted documents), right padded
  loss_mask [B, T]        1 exactly on the tokens the policy sampled (not prompt,
                          documents or padding); column 0 is never scored
  rewards [B] float32     the scalar reward of each row
  ref_logprobs [B, T]     reference log-probs (logprobs.py alignment); only when kl_coef > 0
  sampler_logprobs [B, T] the sampler's own log-probs of its tokens: the mismatch metric, and
                          the truncated importance weight when tis_cap is set
  keep [B] bool           the rows the loss may use (False: a prompt dynamic sampling dropped;
                          its loss mask is cleared in the step, while the sampler/trainer
                          mismatch metric still reads every sampled token); None: every row
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from searcher_jax.rl.config import RLConfig


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    tokens: jax.Array
    loss_mask: jax.Array
    rewards: jax.Array
    ref_logprobs: jax.Array | None = None
    sampler_logprobs: jax.Array | None = None
    keep: jax.Array | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


jax.tree_util.register_dataclass(
    RolloutBatch,
    data_fields=["tokens", "loss_mask", "rewards", "ref_logprobs", "sampler_logprobs", "keep"],
    meta_fields=[])


def check_batch(batch: RolloutBatch, config: RLConfig):
    """Raises a ValueError naming the field when shapes or dtypes do not fit the config.

    Works on arrays and on jax.ShapeDtypeStruct (for compiling without data).
    """
    b, t = batch.tokens.shape
    if not jnp.issubdtype(batch.tokens.dtype, jnp.integer):
        raise ValueError(f"RolloutBatch.tokens must be integer, got {batch.tokens.dtype}")
    if t < 2:
        raise ValueError(f"RolloutBatch.tokens must have at least 2 positions, got T={t}")
    if batch.loss_mask.shape != (b, t):
        raise ValueError(f"RolloutBatch.loss_mask has shape {batch.loss_mask.shape}, "
                         f"tokens {batch.tokens.shape}")
    if batch.rewards.shape != (b,):
        raise ValueError(f"RolloutBatch.rewards has shape {batch.rewards.shape}, want ({b},)")
    if batch.keep is not None and batch.keep.shape != (b,):
        raise ValueError(f"RolloutBatch.keep has shape {batch.keep.shape}, want ({b},)")
    for name in ("ref_logprobs", "sampler_logprobs"):
        value = getattr(batch, name)
        if value is not None and value.shape != (b, t):
            raise ValueError(f"RolloutBatch.{name} has shape {value.shape}, want {(b, t)}")
    if config.uses_reference and batch.ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs RolloutBatch.ref_logprobs "
                         f"(reference log-probs from logprobs.policy_logprobs)")
    if config.tis_cap is not None and batch.sampler_logprobs is None:
        raise ValueError(f"tis_cap={config.tis_cap} needs RolloutBatch.sampler_logprobs (the "
                         f"sampler's log-probs of its tokens)")
    config.steps_per_batch(b)


def split_rows(x, num_mini: int, num_micro: int):
    """[B, ...] -> [num_mini, num_micro, m, ...], rows strided over both splits.

    Row r = a * (num_micro * num_mini) + j * num_mini + i goes to mini-batch i,
    micro-batch j, slot a. Rows sharded in contiguous blocks over D devices
    (D dividing m) stay on their device: each micro-batch takes m / D rows
    from every device, so the split moves no data, whatever the mesh.
    """
    b = x.shape[0]
    m = b // (num_mini * num_micro)
    if m * num_mini * num_micro != b:
        raise ValueError(f"{b} rows do not split into {num_mini} x {num_micro} micro-batches")
    x = x.reshape(m, num_micro, num_mini, *x.shape[1:])
    return jnp.moveaxis(x, (0, 2), (2, 0))


def unsplit_rows(x):
    """The inverse of split_rows: [num_mini, num_micro, m, ...] -> [B, ...]."""
    x = jnp.moveaxis(x, (0, 2), (2, 0))
    return x.reshape(-1, *x.shape[3:])
