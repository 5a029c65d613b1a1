"""Forward-pass speed of the two layer layouts on this machine (CPU or accelerator).

Runs the sampler benchmark's model shape (Qwen2-shaped, ~48M parameters:
hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 32000) over a [16, 128] batch
and reports tokens/s for stacked-under-scan and one-module-per-layer, plus the
matmul floor (2 * params * tokens FLOPs over the measured peak of one big matmul).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder

BENCH_CONFIG = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=2048,
                    num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, attention_bias=True,
                    tie_word_embeddings=True)


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def _matmul_flops_per_s(repeats: int) -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    seconds = _time(jax.jit(lambda x: x @ x), a, repeats=repeats)
    return 2 * 2048**3 / seconds


def run(args) -> dict:
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 32000, (args.batch, args.seq)),
                         jnp.int32)
    results = {}
    for scan_layers in (False, True):
        config = ModelConfig(**BENCH_CONFIG, dtype=args.dtype, scan_layers=scan_layers)
        model = Decoder(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        seconds = _time(forward, state, tokens, repeats=args.repeats)
        results["scan" if scan_layers else "per_layer"] = args.batch * args.seq / seconds
    params = ModelConfig(**BENCH_CONFIG).num_params
    floor = _matmul_flops_per_s(args.repeats) / (2 * params)
    for name, tokens_per_s in results.items():
        print(f"forward {name:9s}: {tokens_per_s:9.0f} tokens/s  "
              f"({tokens_per_s / floor:.0%} of the matmul floor {floor:.0f} tokens/s)")
    print(f"per_layer / scan: {results['per_layer'] / results['scan']:.2f}x")
    return {**results, "floor_tokens_per_s": floor, "params": params}


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_args(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
