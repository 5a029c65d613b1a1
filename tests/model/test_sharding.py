"""Sharded over 8 CPU devices: the same logits and gradients as one device."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from searcher_jax.model import sharding
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder

CONFIG = ModelConfig("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=8, num_kv_heads=4, head_dim=16, attention_bias=True,
                     tie_word_embeddings=True)


def _loss(model, tokens):
    logits = model(tokens)[:, :-1]
    targets = tokens[:, 1:]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


@nnx.jit
def _logits_and_grads(model, tokens):
    return model(tokens), nnx.grad(_loss)(model, tokens)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(1).randint(0, 128, (8, 24)), jnp.int32)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4}, {"data": 8}],
                         ids=["fsdp2_tensor4", "data8"])
def test_sharded_logits_and_grads_equal_unsharded(tokens, mesh_shape, scan_layers):
    assert jax.device_count() == 8, "conftest sets 8 host devices"
    config = ModelConfig(**{**CONFIG.__dict__, "scan_layers": scan_layers})
    model = Decoder(config, rngs=nnx.Rngs(3))
    logits, grads = _logits_and_grads(model, tokens)

    mesh = sharding.make_mesh(mesh_shape)
    sharded_model = sharding.shard_model(Decoder(config, rngs=nnx.Rngs(3)), mesh)
    sharded_tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
    sharded_logits, sharded_grads = _logits_and_grads(sharded_model, sharded_tokens)

    q_proj = sharded_model.layers.attn.q_proj if scan_layers else sharded_model.layers[0].attn.q_proj
    if "tensor" in mesh_shape:
        assert "tensor" in q_proj[...].sharding.spec and "fsdp" in q_proj[...].sharding.spec
        assert len(q_proj[...].addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(logits), atol=1e-5)
    for path, g in nnx.to_flat_state(nnx.state(grads)):
        g_sharded = dict(nnx.to_flat_state(nnx.state(sharded_grads)))[path]
        g, g_sharded = np.asarray(g[...]), np.asarray(g_sharded[...])
        assert np.linalg.norm(g_sharded - g) <= 1e-5 * np.linalg.norm(g) + 1e-12, path


def test_indivisible_heads_fall_back_with_a_warning(reference_dir, caplog):
    """Qwen2.5-7B: 28 query heads and 4 KV heads do not split over tensor=8."""
    from searcher_jax.model import hf_io
    config = hf_io.load_config(reference_dir / "hf_configs" / "Qwen2.5-7B", scan_layers=True)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh({"tensor": 8})
    with caplog.at_level(logging.WARNING):
        shardings = sharding.state_shardings(nnx.state(abstract), mesh)
    assert shardings["layers"]["attn"]["q_proj"].spec == P(None, None, None, None)
    assert shardings["layers"]["mlp"]["gate_proj"].spec == P(None, None, "tensor")  # 18944 / 8
    assert "layers/attn/q_proj: dimension 'heads' of size 28 does not split" in caplog.text
    assert "sizes that divide it: [1, 2, 4]" in caplog.text


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices, have 8"):
        sharding.make_mesh({"data": 3, "tensor": 4})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.make_mesh({"data": -1, "tensor": 3})
