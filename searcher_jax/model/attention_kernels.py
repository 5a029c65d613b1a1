"""The vendors' fused attention kernels for whole rows: TPU splash (Pallas) and GPU cuDNN.

Both never form the [T, T] scores, forward or backward, and both take the rows' layout
the decoder has, q [B,T,N,D] and k, v [B,T,K,D] with N a multiple of K (GQA).

Masking is model/attention.py's: a query at position i attends keys j <= i with j < the
row's length, so positions past a row's length attend its valid keys just as the dense
path's do and every output matches it. The one difference: a row of length 0, where the
dense path averages all T values, is attended as if of length 1 (every query sees key 0),
because neither kernel defines a softmax with no visible key. Such a row is all padding
and outside every loss.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from searcher_jax.model import sharding

# The splash kernel tiles queries and keys in multiples of the TPU's 128 lanes.
SPLASH_TILE = 128


def _visible_lengths(lengths, b: int, t: int):
    """lengths [B] int32 or None (whole rows) -> [B] int32, at least 1 (see module doc)."""
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    return jnp.maximum(lengths, 1)


def splash_attention(q, k, v, lengths, block: int, interpret: bool):
    """q [B,T,N,D], k and v [B,T,K,D], lengths [B] int32 or None -> [B,T,N,D] in q's dtype.

    JAX's splash kernel (jax.experimental.pallas.ops.tpu.splash_attention) with a causal
    mask and the lengths as segment ids: every query is segment 0, keys before the row's
    length segment 0 and keys from it on segment 1, so a query never sees a key past the
    length. T is padded to whole tiles of the largest multiple of 128 up to `block` that
    divides T rounded up to 128; padded keys are past every length, padded queries are cut.
    `interpret` runs the kernel in the Pallas interpreter (any platform; for checks on CPU).

    A Mosaic kernel is not partitioned by GSPMD: under a mesh set with `jax.set_mesh`
    (train_step.py's sharded programs, memory_plan.py) it runs in a shard_map over rows
    (the mesh's batch axes) and query heads (its tensor axis), where they divide, with each
    kv head repeated as often as needed for the kv heads to split the same way; under a
    multi-device jit without a mesh, lowering fails with JAX's "wrap the call in a shard_map".
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    padded = -(-t // SPLASH_TILE) * SPLASH_TILE
    tile = max(size for size in range(SPLASH_TILE, max(block, SPLASH_TILE) + 1, SPLASH_TILE)
               if padded % size == 0)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.CausalMask((padded, padded))] * n),
        block_sizes=splash.BlockSizes(
            block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
            block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile),
        head_shards=1, q_seq_shards=1, interpret=interpret)

    def local(q, k, v, lengths):  # one shard's rows and heads, [b,N,T,D] and [b,K,T,D]
        key_segment = (jnp.arange(padded)[None] >= lengths[:, None]).astype(jnp.int32)
        query_segment = jnp.zeros_like(key_segment)
        one_row = lambda q, k, v, qs, ks: kernel(  # pylint: disable=unnecessary-lambda-assignment
            q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks))
        return jax.vmap(one_row)(q, k, v, query_segment, key_segment)

    def heads_first(x):  # [B,T,H,D] -> [B,H,T',D], T padded to whole tiles
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        q_spec = sharding.logical_to_spec(("batch", "heads", None, None), (b, n, padded, d),
                                          mesh, name="splash q")
        rows, heads = q_spec[0], q_spec[1]
        split = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str)
                                                   else heads or ()))
        if kv_heads % split:
            # The query heads split over `tensor` but the kv heads do not (Llama-3.1-8B's 8
            # over 16): each kv head repeated, so that every shard holds its query heads' kv
            # head. A shard_map over rows only held every head on every chip and gathered
            # q, k, v whole (Llama on v5e-64: train step temporaries 12.3 GiB, blockwise's 8.8).
            repeat = math.lcm(kv_heads, split) // kv_heads
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        local = jax.shard_map(
            local, mesh=mesh, check_vma=False, out_specs=PartitionSpec(rows, heads),
            in_specs=(PartitionSpec(rows, heads),) * 3 + (PartitionSpec(rows),))
    # The kernel does not scale the scores; scaling q first is the same product.
    scaled = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    out = local(heads_first(scaled), heads_first(k), heads_first(v),
                _visible_lengths(lengths, b, t))
    return out.transpose(0, 2, 1, 3)[:, :t]


def cudnn_attention(q, k, v, lengths, implementation: str = "cudnn"):
    """q [B,T,N,D], k and v [B,T,K,D], lengths [B] int32 or None -> [B,T,N,D] in q's dtype.

    jax.nn.dot_product_attention, causal, with the lengths as `key_value_seq_lengths`
    (queries keep all T positions, so those past a length attend its valid keys).
    `implementation` "cudnn" is cuDNN's fused flash attention (GPU only, bfloat16 or
    float16; it raises ValueError for float32, naming the dtype); "xla" runs the same call
    on any platform, to check this plumbing against the dense path.
    """
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention 'cudnn' takes bfloat16 or float16 activations, got "
                         f"{q.dtype}; use model.attention='blockwise' for a {q.dtype} model")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation,
        key_value_seq_lengths=_visible_lengths(lengths, q.shape[0], q.shape[1]))
