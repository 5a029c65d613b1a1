"""Length-aware micro-batches: each micro-batch runs at the width its longest row needs.

A rollout batch is padded to its longest row, and in search RL a few long rows (many
searches, truncations) set that width for all of them, so most of a padded step's FLOPs are
padding (44.7% of the demo's, `launch/bench_rl_step.py`). Here, after the advantages are
computed over the whole batch (their statistics do not change), the rows of each mini-batch
are sorted by length before they are cut into micro-batches, and each micro-batch is
computed at the smallest of a few static widths that holds its rows' last loss token: the
columns cut off are padding.

This is exact, not an approximation: the model is causal, so no kept token's log-prob
depends on a cut-off one, and the loss reads only loss-mask tokens, all kept. A mini-batch
holds the same rows as in the padded step, so the optimizer steps are the same; only the
order in which its micro-batch gradients are summed changes (fp32 reassociation).

The widths are static (one compiled branch each, under `lax.switch` inside the one jitted
step, which runs only the branch it takes), so the compiled shapes stay a small fixed set.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def bucket_widths(length: int, num_buckets: int, multiple: int = 8) -> tuple[int, ...]:
    """The widths of `num_buckets` buckets over a batch of `length` columns: length * i / n
    rounded up to a multiple (at most length), increasing, the last one length itself.

    Raises ValueError for num_buckets < 1.
    """
    if num_buckets < 1:
        raise ValueError(f"length_buckets must be >= 1, got {num_buckets}")
    widths = {min(length, -(-length * i // num_buckets // multiple) * multiple)
              for i in range(1, num_buckets + 1)}
    return tuple(sorted(w for w in widths if w >= 2))   # a log-prob needs 2 columns


def row_ends(mask):
    """mask [..., T] bool -> [...] int32: one past each row's last True column (0 if none)."""
    columns = jnp.arange(1, mask.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(mask, columns, 0), axis=-1)


def mini_batch_order(ends):
    """ends [k, nm, m] int32 -> [k, nm * m]: each mini-batch's rows in increasing order of
    ends, across its micro-batches (a stable sort)."""
    k, nm, m = ends.shape
    return jnp.argsort(ends.reshape(k, nm * m), axis=-1, stable=True)


def permute(x, order):
    """x [k, nm, m, ...] with each mini-batch's rows taken in `order` [k, nm * m]."""
    k, nm, m = x.shape[:3]
    flat = x.reshape(k, nm * m, *x.shape[3:])
    index = order.reshape(k, nm * m, *([1] * (x.ndim - 3)))
    return jnp.take_along_axis(flat, index, axis=1).reshape(x.shape)


def unpermute(x, order):
    """The inverse of permute(x, order)."""
    return permute(x, jnp.argsort(order, axis=-1))


def at_width(fn: Callable, widths: tuple[int, ...], needed, arrays: dict):
    """fn(arrays cut to the smallest width >= needed) for arrays name -> [m, T].

    needed: int32 scalar <= T. One `lax.switch` branch per width; fn's outputs must not
    depend on the width in shape (pad per-token outputs back to T inside fn).
    """
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(widths, jnp.int32), needed),
                        len(widths) - 1)

    def branch(width):
        return lambda xs: fn(jax.tree.map(lambda x: x[:, :width], xs))
    return jax.lax.switch(index, [branch(w) for w in widths], arrays)
