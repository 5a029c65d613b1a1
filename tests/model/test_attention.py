"""The attention paths (model/attention.py): blockwise gives the same logits as transformers
and as the dense path, the same gradients, and no [T, T] buffer; the fused kernels'
plumbing (TPU splash in the Pallas interpreter, the cuDNN call run by XLA) gives the dense
path's outputs and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.model import attention, attention_kernels, hf_io, sharding
from tests.model.conftest import max_valid_diff, torch_logits


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_blockwise_logits_match_transformers(hf_models, padded_batch, kind, scan_layers):
    """GQA (4 heads over 2 kv heads), rows of 40, 25 and 7 tokens, blocks of 16 keys (the
    last block padded past every row)."""
    directory, torch_model = hf_models[kind]
    tokens, lengths = padded_batch
    expected = torch_logits(torch_model, tokens, lengths)
    model = hf_io.load_pretrained(directory, scan_layers=scan_layers, attention="blockwise",
                                  attention_block=16)
    got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(lengths)))
    assert max_valid_diff(got, expected, lengths) < 1e-4


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
def test_blockwise_gradients_equal_the_dense_paths(hf_models, padded_batch, scan_layers):
    """Every parameter's gradient of a masked token loss, through the custom backward, against
    XLA's autodiff of the dense softmax: relative 1e-4."""
    directory, _ = hf_models["qwen2"]
    tokens, lengths = map(jnp.asarray, padded_batch)
    valid = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    weights = jax.random.normal(jax.random.key(1), tokens.shape + (64,))

    def gradients(choice):
        model = hf_io.load_pretrained(directory, scan_layers=scan_layers, attention=choice,
                                      attention_block=16)
        graphdef, params = nnx.split(model)

        def loss(p):
            hidden, _ = nnx.merge(graphdef, p).forward_hidden(tokens, lengths=lengths)
            return jnp.sum(jnp.where(valid[..., None], hidden * weights, 0.0))
        return jax.grad(loss)(params)

    dense, blockwise = gradients("dense"), gradients("blockwise")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dense), jax.tree.leaves(blockwise)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), jax.tree_util.keystr(path)


def test_blockwise_attention_keeps_no_t_by_t_buffer():
    """Forward and backward compiled on this CPU at 1,024 and 2,048 tokens: the dense path's
    temporaries hold the [B,K,T,G,T] fp32 scores and grow 4x with T, the blockwise path's
    hold a few [B,K,T,G,block] blocks and grow 2x."""
    def temporaries(choice, t, b=1, k=2, g=2, d=32):
        shapes = [jax.ShapeDtypeStruct((b, k, t, g, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, k, t, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, k, t, d), jnp.float32),
                  jax.ShapeDtypeStruct((b,), jnp.int32)]

        def loss(q, key, v, lengths):
            return attention.causal_attention(q, key, v, lengths, choice, 128).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = 1 * 2 * 2048 * 2 * 2048 * 4   # [B,K,T,G,T] fp32 at 2,048 tokens: 64 MiB
    dense = {t: temporaries("dense", t) for t in (1024, 2048)}
    blockwise = {t: temporaries("blockwise", t) for t in (1024, 2048)}
    assert dense[2048] >= scores and dense[2048] > 3.5 * dense[1024], dense
    assert blockwise[2048] < 2.5 * blockwise[1024], blockwise
    # About five blocks' worth of buffers (scores, probabilities and their gradients):
    # 23.7 MB against the dense path's 201 MB here.
    assert blockwise[2048] < dense[2048] / 6, (dense, blockwise)


def test_auto_follows_the_platform_and_bad_choices_are_named():
    assert attention.resolve("auto", "cpu") == "dense"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "blockwise"  # cuDNN has no fp32
    assert attention.resolve("dense", "tpu") == "dense"
    assert attention.resolve("splash", "cpu") == "splash"  # the Pallas interpreter
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        attention.resolve("flash", "cpu")
    with pytest.raises(ValueError, match="'cudnn' runs on gpu, not on this 'cpu' platform"):
        attention.resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="'splash' runs on tpu or cpu, not on this 'gpu'"):
        attention.resolve("splash", "gpu")
    x = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="'cudnn' takes bfloat16 or float16 .* got float32"):
        attention_kernels.cudnn_attention(x, x, x, None)


def test_empty_rows_and_padded_blocks_match_the_dense_path():
    """Rows of length T, 5, 1 and 0 (a query with no visible key averages the row's values),
    T = 40 in blocks of 16 (the last one padded), every output position in the loss."""
    b, k, t, g, d = 4, 2, 40, 3, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, k, t, g, d))
    key, v = (jax.random.normal(keys[i], (b, k, t, d)) for i in (1, 2))
    weights = jax.random.normal(keys[3], (b, k, t, g, d))
    lengths = jnp.array([t, 5, 1, 0], jnp.int32)

    def run(choice):
        def loss(q, key, v):
            return jnp.sum(attention.causal_attention(q, key, v, lengths, choice, 16) * weights)
        out = attention.causal_attention(q, key, v, lengths, choice, 16)
        return out, jax.grad(loss, argnums=(0, 1, 2))(q, key, v)

    (dense, dense_grads), (blockwise, blockwise_grads) = run("dense"), run("blockwise")
    np.testing.assert_allclose(blockwise, dense, atol=1e-5)
    for a, b_ in zip(dense_grads, blockwise_grads):
        np.testing.assert_allclose(b_, a, atol=1e-5 * float(np.abs(a).max()))


_XLA_DOT_PRODUCT = functools.partial(attention_kernels.cudnn_attention, implementation="xla")
# The fused kernels' calls, each as it runs on this CPU: splash in the Pallas interpreter,
# cuDNN's jax.nn.dot_product_attention call with XLA's implementation.
KERNELS = {
    "splash": lambda q, k, v, lengths: attention_kernels.splash_attention(
        q, k, v, lengths, block=512, interpret=True),
    "cudnn_call": lambda q, k, v, lengths: _XLA_DOT_PRODUCT(q, k, v, lengths),
}


def _outputs_and_gradients(fn, q, k, v, lengths, weights):
    """fn's outputs, and its gradients wrt q, k, v of a weighted sum over the valid positions."""
    valid = (jnp.arange(q.shape[1])[None] < lengths[:, None])[..., None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.where(valid, fn(q, k, v, lengths) * weights, 0.0))
    return jax.jit(fn)(q, k, v, lengths), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.fixture(scope="module")
def gqa_batch():
    """GQA (4 query heads over 2 kv heads), T = 200, rows of length 200, 73, 3 and 0, and the
    dense path's outputs and gradients on it."""
    b, t, n, kv, d = 4, 200, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = (jax.random.normal(keys[0], (b, t, n, d)),
              *(jax.random.normal(keys[i], (b, t, kv, d)) for i in (1, 2)),
              jnp.array([t, 73, 3, 0], jnp.int32), jax.random.normal(keys[3], (b, t, n, d)))
    dense = _outputs_and_gradients(
        lambda q, k, v, lengths: attention.attend(q, k, v, lengths, "dense", 512), *inputs)
    return inputs, dense


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_fused_kernels_give_the_dense_paths_outputs_and_gradients(gqa_batch, kernel):
    """On gqa_batch (splash pads T = 200 to 256 and tiles it by 256): outputs at every
    position of the rows of length >= 1 within 1e-5 (padded positions included: both attend
    the row's valid keys); the row of length 0 is attended as of length 1 (each query gets
    key 0's value). Gradients wrt q, k and v of a loss over the valid positions: relative
    1e-4."""
    inputs, (expected, expected_grads) = gqa_batch
    got, got_grads = _outputs_and_gradients(KERNELS[kernel], *inputs)
    v, t, group = inputs[2], got.shape[1], got.shape[2] // inputs[2].shape[2]
    np.testing.assert_allclose(got[:3], expected[:3], atol=1e-5)
    np.testing.assert_allclose(got[3], jnp.repeat(v[3, :1], group, axis=1).repeat(t, 0),
                               atol=1e-6)
    for name, a, b in zip("qkv", expected_grads, got_grads):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(a).max(), name


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("choice", ["splash", "cudnn"])
def test_fused_kernels_in_the_decoder_give_the_dense_logits(hf_models, padded_batch, monkeypatch,
                                                            choice, scan_layers):
    """Qwen2's tiny model (GQA, 4 heads over 2 kv heads, rows of 40, 25 and 7 tokens) with
    model.attention set to the kernel, both layer layouts: the valid positions' logits
    within 1e-4 of the dense path's. cudnn runs as on a GPU but with XLA's implementation."""
    if choice == "cudnn":
        monkeypatch.setattr(attention, "current_platform", lambda: "gpu")
        monkeypatch.setattr(attention_kernels, "cudnn_attention", _XLA_DOT_PRODUCT)
    directory, _ = hf_models["qwen2"]
    tokens, lengths = map(jnp.asarray, padded_batch)

    def logits(name):
        model = hf_io.load_pretrained(directory, scan_layers=scan_layers, attention=name,
                                      attention_block=128)
        graphdef, params = nnx.split(model)
        return np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, lengths))(params))

    assert max_valid_diff(logits(choice), logits("dense"), np.asarray(lengths)) < 1e-4


@pytest.mark.parametrize("tensor", [2, 4], ids=["kv_heads_split", "kv_heads_repeated"])
def test_splash_under_a_mesh_runs_per_shard_with_the_same_outputs(tensor):
    """Under an fsdp 2 x tensor mesh (jax.set_mesh, as the sharded train step traces) splash
    runs in a shard_map over rows (fsdp) and query heads (tensor): 4 query heads over 2 kv
    heads split 2 ways as they are, and 4 ways with each kv head repeated twice (Llama's 8
    over 16), each shard then holding one query head, not all 4. The same outputs as on one
    device; over 4 ways, the same gradients too (the repeat's backward sums the copies)."""
    b, t, n, kv, d = 4, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (b, t, n, d))
    k, v = (jax.random.normal(keys[i], (b, t, kv, d)) for i in (1, 2))
    weights = jax.random.normal(keys[3], (b, t, n, d))
    lengths = jnp.array([128, 50, 9, 1], jnp.int32)
    splash = KERNELS["splash"]
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": tensor}, devices=jax.devices()[:2 * tensor])
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, "tensor"))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    args = [jax.device_put(q, heads)] + [jax.device_put(x, heads if kv % tensor == 0 else rows)
                                         for x in (k, v)] + [jax.device_put(lengths, rows)]
    with jax.set_mesh(mesh):
        lowered = jax.jit(splash).lower(*args)
    text = lowered.as_text()
    assert "manual_computation" in text  # the shard_map
    # One shard's q, heads first and scaled: [rows / 2, heads / tensor, T, D].
    assert f"tensor<{b // 2}x{n // tensor}x{t}x{d}xf32>" in text
    np.testing.assert_allclose(lowered.compile()(*args), jax.jit(splash)(q, k, v, lengths),
                               atol=1e-6)
    if tensor == 4:
        expected = _outputs_and_gradients(splash, q, k, v, lengths, weights)[1]
        with jax.set_mesh(mesh):
            _, got = _outputs_and_gradients(splash, *args, weights)
        for name, a, b_ in zip("qkv", expected, got):
            np.testing.assert_allclose(b_, a, atol=1e-6 * float(np.abs(a).max()), err_msg=name)


def test_cached_attention_in_key_blocks_matches_numpy_and_ignores_the_window():
    """decoder.attend_cached with key_block (the sampler's batch-invariant mode): 4 query heads
    over 2 kv heads, 3 rows whose 2 queries see up to 5, 70 and 128 cached keys, against
    numpy's softmax attention; and the same rows attended through a 128- and a 256-slot
    window, in blocks of 64 keys, give the same bits."""
    from searcher_jax.model.decoder import attend_cached
    rng = np.random.default_rng(0)
    b, t, n, kv, d, s = 3, 2, 4, 2, 16, 256
    q = rng.standard_normal((b, t, n, d)).astype(np.float32)
    k = rng.standard_normal((b, kv, d, s)).astype(np.float32)
    v = rng.standard_normal((b, kv, s, d)).astype(np.float32)
    positions = np.array([5, 70, 128])[:, None] - t + np.arange(t)  # [b, t]
    mask = np.arange(s)[None, None, :] <= positions[:, :, None]  # [b, t, s]
    expected = np.zeros((b, t, n, d))
    for row, i, head in np.ndindex(b, t, n):
        keys = np.flatnonzero(mask[row, i])
        scores = q[row, i, head] @ k[row, head // (n // kv)][:, keys] / np.sqrt(d)
        probs = np.exp(scores - scores.max())
        expected[row, i, head] = probs / probs.sum() @ v[row, head // (n // kv)][keys]
    narrow = np.asarray(attend_cached(q, k[..., :128], v[:, :, :128], mask[..., :128], 64))
    np.testing.assert_allclose(narrow, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(attend_cached(q, k, v, mask, 64)), narrow)
    # The whole-window path agrees to rounding (it is the default sampler's).
    np.testing.assert_allclose(np.asarray(attend_cached(q, k, v, mask)), expected, atol=1e-5)
