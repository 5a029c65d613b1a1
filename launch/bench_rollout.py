"""The rollout's two schedules side by side: barrier rounds vs continuous slots.

    python launch/benchmark.py --suite=rollout       # 256 trajectories through 64 slots
    python launch/benchmark.py --suite=rollout -- --prompts=4 --samples=4 --slots=4 --delays_ms=0,50

The demo's world (its base model, sampler settings and rollout limits, built or reused in
--world_dir) samples prompts x samples trajectories, the sampler holding --slots rows at a
time, against the world's BM25 index served over HTTP on loopback (retrieval/server.py)
with each call answered --delays_ms later (0, 50 and 200 ms: a local index, a service in
the same zone, one across regions). For each delay, both schedules on the same prompts and
key, each run twice and the second timed (the first compiles):
  barrier     rollout.schedule=barrier, sampler_rows=slots: groups of `slots` rows, each
              decoding round by round, one search call per round;
  continuous  rollout.schedule=continuous: rows search and resume on their own, a slot
              whose row ended takes the next prompt, and up to --parked_rows rows that wait
              for documents leave their slots to prompts (continuous_rollout.py).
Reported: wall seconds, the speedup of continuous over barrier, slot utilisation (sampled
tokens over the slot-steps the device ran: 1.0 is no slot ever idle in a decode call), the
decode and extend calls, the programs compiled during the timed run, whether both
schedules gave the same tokens, and how far apart their log-probs are.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import json_main  # noqa: E402


class CountingSampler:
    """The sampler, counting its decode and extend calls."""

    def __init__(self, sampler):
        self._sampler, self.calls = sampler, collections.Counter()

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def decode(self, state, **kwargs):
        self.calls["decode"] += 1
        return self._sampler.decode(state, **kwargs)

    def extend(self, state, rows):
        self.calls["extend"] += 1
        return self._sampler.extend(state, rows)


def run(args) -> dict:
    # pylint: disable=import-outside-toplevel
    from configs import demo
    from searcher_jax import run_config, trainer
    from searcher_jax.data.questions import expand_samples
    from searcher_jax.retrieval.http_client import HttpRetriever
    from searcher_jax.retrieval.server import RetrievalServer
    from searcher_jax.rollout import rollout

    config = demo.get_config()
    config.world.dir = args.world_dir
    if args.max_len:
        config.sampler.max_len = args.max_len
    config.sampler.batch_invariant = args.batch_invariant
    config = trainer.resolve_world(config)
    parts, _ = trainer.build_parts(config)
    base = run_config.rollout_config(config)
    encode = trainer.encode_prompt_fn(parts.tokenizer, run_config.data_config(config).prompt_style)
    questions = parts.train_questions[:args.prompts]
    prompt_ids = expand_samples([encode(q.question) for q in questions], args.samples)
    schedules = {
        "barrier": dataclasses.replace(base, schedule="barrier", sampler_rows=args.slots),
        "continuous": dataclasses.replace(base, schedule="continuous", sampler_rows=args.slots,
                                          decode_steps=args.decode_steps,
                                          parked_rows=args.parked_rows),
    }
    delays = [int(d) for d in args.delays_ms.split(",")]
    print(f"rollout schedules: {len(prompt_ids)} trajectories ({args.prompts} prompts x "
          f"{args.samples}) through {args.slots} slots, buffer {parts.sampler.config.max_len}, "
          f"segment {parts.sampler.config.segment_len}, continuous decode_steps "
          f"{args.decode_steps} and {args.parked_rows} parked rows"
          f"{', batch-invariant sampler' if args.batch_invariant else ''}")
    results = []
    for delay in delays:
        server = RetrievalServer(parts.retriever, port=0, added_latency_s=delay / 1000).start()
        try:
            retriever = HttpRetriever(server.url, timeout_s=60.0, retries=0)
            row = {"delay_ms": delay}
            outputs = {}
            for name, rollout_cfg in schedules.items():
                for _ in range(args.runs):  # the last is timed; the first compiles
                    sampler = CountingSampler(parts.sampler)
                    compiled = parts.sampler.num_compiled
                    start = time.perf_counter()
                    out = rollout(sampler, parts.tokenizer, retriever, prompt_ids, rollout_cfg,
                                  jax.random.key(0), eos_ids=parts.eos_ids)
                    seconds = time.perf_counter() - start
                outputs[name] = out
                row[name] = {"seconds": seconds,
                             "slot_utilisation": out.metrics()["slot_utilisation"],
                             "decode_calls": sampler.calls["decode"],
                             "extend_calls": sampler.calls["extend"],
                             "compiled_in_timed_run": parts.sampler.num_compiled - compiled}
            row["speedup"] = row["barrier"]["seconds"] / row["continuous"]["seconds"]
            row["same_tokens"] = bool(
                np.array_equal(outputs["barrier"].tokens, outputs["continuous"].tokens)
                and outputs["barrier"].queries == outputs["continuous"].queries)
            # Only the same tokens have comparable log-probs (and arrays of one width).
            row["max_logprob_difference"] = float(np.abs(
                outputs["barrier"].sampler_logprobs - outputs["continuous"].sampler_logprobs
            ).max()) if row["same_tokens"] else None
            results.append(row)
        finally:
            server.stop()
        gap = row["max_logprob_difference"]
        print(f"  +{delay:4d} ms a call: barrier {row['barrier']['seconds']:6.2f} s "
              f"(utilisation {row['barrier']['slot_utilisation']:.2f}), continuous "
              f"{row['continuous']['seconds']:6.2f} s "
              f"(utilisation {row['continuous']['slot_utilisation']:.2f}): "
              f"{row['speedup']:.2f}x; same tokens: {row['same_tokens']}, log-probs "
              + (f"within {gap:.1e}" if gap is not None else "not comparable"))
    sampled = outputs["barrier"].loss_mask.sum()
    return {"trajectories": len(prompt_ids), "slots": args.slots,
            "decode_steps": args.decode_steps, "sampled_tokens": int(sampled),
            "queries": int(outputs["barrier"].num_queries.sum()), "delays": results}


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--world_dir", default="runs/world",
                        help="the demo's world: built there if missing (configs/demo.py)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64, help="rows the sampler holds")
    parser.add_argument("--decode_steps", type=int, default=32,
                        help="continuous: tokens per row between two boundaries")
    parser.add_argument("--parked_rows", type=int, default=32,
                        help="continuous: rows that may wait for documents off the decode batch")
    parser.add_argument("--batch_invariant", action="store_true",
                        help="sampler.batch_invariant: both schedules' log-probs bit for bit")
    parser.add_argument("--delays_ms", default="0,50,200",
                        help="latency the server adds to each call, comma separated")
    parser.add_argument("--max_len", type=int, default=0, help="the sampler's buffer; 0: the demo's")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs of each schedule per delay, the last timed (1: time the compile)")


def main(argv=None):
    return json_main(__doc__.split("\n")[0], add_args, run, argv)


if __name__ == "__main__":
    main()
