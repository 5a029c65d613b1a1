"""Sampler benchmark: our sampler against transformers `generate`, Tunix, and a matmul floor.

Same random weights for all (a Qwen2-shaped model written once as safetensors):
  - generation: batch B, P-token prompts, N greedy new tokens, tokens/s;
  - a rollout of R rounds: segments of N tokens with D document tokens appended
    after each, ours resuming from the cache against transformers re-encoding
    the whole text every round (as the authors' vLLM loop did).
The floor is the same model's matmuls alone in a jitted loop (no attention,
no cache): what reading the weights once per token costs on this machine.

Run: python -m launch.bench_sampler  (or launch/benchmark.py --suite=sampler).
Tunix needs the `bench` extra (google-tunix); without it its row is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from bench_common import best_seconds  # pylint: disable=wrong-import-position


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="document insertions in the rollout")
    p.add_argument("--doc_tokens", type=int, default=300)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best kept)")
    p.add_argument("--skip", default="", help="comma list of: transformers,tunix,floor,rollout,scan")
    return p


def _write_checkpoint(args, directory: str):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6)
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


# --- Peers ------------------------------------------------------------------------------------

def _transformers_generate(hf_model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    import torch  # pylint: disable=import-outside-toplevel
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(prompts, dtype=torch.long),
                                attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompts.shape[1]:].numpy()


class _IdTokenizer:
    """Tunix takes text; this 'tokenizer' reads and writes space-separated ids."""

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return -1

    def pad_id(self):
        return 0


def _tunix_sampler(args, directory: str, cache_size: int):
    from tunix.generate import sampler as tunix_sampler  # pylint: disable=import-outside-toplevel
    from tunix.models.qwen2 import model as tunix_model  # pylint: disable=import-outside-toplevel
    from tunix.models.qwen2 import params as tunix_params  # pylint: disable=import-outside-toplevel
    config = tunix_model.ModelConfig(
        num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.hidden,
        hidden_dim=args.mlp, num_heads=args.heads, head_dim=args.hidden // args.heads,
        num_kv_heads=args.kv_heads, rope_theta=10000, norm_eps=1e-6, use_tied_embedding=True)
    transformer = tunix_params.create_model_from_safe_tensors(directory, config)
    cache = tunix_sampler.CacheConfig(cache_size=cache_size, num_layers=args.layers,
                                      num_kv_heads=args.kv_heads,
                                      head_dim=args.hidden // args.heads)
    return tunix_sampler.Sampler(transformer, _IdTokenizer(), cache)


def _matmul_floor(model, batch: int, steps: int):
    """A jitted loop of the model's matmuls and logits only: the weights read once per token."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    cfg = model.config
    e = cfg.hidden_size
    layers = []
    for block in model.layers:
        a, m = block.attn, block.mlp
        layers.append({
            "qkv": jnp.concatenate([a.q_proj[...].reshape(e, -1), a.k_proj[...].reshape(e, -1),
                                    a.v_proj[...].reshape(e, -1)], axis=1),
            "o": a.o_proj[...].reshape(-1, e),
            "gate_up": jnp.concatenate([m.gate_proj[...], m.up_proj[...]], axis=1),
            "down": m.down_proj[...]})
    embed = nnx.state(model)["embed"][...]
    q_width = cfg.num_heads * cfg.head_dim

    @jax.jit
    def loop(embed, layers, token):
        def step(_, token):
            x = embed[token]  # [B, E]
            for w in layers:
                qkv = x @ w["qkv"]
                x = x + qkv[:, :q_width] @ w["o"]
                gate, up = jnp.split(x @ w["gate_up"], 2, axis=1)
                x = x + (jax.nn.silu(gate) * up) @ w["down"]
            return jnp.argmax(x @ embed.T, axis=-1)
        return jax.lax.fori_loop(0, steps, step, token)

    token = jnp.zeros((batch,), jnp.int32)
    return lambda: loop(embed, layers, token).block_until_ready()


# --- Ours -------------------------------------------------------------------------------------

def _our_sampler(directory: str, args, scan_layers: bool, max_len: int,
                 copy_scan_layers: bool | None = None):
    from searcher_jax.model import hf_io  # pylint: disable=import-outside-toplevel
    from searcher_jax.sampling import sampler as sampling  # pylint: disable=import-outside-toplevel
    from searcher_jax.sampling import select  # pylint: disable=import-outside-toplevel
    model = hf_io.load_pretrained(directory, dtype="float32", scan_layers=scan_layers)
    config = sampling.SamplerConfig(max_len=max_len, segment_len=args.new_tokens,
                                    select=select.SelectConfig(greedy=True))
    copy = sampling.sampling_copy(model, scan_layers=copy_scan_layers)
    return model, sampling.Sampler(copy, config)


def _our_generate(smp, prompts: np.ndarray):
    state = smp.init(prompts.shape[0], [-1], jax.random.key(0))
    state = smp.extend(state, list(prompts))
    state, segment = smp.decode(state)
    new = smp.new_tokens(state, segment, range(prompts.shape[0]))
    return np.stack([new[b][0] for b in range(prompts.shape[0])])


def _our_rollout(smp, prompts: np.ndarray, docs: list[np.ndarray]):
    batch = prompts.shape[0]
    state = smp.init(batch, [-1], jax.random.key(0))
    state = smp.extend(state, list(prompts))
    out = []
    for round_docs in [None, *docs]:
        if round_docs is not None:
            state = smp.extend(state, list(round_docs))
        state, segment = smp.decode(state)
        new = smp.new_tokens(state, segment, range(batch))
        out.append(np.stack([new[b][0] for b in range(batch)]))
    return out


def _transformers_rollout(hf_model, prompts: np.ndarray, docs: list[np.ndarray], new_tokens: int):
    text, out = prompts, []
    for round_docs in [None, *docs]:
        if round_docs is not None:
            text = np.concatenate([text, round_docs], axis=1)
        new = _transformers_generate(hf_model, text, new_tokens)
        out.append(new)
        text = np.concatenate([text, new], axis=1)
    return out


def run(args) -> dict:
    """Runs the suite; returns the measured numbers (also printed as lines)."""
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    rng = np.random.RandomState(0)
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    prompts = rng.randint(1, args.vocab, (b, p)).astype(np.int32)
    docs = [rng.randint(1, args.vocab, (b, args.doc_tokens)).astype(np.int32)
            for _ in range(args.rounds)]
    tokens = b * n
    results: dict = {"load_average_start": os.getloadavg()[0], "shape": {k: getattr(args, k) for k in (
        "batch", "prompt_len", "new_tokens", "rounds", "doc_tokens", "hidden", "layers", "heads",
        "kv_heads", "mlp", "vocab", "threads")}, "device": str(jax.devices()[0])}

    def report(name, seconds, count=tokens):
        results[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(count / seconds, 1)}
        print(f"{name:<34} {count / seconds:9.1f} tokens/s  ({seconds:.2f} s)", flush=True)

    with tempfile.TemporaryDirectory() as directory:
        hf_model = _write_checkpoint(args, directory)
        results["params"] = sum(x.numel() for x in hf_model.parameters())
        print(f"model: {results['params'] / 1e6:.1f}M params, batch {b}, prompt {p}, "
              f"{n} new tokens, greedy, fp32", flush=True)

        gen_len = p + n
        # (row, trained with stacked layers, the sampling copy's layout: None = the same)
        layouts = [("ours_per_layer", False, None)]
        if "scan" not in skip:
            layouts += [("ours_scan", True, None), ("ours_scan_trained_per_layer_copy", True, False)]
        ours_tokens = per_layer_model = None
        for name, scan, copy_scan in layouts:
            model, smp = _our_sampler(directory, args, scan, max_len=gen_len,
                                      copy_scan_layers=copy_scan)
            per_layer_model = per_layer_model or (None if scan else model)
            ours_tokens = _our_generate(smp, prompts)  # compiles
            report(name, best_seconds(lambda: _our_generate(smp, prompts), args.repeats))
            results[name]["compiled"] = smp.num_compiled
        if "floor" not in skip:
            floor = _matmul_floor(per_layer_model, b, n)
            floor()
            report("matmul_floor", best_seconds(floor, args.repeats))
        if "transformers" not in skip:
            hf_tokens = _transformers_generate(hf_model, prompts, 4)  # warm-up
            report("transformers", best_seconds(
                lambda: _transformers_generate(hf_model, prompts, n), args.repeats))
            hf_tokens = _transformers_generate(hf_model, prompts, n)
            results["greedy_tokens_equal_transformers"] = float(np.mean(hf_tokens == ours_tokens))
        if "tunix" not in skip:
            try:
                tunix = _tunix_sampler(args, directory, cache_size=2 * gen_len)
            except ImportError as e:
                print(f"tunix: skipped ({e}); install the bench extra (google-tunix)")
            else:
                texts = [" ".join(map(str, row)) for row in prompts]

                def tunix_generate():
                    return tunix(texts, max_generation_steps=n, max_prompt_length=p,
                                 temperature=0.0, eos_tokens=[-1])

                tunix_generate()
                report("tunix", best_seconds(tunix_generate, args.repeats))

        if "rollout" not in skip:
            rollout_len = p + (args.rounds + 1) * n + args.rounds * args.doc_tokens
            _, smp = _our_sampler(directory, args, False, max_len=rollout_len)
            ours = _our_rollout(smp, prompts, docs)  # compiles
            rollout_tokens = b * n * (args.rounds + 1)
            report("rollout_ours_resume", best_seconds(
                lambda: _our_rollout(smp, prompts, docs), args.repeats), rollout_tokens)
            results["rollout_ours_resume"]["compiled"] = smp.num_compiled
            if "transformers" not in skip:
                start = time.perf_counter()
                theirs = _transformers_rollout(hf_model, prompts, docs, n)
                report("rollout_transformers_reencode", time.perf_counter() - start,
                       rollout_tokens)
                results["rollout_greedy_tokens_equal"] = float(np.mean(
                    np.concatenate(theirs, 1) == np.concatenate(ours, 1)))

    def ratio(a, b_name):
        if a in results and b_name in results:
            return results[a]["tokens_per_s"] / results[b_name]["tokens_per_s"]
        return None

    best = max((k for k in ("ours_per_layer", "ours_scan") if k in results),
               key=lambda k: results[k]["tokens_per_s"])
    summary = {
        f"{best} vs transformers": ratio(best, "transformers"),
        f"{best} vs tunix": ratio(best, "tunix"),
        f"{best} fraction of floor": ratio(best, "matmul_floor"),
        "rollout resume vs re-encode": ratio("rollout_ours_resume",
                                             "rollout_transformers_reencode"),
    }
    results["load_average_end"] = os.getloadavg()[0]
    print(f"1-minute load average: {results['load_average_start']:.1f} at the start, "
          f"{results['load_average_end']:.1f} at the end (this machine has {os.cpu_count()} cores; "
          "other jobs running make the numbers noisy)")
    results["summary"] = {k: round(v, 2) for k, v in summary.items() if v is not None}
    for k, v in results["summary"].items():
        unit = "" if "fraction" in k else "x"
        print(f"{k:<40} {v:.2f}{unit}")
    for k in ("greedy_tokens_equal_transformers", "rollout_greedy_tokens_equal"):
        if k in results:
            print(f"{k:<40} {results[k]:.3f}")
    return results


def main():
    results = run(parser().parse_args())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
