"""Causal grouped-query attention over whole rows (training, reference log-probs).

Four paths, picked by ModelConfig.attention (`resolve`):
  dense      XLA; forms the [rows, kv_heads, T, group, T] fp32 scores at once. At 4,096
             tokens per row they are most of a 7B train step's temporaries (the README's
             TPU memory plans).
  blockwise  pure jnp; never forms them. It visits the keys in blocks of `block` with an
             online softmax (FlashAttention, Dao et al. 2022, arXiv 2205.14135, Algorithm
             1), keeping per query only the running max, the running sum and the weighted
             values, and its custom backward recomputes each block's probabilities from the
             saved log-sum-exp (Algorithm 2 of FlashAttention-2, arXiv 2307.08691), so the
             backward stores no scores either: temporaries fall from O(T^2) to O(T * block)
             per head. Runs on every platform and under GSPMD sharding.
  splash     TPU's fused Pallas kernel (model/attention_kernels.py); on CPU the Pallas
             interpreter runs it (slow: for parity checks).
  cudnn      GPU's fused cuDNN flash attention via jax.nn.dot_product_attention
             (model/attention_kernels.py); bfloat16 or float16 only.
"auto" is `dense` on CPU (faster there at the demo's lengths, and what the benchmarks
measured), `splash` on TPU, `cudnn` on GPU for bfloat16 models and `blockwise` for fp32
ones.

Masking: a query at position i attends keys j <= i with j < the length of its row.
dense and blockwise give keys masked out the lowest float32 score, so a query with every
key masked (a row of length 0) averages the row's T values, forward and backward; the
blockwise path's padding keys (T rounded up to whole blocks) get -inf: they never count.
The fused kernels match both at every position of rows of length >= 1 and treat a row of
length 0 as of length 1 (attention_kernels.py); such a row is outside every loss.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from searcher_jax.model import attention_kernels
from searcher_jax.model.config import ATTENTION_CHOICES

_MASKED = float(np.finfo(np.float32).min)
# Platforms (jax.default_backend()'s names) each fused kernel runs on.
_KERNEL_PLATFORMS = {"splash": ("tpu", "cpu"), "cudnn": ("gpu",)}


def resolve(choice: str, platform: str, dtype: str = "bfloat16") -> str:
    """The path `choice` means for a `dtype` model on `platform` (jax.default_backend()'s
    names): "auto" resolved, any other choice checked. Raises ValueError for an unknown
    choice or a fused kernel asked for on a platform without it."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {choice!r}; one of {ATTENTION_CHOICES}")
    if choice == "auto":
        if platform == "gpu":
            return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blockwise"
        return {"cpu": "dense", "tpu": "splash"}.get(platform, "blockwise")
    if platform not in _KERNEL_PLATFORMS.get(choice, (platform,)):
        raise ValueError(f"attention {choice!r} runs on {' or '.join(_KERNEL_PLATFORMS[choice])}, "
                         f"not on this {platform!r} platform; use 'auto', 'dense' or 'blockwise'")
    return choice


def current_platform() -> str:
    """The platform a program being traced is for: the mesh's set with jax.set_mesh (a TPU
    slice's when memory_plan.py compiles for one on a CPU host), else this host's backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def attend(q, k, v, lengths, choice: str, block: int):
    """q [B,T,N,D], k and v [B,T,K,D], lengths [B] int32 or None -> [B,T,N,D] in v's dtype.

    N query heads over K kv heads (N a multiple of K). `choice` is a resolved path (see
    `resolve`); `block` is the blockwise path's keys per block and splash's tile bound.
    """
    if choice == "splash":
        return attention_kernels.splash_attention(q, k, v, lengths, block,
                                                  interpret=current_platform() != "tpu")
    if choice == "cudnn":
        return attention_kernels.cudnn_attention(q, k, v, lengths)
    # The 5-D [B,K,T,G,D] form: a 4-D one raised Qwen2.5-7B's v5p-32 train-phase peak from
    # 23.4 to 26.3 GiB (memory_plan).
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d).transpose(0, 2, 1, 3, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = causal_attention(q, k, v, lengths, choice, block)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)


def causal_attention(q, k, v, lengths, choice: str, block: int):
    """q [B,K,T,G,D], k and v [B,K,T,D], lengths [B] int32 or None -> [B,K,T,G,D] in v's dtype.

    K kv heads, G query heads per kv head. `choice` is "dense" or "blockwise" (resolved).
    """
    t = q.shape[2]
    lengths = jnp.full((q.shape[0],), t, jnp.int32) if lengths is None else lengths
    if choice == "dense":
        scores = _masked_scores(q, k, _mask(jnp.arange(t), jnp.arange(t), lengths))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bktgs,bksd->bktgd", probs, v)
    block = min(block, t)
    pad = -t % block
    if pad:  # keys padded to whole blocks; the padding is past every row's length
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return _blockwise(q, k, v, lengths, block, t)


def _mask(query_pos, key_pos, lengths):
    """[B,1,T,1,S]: key j visible to query i when j <= i and j < the row's length."""
    causal = key_pos[None, :] <= query_pos[:, None]                 # [T, S]
    valid = key_pos[None, :] < lengths[:, None]                     # [B, S]
    return (causal[None, None, :, None, :] & valid[:, None, None, None, :])


def _masked_scores(q, k, mask):
    """q [B,K,T,G,D] x k [B,K,S,D] -> scaled fp32 scores [B,K,T,G,S], masked keys lowest."""
    scores = jnp.einsum("bktgd,bksd->bktgs", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores / math.sqrt(q.shape[-1]), _MASKED)


def _block_scores(q, k, lengths, j, block, num_keys):
    """Block j's masked, scaled fp32 scores [B,K,T,G,block], its mask, and its keys. Keys
    from `num_keys` on are padding: -inf, below every masked key's score."""
    kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
    key_pos = j * block + jnp.arange(block)
    mask = _mask(jnp.arange(q.shape[2]), key_pos, lengths)
    scores = _masked_scores(q, kj, mask)
    return jnp.where(key_pos < num_keys, scores, -jnp.inf), mask, kj


def online_softmax_step(carry, scores, values, contraction: str):
    """One block of keys through an online softmax (FlashAttention, arXiv 2205.14135,
    Algorithm 1). carry: (running max [...], running sum [...], weighted values [..., D]),
    all fp32; scores [..., S] fp32, masked; values: the block's, which the einsum
    `contraction` weights by the probabilities. Returns the new carry. Shared by the
    blockwise path and the sampler's cached attention in key blocks
    (decoder.attend_cached)."""
    running_max, running_sum, acc = carry
    new_max = jnp.maximum(running_max, scores.max(-1))
    probs = jnp.exp(scores - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    running_sum = running_sum * rescale + probs.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        contraction, probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return new_max, running_sum, acc


def _forward(q, k, v, lengths, block, num_keys):
    """(out [B,K,T,G,D] fp32, running max [B,K,T,G] fp32, log of the running sum [B,K,T,G]).

    The max and the log-sum are kept apart: a row of length 0 has a max of float32's lowest
    value, and adding log(sum) to it would round the log away."""
    b, kh, t, g, d = q.shape

    def body(carry, j):
        scores, _, _ = _block_scores(q, k, lengths, j, block, num_keys)
        vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
        return online_softmax_step(carry, scores, vj, "bktgs,bksd->bktgd"), None

    init = (jnp.full((b, kh, t, g), _MASKED, jnp.float32), jnp.zeros((b, kh, t, g), jnp.float32),
            jnp.zeros((b, kh, t, g, d), jnp.float32))
    (running_max, running_sum, acc), _ = jax.lax.scan(
        body, init, jnp.arange(k.shape[2] // block))
    return acc / running_sum[..., None], running_max, jnp.log(running_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, lengths, block, num_keys):
    out, _, _ = _forward(q, k, v, lengths, block, num_keys)
    return out.astype(v.dtype)


def _blockwise_fwd(q, k, v, lengths, block, num_keys):
    out, running_max, log_sum = _forward(q, k, v, lengths, block, num_keys)
    out = out.astype(v.dtype)
    return out, (q, k, v, lengths, out, running_max, log_sum)


def _blockwise_bwd(block, num_keys, residuals, d_out):
    q, k, v, lengths, out, running_max, log_sum = residuals
    d_out = d_out.astype(jnp.float32)
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O) (FlashAttention-2, eq. 4's D).
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)          # [B,K,T,G]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def body(d_q, j):
        scores, mask, kj = _block_scores(q, k, lengths, j, block, num_keys)
        vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
        probs = jnp.exp((scores - running_max[..., None]) - log_sum[..., None])  # [B,K,T,G,S]
        d_v = jnp.einsum("bktgs,bktgd->bksd", probs, d_out)
        d_probs = jnp.einsum("bktgd,bksd->bktgs", d_out, vj.astype(jnp.float32))
        d_scores = jnp.where(mask, probs * (d_probs - delta[..., None]) * scale, 0.0)
        d_q = d_q + jnp.einsum("bktgs,bksd->bktgd", d_scores, kj.astype(jnp.float32))
        d_k = jnp.einsum("bktgs,bktgd->bksd", d_scores, q.astype(jnp.float32))
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32),
                                   jnp.arange(k.shape[2] // block))
    # [blocks, B, K, block, D] -> [B, K, S, D] (padded keys included: jnp.pad's transpose in
    # causal_attention cuts them off).
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(k.shape)  # pylint: disable=unnecessary-lambda-assignment
    zero_lengths = np.zeros(lengths.shape, jax.dtypes.float0)
    return (d_q.astype(q.dtype), unblock(d_k).astype(k.dtype), unblock(d_v).astype(v.dtype),
            zero_lengths)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
