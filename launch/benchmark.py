"""Benchmarks, each side by side with its peer in the same run; ratios, not timed tests.

    python launch/benchmark.py --suite=model        # forward speed of both layer layouts
    python launch/benchmark.py --suite=sampler      # vs transformers generate and Tunix
    python launch/benchmark.py --suite=train        # one RL update vs PyTorch, and its MFU
    python launch/benchmark.py --suite=retrieval    # ScaNN vs faiss (flat and HNSW)
    python launch/benchmark.py --suite=encoder      # MiniLM passage encoding vs transformers
    python launch/benchmark.py --suite=memory_plan  # TPU bytes per device, compiled here
    python launch/benchmark.py --suite=rl_step      # one RL step of the demo, part by part
    python launch/benchmark.py --suite=rollout      # barrier vs continuous rollout schedules

Suite-specific flags follow the suite name: `--suite=sampler -- --batch=16`.
"""
import argparse
import importlib
import pathlib
import sys

SUITES = {
    "model": "bench_model",
    "sampler": "bench_sampler",
    "train": "bench_train",
    "retrieval": "bench_retrieval",
    "encoder": "bench_encoder",
    "memory_plan": "bench_memory_plan",
    "rl_step": "bench_rl_step",
    "rollout": "bench_rollout",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    args, rest = parser.parse_known_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    module = importlib.import_module(SUITES[args.suite])
    sys.argv = [f"{sys.argv[0]} --suite={args.suite}", *[a for a in rest if a != "--"]]
    module.main()


if __name__ == "__main__":
    main()
