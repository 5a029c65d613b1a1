"""Shared set-up for the RL tests: tiny decoders built in one compiled call."""
import jax
import pytest
from flax import nnx

from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder


def _build(**overrides):
    """(graphdef, fp32 params) of a tiny Qwen2-shaped decoder; init runs as one jit, not op by op."""
    fields = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                  attention_bias=True, dtype="float32")
    config = ModelConfig(**{**fields, **overrides})
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.split(Decoder(config, rngs=nnx.Rngs(0)))[1])()
    return graphdef, params


@pytest.fixture(scope="session")
def tiny_model():
    """A function: ModelConfig overrides -> (graphdef, params)."""
    return _build
