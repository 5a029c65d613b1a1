"""The blockwise attention path (model/attention.py): the same logits as transformers and as
the dense path, the same gradients, and no [T, T] buffer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.model import attention, hf_io
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


def test_auto_is_dense_on_cpu_only_and_bad_choices_are_named():
    assert attention.resolve("auto", "cpu") == "dense"
    assert attention.resolve("auto", "tpu") == "blockwise" == attention.resolve("auto", "gpu")
    assert attention.resolve("dense", "tpu") == "dense"
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        attention.resolve("flash", "cpu")


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
