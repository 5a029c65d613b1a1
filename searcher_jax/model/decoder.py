"""One decoder for the Qwen2/Qwen2.5, Qwen3 and Llama 3 families, in Flax NNX.

Parameters are fp32 and carry logical axis names (`logical_axes` metadata) that
`sharding.py` maps to mesh axes. Compute runs in `config.dtype`. Layers are
either one module per layer or one stacked module run under `lax.scan`
(`config.scan_layers`); both import and export the same HF checkpoint.

A KV cache (from `init_cache`) turns the same forward into incremental
decoding: row b's new tokens land at cache slots `write_index[b] + t`, which
are also their positions, so prompt prefill and appending retrieved documents
are one operation.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from searcher_jax.model import attention
from searcher_jax.model.config import ModelConfig

# Per layer {"k": [B, K, D, S], "v": [B, K, S, D]}; stacked with a leading [L] under scan.
Cache = Any
CACHE_SLOT_AXIS = {"k": -1, "v": -2}  # where the slots (S) sit in each cache array


def _param(rngs: nnx.Rngs | None, shape, axes, stack: int | None, init: str = "normal"):
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=tuple(axes))


def rms_norm(x, scale, eps: float):
    """HF's RMSNorm: normalise in fp32, scale after casting back."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig):
    """[D/2] inverse frequencies, with Llama 3.1's scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotates x [B, T, H, D] by positions [B, T] (HF's rotate-half layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attend_cached(q, k, v, mask, key_block: int = 0):
    """Grouped-query attention over the cache. q [B,T,N,D], k [B,K,D,S], v [B,K,S,D],
    mask [B,T,S] -> [B,T,N,D]. key_block > 0 (dividing S): `_attend_cached_blocks`.

    Both contractions batch over (B, K) and read the cache in place: a head's T*G queries
    as one [M, D] matrix, so both are plain 4-D matmuls (the sampler benchmark's rollout ran
    about a tenth faster on XLA CPU than with the 5-D form). On XLA CPU, cached keys stored
    [S, D] made the decode scores 3x slower at 1,476 slots (a decode step is bound by
    reading the cache), and a [B,S,K,D] cache re-laid the whole attended cache out on every
    step.
    """
    b, t, n, d = q.shape
    kv_heads = v.shape[1]
    group = n // kv_heads
    q = q.reshape(b, t, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(
        b, kv_heads, t * group, d)
    mask = jnp.broadcast_to(mask[:, None, :, None, :], (b, 1, t, group, mask.shape[-1]))
    mask = mask.reshape(b, 1, t * group, -1)
    if key_block:
        out = _attend_cached_blocks(q, k, v, mask, key_block)
    else:
        scores = jnp.einsum("bkmd,bkds->bkms", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores / math.sqrt(d), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkms,bksd->bkmd", probs, v)
    out = out.reshape(b, kv_heads, t, group, d)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)


def _attend_cached_blocks(q, k, v, mask, block: int):
    """q [B,K,M,D], k [B,K,D,S], v [B,K,S,D], mask [B,1,M,S] -> [B,K,M,D] in v's dtype: the
    keys in blocks of `block`, one after another, with an online softmax (FlashAttention,
    arXiv 2205.14135, Algorithm 1). Each block's arithmetic has the same shapes whatever S
    is, and a block past every query's keys adds exact zeros (its probabilities underflow to
    0 and the running max stays), so the result of a query that sees at least one key does
    not depend on how many cache slots the call attends (a query that sees none averages
    the whole window; the sampler's rows always see their first token). The sampler's
    batch-invariant mode needs that: a softmax over the whole window rounds differently at
    each window length."""
    d = q.shape[-1]

    def body(carry, j):
        kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=3)
        vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=2)
        visible = jax.lax.dynamic_slice_in_dim(mask, j * block, block, axis=3)
        scores = jnp.einsum("bkmd,bkds->bkms", q, kj, preferred_element_type=jnp.float32)
        scores = jnp.where(visible, scores / math.sqrt(d), jnp.finfo(jnp.float32).min)
        return attention.online_softmax_step(carry, scores, vj, "bkms,bksd->bkmd"), None

    shape = q.shape[:3]
    init = (jnp.full(shape, jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    (_, running_sum, acc), _ = jax.lax.scan(body, init, jnp.arange(k.shape[-1] // block))
    return (acc / running_sum[..., None]).astype(v.dtype)


def attend_rows(q, k, v, lengths, config: ModelConfig):
    """Causal attention over whole rows (no cache). q [B,T,N,D], k and v [B,T,K,D],
    lengths [B] -> [B,T,N,D]; config.attention picks the path for the platform being traced
    for (model/attention.py)."""
    choice = attention.resolve(config.attention, attention.current_platform(), config.dtype)
    return attention.attend(q, k, v, lengths, choice, config.attention_block)


class Attention(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        e, n, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.q_proj = _param(rngs, (e, n, d), ("embed", "heads", "head_dim"), stack)
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), stack)
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), stack)
        self.o_proj = _param(rngs, (n, d, e), ("heads", "head_dim", "embed"), stack)
        if config.attention_bias:
            self.q_bias = _param(rngs, (n, d), ("heads", "head_dim"), stack, "zeros")
            self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), stack, "zeros")
            self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), stack, "zeros")
        if config.qk_norm:
            self.q_norm = _param(rngs, (d,), ("norm",), stack, "ones")
            self.k_norm = _param(rngs, (d,), ("norm",), stack, "ones")

    def __call__(self, x, positions, inv_freq, visible, cache, write_index, key_block=0):
        """x [B,T,E], positions [B,T]; cache {"k","v"} [B,K,S,D] or None. visible: with a
        cache, the [B,T,S] mask of the keys each query sees; without, the rows' lengths [B]
        (query i sees keys j <= i with j < its row's length). key_block: `attend_cached`'s."""
        cfg, dtype = self.config, x.dtype
        b, t, e = x.shape
        n, k_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # Projections as plain 2-D matmuls over [E, heads * D] views of the
        # weights: as 3-D einsums, XLA CPU re-laid o_proj out on every step.
        q = (x @ self.q_proj[...].reshape(e, n * d).astype(dtype)).reshape(b, t, n, d)
        k = (x @ self.k_proj[...].reshape(e, k_heads * d).astype(dtype)).reshape(b, t, k_heads, d)
        v = (x @ self.v_proj[...].reshape(e, k_heads * d).astype(dtype)).reshape(b, t, k_heads, d)
        if cfg.attention_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is None:
            out = attend_rows(q, k, v, visible, cfg)
        else:
            cache = {"k": _write_keys(cache["k"], k, write_index),
                     "v": _write_values(cache["v"], v, write_index)}
            window = cache_window(cache, visible.shape[-1])
            out = attend_cached(q, window["k"], window["v"], visible, key_block)
        out = out.reshape(b, t, n * d)
        return out @ self.o_proj[...].reshape(n * d, e).astype(dtype), cache


def _slots(new, write_index):
    b, t = new.shape[:2]
    slots = write_index[:, None] + jnp.arange(t)[None, :]  # [B, T]
    return jnp.broadcast_to(jnp.arange(b)[:, None], (b, t)), slots


def _write_values(buffer, new, write_index):
    """Writes new [B,T,K,D] into buffer [B,K,S,D] at slots write_index[b] + t (past S: dropped)."""
    rows, slots = _slots(new, write_index)
    # Index arrays around slices: the update's dims are [B, T, K, D].
    return buffer.at[rows, :, slots].set(new.astype(buffer.dtype), mode="drop")


def _write_keys(buffer, new, write_index):
    """Writes new [B,T,K,D] into buffer [B,K,D,S] at slots write_index[b] + t (past S: dropped)."""
    rows, slots = _slots(new, write_index)
    return buffer.at[rows, :, :, slots].set(new.astype(buffer.dtype), mode="drop")


def _slot_axis(path) -> int:
    return CACHE_SLOT_AXIS[path[-1].key]


def cache_slots(cache: Cache) -> int:
    """S: how many token slots the cache holds."""
    keys = cache["k"] if isinstance(cache, dict) else cache[0]["k"]
    return keys.shape[CACHE_SLOT_AXIS["k"]]


def cache_window(cache: Cache, length: int) -> Cache:
    """The first `length` slots of every cache array (a copy)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, c: jax.lax.slice_in_dim(c, 0, length, axis=c.ndim + _slot_axis(path)), cache)


def write_cache_window(cache: Cache, window: Cache) -> Cache:
    """cache with its first slots replaced by window's (in place when cache is donated)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, full, part: jax.lax.dynamic_update_slice_in_dim(
            full, part, 0, axis=full.ndim + _slot_axis(path)), cache, window)


class MLP(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        e, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), stack)
        self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), stack)
        self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), stack)

    def __call__(self, x):
        dtype = x.dtype
        gate = x @ self.gate_proj[...].astype(dtype)
        up = x @ self.up_proj[...].astype(dtype)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dtype)


class Block(nnx.Module):

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.config = config
        e = config.hidden_size
        self.input_norm = _param(rngs, (e,), ("norm",), stack, "ones")
        self.attn = Attention(config, rngs, stack)
        self.post_attention_norm = _param(rngs, (e,), ("norm",), stack, "ones")
        self.mlp = MLP(config, rngs, stack)

    def __call__(self, x, positions, inv_freq, visible, cache, write_index, key_block=0):
        eps = self.config.rms_norm_eps
        h, cache = self.attn(rms_norm(x, self.input_norm[...], eps), positions, inv_freq,
                             visible, cache, write_index, key_block)
        x = x + h
        x = x + self.mlp(rms_norm(x, self.post_attention_norm[...], eps))
        return x, cache


def _run_block(graphdef, state, x, positions, inv_freq, visible, cache, write_index,
               key_block=0):
    return nnx.merge(graphdef, state)(x, positions, inv_freq, visible, cache, write_index,
                                      key_block)


class Decoder(nnx.Module):
    """A causal LM: token ids in, final hidden states or fp32 logits out."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), None)
        if config.scan_layers:
            self.layers = Block(config, rngs, stack=config.num_layers)
        else:
            self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = _param(rngs, (config.hidden_size,), ("norm",), None, "ones")
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), None)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens."""
        cfg = self.config
        dtype = dtype or self.compute_dtype
        stack = (cfg.num_layers,) if cfg.scan_layers else ()

        def layer():
            k_heads, d = cfg.num_kv_heads, cfg.head_dim
            return {"k": jnp.zeros((*stack, batch, k_heads, d, max_len), dtype),
                    "v": jnp.zeros((*stack, batch, k_heads, max_len, d), dtype)}

        return layer() if cfg.scan_layers else tuple(layer() for _ in range(cfg.num_layers))

    def cache_logical_axes(self):
        """The cache's pytree with each leaf replaced by its logical axis names (for sharding)."""
        layer = {"k": ("batch", "kv_heads", "head_dim", "cache_len"),
                 "v": ("batch", "kv_heads", "cache_len", "head_dim")}
        if self.config.scan_layers:
            return {name: ("layers", *axes) for name, axes in layer.items()}
        return tuple(dict(layer) for _ in range(self.config.num_layers))

    def forward_hidden(self, tokens, positions=None, lengths=None, cache: Cache | None = None,
                       write_index=None, attend_len: int | None = None, key_block: int = 0):
        """tokens [B, T] -> (hidden [B, T, E] after the final norm, updated cache).

        Without a cache, row b's tokens sit at positions 0..T-1 and keys past
        `lengths[b]` are masked. With a cache, they sit at `write_index[b] + t`
        and attend every cached key at or before their own position, reading
        only the first `attend_len` slots of the cache; key_block > 0 attends them in blocks
        of that many keys (`attend_cached`; it must divide attend_len).
        """
        cfg = self.config
        b, t = tokens.shape
        if cache is None:
            write_index = jnp.zeros((b,), jnp.int32)
        elif write_index is None:
            raise ValueError("forward_hidden with a cache needs write_index [B]")
        if positions is None:
            positions = write_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if cache is None:
            visible = (jnp.full((b,), t, jnp.int32) if lengths is None
                       else jnp.asarray(lengths, jnp.int32))                      # [B]
        else:
            max_len = cache_slots(cache)
            attend_len = max_len if attend_len is None else min(attend_len, max_len)
            if key_block and attend_len % key_block:
                raise ValueError(f"key_block {key_block} does not divide the {attend_len} "
                                 "cache slots attended")
            visible = jnp.arange(attend_len)[None, None, :] <= positions[:, :, None]  # [B,T,S]
        inv_freq = rope_inv_freq(cfg)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)

        run = jax.checkpoint(_run_block, static_argnums=(0, 8)) if cfg.remat else _run_block
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, layer):
                layer_state, layer_cache = layer
                x, layer_cache = run(graphdef, layer_state, x, positions, inv_freq, visible,
                                     layer_cache, write_index, key_block)
                return x, layer_cache

            x, cache = jax.lax.scan(body, x, (stacked, cache))
        else:
            new_cache = []
            for i, block in enumerate(self.layers):
                graphdef, state = nnx.split(block)
                x, layer_cache = run(graphdef, state, x, positions, inv_freq, visible,
                                     None if cache is None else cache[i], write_index,
                                     key_block)
                new_cache.append(layer_cache)
            cache = None if cache is None else tuple(new_cache)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

    def logits(self, hidden):
        """hidden [..., E] -> fp32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            head = self.embed[...].astype(hidden.dtype).T
        else:
            head = self.lm_head[...].astype(hidden.dtype)
        return jnp.matmul(hidden, head, preferred_element_type=jnp.float32)

    def __call__(self, tokens, lengths=None):
        """tokens [B, T] -> logits [B, T, V] (fp32)."""
        hidden, _ = self.forward_hidden(tokens, lengths=lengths)
        return self.logits(hidden)
