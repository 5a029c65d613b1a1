"""Static model configuration, read from and written back to a HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_CHOICES = ("auto", "dense", "blockwise", "splash", "cudnn")

_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder of the Qwen2/Qwen2.5, Qwen3 or Llama 3 family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2's q/k/v biases.
    qk_norm: bool = False  # Qwen3's per-head RMSNorm on queries and keys.
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # How to run it (not part of the checkpoint).
    dtype: str = "float32"  # Compute dtype; parameters are always fp32.
    scan_layers: bool = False  # Stacked layers under lax.scan, or one module per layer.
    remat: bool = False  # Recompute each layer's activations in the backward pass.
    # Attention over whole rows (training, reference log-probs; model/attention.py):
    # "dense" forms the [T, T] scores; "blockwise" (jnp), "splash" (TPU kernel) and "cudnn"
    # (GPU kernel) never do. "auto": dense on CPU, splash on TPU, cudnn on GPU (blockwise
    # for fp32 there).
    attention: str = "auto"
    attention_block: int = 512  # keys per block of blockwise; splash's tile bound

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unsupported compute dtype {self.dtype!r}; use one of {COMPUTE_DTYPES}"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"unsupported attention {self.attention!r}; use one of {ATTENTION_CHOICES}"
            )
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be >= 1, got {self.attention_block}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count, as transformers counts it (tied embeddings once)."""
        e, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = e * q + 2 * e * kv + q * e
        if self.attention_bias:
            attention += q + 2 * kv
        if self.qk_norm:
            attention += 2 * self.head_dim
        layer = attention + 3 * e * f + 2 * e
        head = 0 if self.tie_word_embeddings else v * e
        return v * e + self.num_layers * layer + e + head

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Builds a config from a HF `config.json` dict; `overrides` set the run fields."""
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
            fields = dict(
                model_type=model_type,
                vocab_size=hf_config["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf_config["intermediate_size"],
                num_layers=hf_config["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf_config.get("num_key_value_heads") or heads,
                head_dim=hf_config.get("head_dim") or hidden // heads,
                rope_theta=float(
                    hf_config.get("rope_theta")
                    or _rope_parameters(hf_config).get("rope_theta", 10000.0)
                ),
                rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
                attention_bias=(
                    True if model_type == "qwen2" else bool(hf_config.get("attention_bias", False))
                ),
                qk_norm=model_type == "qwen3",
                rope_scaling=_parse_rope_scaling(hf_config),
                max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
                bos_token_id=hf_config.get("bos_token_id"),
                eos_token_id=hf_config.get("eos_token_id"),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the required field {e.args[0]!r}") from None
        if hf_config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf_config['hidden_act']!r}; only silu")
        if hf_config.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=true")
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this architecture."""
        hf = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            hf["eos_token_id"] = self.eos_token_id
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return hf


def _rope_parameters(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
    # transformers 4 writes `rope_scaling` (the released checkpoints); 5 writes
    # `rope_parameters`, which also holds rope_theta.
    return hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}


def _parse_rope_scaling(hf_config: Mapping[str, Any]) -> RopeScaling | None:
    scaling = _rope_parameters(hf_config)
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
