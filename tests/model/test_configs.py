"""Every real HF config builds a weightless model with transformers' parameter count."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from searcher_jax.model import hf_io
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder

PUBLISHED = {
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen3-0.6B": 596_049_920,
    "Qwen3-8B": 8_190_735_360,
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-8B-Instruct": 8_030_261_248,
}


def _transformers_count(directory) -> int:
    import torch
    import transformers
    config = transformers.AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_abstract_model_parameter_count(reference_dir, name):
    directory = reference_dir / "hf_configs" / name
    config = hf_io.load_config(directory, scan_layers=True)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == PUBLISHED[name] == config.num_params
    assert count == _transformers_count(directory)


def test_llama31_rope_scaling_is_parsed(reference_dir):
    config = hf_io.load_config(reference_dir / "hf_configs" / "Llama-3.1-8B")
    assert config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 8192
    assert config.rope_theta == 500000.0 and not config.tie_word_embeddings


def test_config_round_trips_through_hf_dict(reference_dir):
    for name in PUBLISHED:
        hf = json.loads((reference_dir / "hf_configs" / name / "config.json").read_text())
        config = ModelConfig.from_hf(hf)
        assert ModelConfig.from_hf(config.to_hf()) == config


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="lacks the required field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8})
    with pytest.raises(ValueError, match="unsupported compute dtype 'float16'"):
        ModelConfig("llama", 8, 8, 8, 1, 2, 1, 4, dtype="float16")
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        ModelConfig("llama", 8, 8, 8, 1, 3, 2, 4)
