"""Memory plans of the released stage-2 RL steps on TPU pod slices, compiled without a TPU.

    python launch/bench_memory_plan.py                       # every preset below
    python launch/bench_memory_plan.py --preset=qwen2.5-7b_v5p-32 --seq_len=2048

Each preset compiles the real train step, the reference forward (KL > 0) and
the sampler's own programs (a whole decode segment, and the longest extend) for
the slice (needs libtpu: pip install "jax[tpu]==<jax version>")
and prints bytes per device against the chip's HBM. Sequence length 4096
(prompt + response with its document blocks) is an assumption, not a
released number; override it with --seq_len.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from searcher_jax.model.config import ModelConfig
from searcher_jax.rl import memory_plan
from searcher_jax.rl.config import RLConfig

REFERENCE_CONFIGS = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "hf_configs"

# Released stage-2 recipes (SPEC section 4): Qwen 64 prompts x 16, train batch 256, KL 0;
# Llama 65 x 16, train batch 260, KL 1e-4. Both reinforce_baseline.
RECIPES = {
    "qwen2.5-7b": dict(hf_dir="Qwen2.5-7B", rows=64 * 16, mini=256, kl_coef=0.0),
    "llama-3.1-8b": dict(hf_dir="Llama-3.1-8B-Instruct", rows=65 * 16, mini=260, kl_coef=1e-4),
}
# preset -> (recipe, topology, mesh, micro-batch rows, sampler rows). The sampler rows are
# the run's rollout.sampler_rows: the rollout decodes the step's rows in groups of that many,
# which must divide them (1,024 = 64 x 16 for Qwen, 1,040 = 65 x 16 for Llama) and the fsdp
# axis. Llama on v5e-64 holds its KV cache whole on every tensor shard (8 KV heads over 16):
# 64 rows ran out of HBM, 40 fit.
PRESETS = {
    "qwen2.5-7b_v5p-32": ("qwen2.5-7b", "v5p:2x4x4", {"fsdp": 8, "tensor": 4}, 16, 512),
    "qwen2.5-7b_v5e-64": ("qwen2.5-7b", "v5e:8x8", {"fsdp": 16, "tensor": 4}, 16, 256),
    "llama-3.1-8b_v5p-32": ("llama-3.1-8b", "v5p:2x4x4", {"fsdp": 4, "tensor": 8}, 20, 260),
    "llama-3.1-8b_v5e-64": ("llama-3.1-8b", "v5e:8x8", {"fsdp": 4, "tensor": 16}, 20, 40),
}


def plan_spec(preset: str, seq_len: int, config_dir: pathlib.Path,
              compile_effort: float | None = None) -> memory_plan.PlanSpec:
    recipe_name, topology, mesh_shape, micro, sample_rows = PRESETS[preset]
    recipe = RECIPES[recipe_name]
    hf_config = json.loads((config_dir / recipe["hf_dir"] / "config.json").read_text())
    model = ModelConfig.from_hf(hf_config, dtype="bfloat16", scan_layers=True, remat=True)
    rl = RLConfig(estimator="reinforce_baseline", samples_per_prompt=16,
                  kl_coef=recipe["kl_coef"], mini_batch_size=recipe["mini"],
                  micro_batch_size=micro, logprob_chunk=512)
    return memory_plan.PlanSpec(model=model, rl=rl, topology=topology, mesh_shape=mesh_shape,
                                train_rows=recipe["rows"], train_len=seq_len,
                                sample_rows=sample_rows, sample_len=seq_len,
                                compile_effort=compile_effort)


def run(args) -> dict:
    """Plans for args.preset (a name or "all"); returns {preset: plan dict with compile_s}."""
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    results = {}
    for preset in presets:
        spec = plan_spec(preset, args.seq_len, pathlib.Path(args.config_dir), args.compile_effort)
        start = time.perf_counter()
        plan = memory_plan.memory_plan(spec)
        plan["compile_s"] = time.perf_counter() - start
        plan["spec"] = {"preset": preset, "train_rows": spec.train_rows,
                        "seq_len": spec.train_len, "mini_batch_size": spec.rl.mini_batch_size,
                        "micro_batch_size": spec.rl.micro_batch_size,
                        "sample_rows": spec.sample_rows, "kl_coef": spec.rl.kl_coef,
                        "compile_effort": spec.compile_effort}
        print(memory_plan.format_plan(plan))
        print(f"  ({plan['compile_s']:.0f} s to compile)", flush=True)
        results[preset] = plan
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="all", choices=["all", *PRESETS])
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--config_dir", default=str(REFERENCE_CONFIGS),
                        help="directory of HF config.json folders (Qwen2.5-7B, Llama-3.1-8B-Instruct)")
    parser.add_argument("--compile_effort", type=float, default=None,
                        help="XLA exec_time_optimization_effort; default: XLA's (the real numbers)")
    parser.add_argument("--json_out", default=None, help="write the plans here as JSON")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
