"""The BERT encoder (bge, e5, MiniLM) in Flax NNX, with weights read from HF safetensors."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    dtype: str = "float32"  # compute dtype; params stay float32

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32") -> "BertConfig":
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={hf.get('model_type')!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act 'gelu' is supported, got {hf.get('hidden_act')!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf["max_position_embeddings"],
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), dtype=dtype)


class BertLayer(nnx.Module):

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h, f, dt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(h, h, dtype=dt, rngs=rngs)
        self.key = nnx.Linear(h, h, dtype=dt, rngs=rngs)
        self.value = nnx.Linear(h, h, dtype=dt, rngs=rngs)
        self.attention_out = nnx.Linear(h, h, dtype=dt, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
        self.intermediate = nnx.Linear(h, f, dtype=dt, rngs=rngs)
        self.output = nnx.Linear(f, h, dtype=dt, rngs=rngs)
        self.output_norm = nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        # x [B, T, H]; bias [B, 1, 1, T] (0 for tokens, a large negative number for padding)
        b, t, h = x.shape
        # Heads move ahead of tokens before the two attention contractions: on XLA CPU the
        # [B, N, T, D] layout ran attention ~3x faster than contracting over [B, T, N, D].
        heads = lambda y: y.reshape(b, t, self.num_heads, h // self.num_heads).transpose(0, 2, 1, 3)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))  # [B, N, T, D]
        scores = jnp.einsum("bntd,bnsd->bnts", q, k) / np.sqrt(h // self.num_heads)
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(x.dtype)
        attended = jnp.einsum("bnts,bnsd->bntd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, h)
        x = self.attention_norm(x + self.attention_out(attended))
        # BERT's "gelu" is the exact (erf) form.
        return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class BertModel(nnx.Module):
    """Token ids -> last hidden states (no pooler: the retrievers pool themselves)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.embeddings_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        # tokens, mask [B, T] (mask 1 on real tokens) -> hidden [B, T, H]
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = (self.word_embeddings(tokens) + self.position_embeddings(positions)
             + self.token_type_embeddings(jnp.zeros_like(tokens)))
        x = self.embeddings_norm(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _hf_names(cfg: BertConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path -> (HF tensor name, transpose?)."""
    names = {
        ("word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", False),
        ("position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", False),
        ("token_type_embeddings", "embedding"): ("embeddings.token_type_embeddings.weight", False),
        ("embeddings_norm", "scale"): ("embeddings.LayerNorm.weight", False),
        ("embeddings_norm", "bias"): ("embeddings.LayerNorm.bias", False),
    }
    per_layer = {
        "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
        "attention_out": "attention.output.dense", "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    norms = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(cfg.num_layers):
        for ours, theirs in per_layer.items():
            names[("layers", i, ours, "kernel")] = (f"encoder.layer.{i}.{theirs}.weight", True)
            names[("layers", i, ours, "bias")] = (f"encoder.layer.{i}.{theirs}.bias", False)
        for ours, theirs in norms.items():
            names[("layers", i, ours, "scale")] = (f"encoder.layer.{i}.{theirs}.weight", False)
            names[("layers", i, ours, "bias")] = (f"encoder.layer.{i}.{theirs}.bias", False)
    return names


def load_bert(directory: str | pathlib.Path, dtype: str = "float32") -> BertModel:
    """Builds a BertModel from an HF directory (config.json + model.safetensors)."""
    directory = pathlib.Path(directory)
    cfg = BertConfig.from_hf(json.loads((directory / "config.json").read_text()), dtype=dtype)
    weights_path = directory / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (only safetensors weights are read)")
    weights = load_file(str(weights_path))
    # Checkpoints saved from BertForX carry a "bert." prefix.
    weights = {name.removeprefix("bert."): w for name, w in weights.items()}
    model = nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, (name, transpose) in _hf_names(cfg).items():
        if name not in weights:
            raise KeyError(f"{weights_path}: tensor {name!r} missing")
        w = weights[name].T if transpose else weights[name]
        expected = tuple(flat[path].get_value().shape)
        if tuple(w.shape) != expected:
            raise ValueError(f"{weights_path}: {name} has shape {w.shape}, expected {expected}")
        flat[path].set_value(jnp.asarray(w, jnp.float32))
    return model
