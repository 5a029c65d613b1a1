"""Smoke check of the model stack on this machine: build, export, re-import, compare.

A stand-in main job until the embedded demo lands: it builds a tiny random
Qwen2-shaped decoder, writes it as a HF checkpoint, streams it back in both
layer layouts, and checks that the logits agree.
"""
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from searcher_jax.model import hf_io
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder


def main():
    config = ModelConfig("qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         attention_bias=True, tie_word_embeddings=True)
    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 16)), jnp.int32)
    logits = np.asarray(model(tokens))
    with tempfile.TemporaryDirectory() as directory:
        hf_io.save_pretrained(model, directory)
        for scan_layers in (False, True):
            again = hf_io.load_pretrained(directory, scan_layers=scan_layers)
            diff = float(np.abs(np.asarray(again(tokens)) - logits).max())
            print(f"scan_layers={scan_layers}: {config.num_params:,} params, "
                  f"max |logit diff| after HF round trip {diff:.2e}")
            assert diff < 1e-5


if __name__ == "__main__":
    main()
