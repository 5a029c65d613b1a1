"""Where one RL step of the demo goes: decode, retrieval, document extend, log-probs, update.

    python launch/benchmark.py --suite=rl_step                  # the demo config, 8 x 8 rows
    python launch/benchmark.py --suite=rl_step -- --prompts=2 --samples=4 --max_len=512

One step as the trainer runs it, on the demo's world (its base model, BM25 index, sampler
and rollout settings, built or reused in --world_dir): a rollout of prompts x samples rows,
then the jitted train step on its batch. Everything is run twice and the second is timed:
the first compiles (the second rollout uses the same key, so it meets the same shapes and
the same batch width). The sampler and the retriever are wrapped so that each call is
timed, its device work waited for:
  decode     the sampler's segments (tokens/s: tokens the policy sampled),
  extend     prompts and document blocks written into the KV cache (tokens/s: inserted),
  retrieval  the retriever's calls (queries/s),
  host       the rest of the rollout: detokenising, finding queries, assembling rows,
  log-probs  the step's old log-prob forward, timed alone with the same forward
             (train_step.make_logprob_fn on the same batch),
  update     the train step less that forward: forward + backward + Adam per mini-batch.
Tokens/s of log-probs and update count the batch's padded [B, T] positions; "padding" is
the share of them past each row's length, the work length-aware micro-batches would save.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import json_main  # noqa: E402


class _Clock:
    """Seconds and counts per part of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, part: str, seconds: float, count: int) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.counts[part] = self.counts.get(part, 0) + count


class TimedSampler:
    """The sampler, with extend and decode timed to the end of their device work."""

    def __init__(self, sampler, clock: _Clock):
        self._sampler, self._clock = sampler, clock

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def extend(self, state, rows):
        start = time.perf_counter()
        state = jax.block_until_ready(self._sampler.extend(state, rows))
        self._clock.add("extend", time.perf_counter() - start, sum(len(r) for r in rows))
        return state

    def decode(self, state, **kwargs):
        start = time.perf_counter()
        state, segment = jax.block_until_ready(self._sampler.decode(state, **kwargs))
        self._clock.add("decode", time.perf_counter() - start, 0)  # tokens: from the rows
        return state, segment


class TimedRetriever:
    def __init__(self, retriever, clock: _Clock):
        self._retriever, self._clock = retriever, clock

    def search(self, queries, k):
        start = time.perf_counter()
        found = self._retriever.search(queries, k)
        self._clock.add("retrieval", time.perf_counter() - start, len(queries))
        return found


def _config(args):
    from configs import demo  # pylint: disable=import-outside-toplevel
    config = demo.get_config()
    config.world.dir = args.world_dir
    config.train.prompts_per_step = args.prompts
    config.rl.samples_per_prompt = args.samples
    rows = args.prompts * args.samples
    config.rl.mini_batch_size = min(config.rl.mini_batch_size, rows)
    config.rl.micro_batch_size = min(config.rl.micro_batch_size, config.rl.mini_batch_size)
    if args.max_len:
        config.sampler.max_len = args.max_len
    return config


def run(args) -> dict:
    # pylint: disable=import-outside-toplevel
    from searcher_jax import run_config, trainer
    from searcher_jax.data.questions import expand_samples
    from searcher_jax.rl import train_step as train_step_lib
    from searcher_jax.rollout import rollout

    config = trainer.resolve_world(_config(args))
    parts, params = trainer.build_parts(config)
    rl = run_config.rl_config(config, rollout_steps=10)
    rollout_cfg = run_config.rollout_config(config)
    reward_cfg = run_config.reward_config(config)
    encode = trainer.encode_prompt_fn(parts.tokenizer, run_config.data_config(config).prompt_style)
    questions = parts.train_questions[:args.prompts]
    prompt_ids = expand_samples([encode(q.question) for q in questions], args.samples)
    state = train_step_lib.make_init_fn(rl, params, parts.mesh)(params)
    step = train_step_lib.make_train_step(parts.graphdef, state, rl, parts.mesh)
    logprob_fn = train_step_lib.make_logprob_fn(parts.graphdef, rl, params, parts.mesh)

    def timed_step(clock: _Clock):
        sampler, retriever = TimedSampler(parts.sampler, clock), TimedRetriever(parts.retriever,
                                                                               clock)
        start = time.perf_counter()
        trajectories = rollout(sampler, parts.tokenizer, retriever, prompt_ids, rollout_cfg,
                               jax.random.key(0), eos_ids=parts.eos_ids)
        clock.add("rollout", time.perf_counter() - start, len(prompt_ids))
        rewards, _ = trainer.score(trajectories, expand_samples(questions, args.samples),
                                   reward_cfg)
        batch = trainer.rollout_batch(trajectories, rewards, parts.sampler.config.max_len,
                                      parts.mesh)
        start = time.perf_counter()
        jax.block_until_ready(logprob_fn(state.params, batch.tokens))
        clock.add("logprobs", time.perf_counter() - start, 0)
        # The step donates its state: it gets a copy.
        copy = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), state))
        start = time.perf_counter()
        jax.block_until_ready(step(copy, batch))
        clock.add("step", time.perf_counter() - start, 0)
        return trajectories, batch

    # The same key twice: the second rollout decodes the same tokens, so every shape it meets
    # is compiled by the first and its time is the step's own.
    timed_step(_Clock())
    clock = _Clock()
    trajectories, batch = timed_step(clock)

    s = clock.seconds
    sampled = int(trajectories.loss_mask.sum())
    positions = int(np.prod(batch.tokens.shape))
    held = int(trajectories.lengths.sum())
    parts_s = {
        "decode": s.get("decode", 0.0),
        "retrieval": s.get("retrieval", 0.0),
        "extend": s.get("extend", 0.0),
        "host": s["rollout"] - s.get("decode", 0.0) - s.get("retrieval", 0.0)
                - s.get("extend", 0.0),
        "log-probs": s["logprobs"],
        "update": s["step"] - s["logprobs"],
    }
    rates = {"decode": (sampled, "sampled tokens/s"),
             "retrieval": (clock.counts.get("retrieval", 0), "queries/s"),
             "extend": (clock.counts.get("extend", 0), "inserted tokens/s"),
             "log-probs": (positions, "padded tokens/s"), "update": (positions, "padded tokens/s")}
    total = s["rollout"] + s["step"]
    rows = len(prompt_ids)
    print(f"one RL step of the demo: {rows} rows ({args.prompts} prompts x {args.samples}), "
          f"train batch [{batch.tokens.shape[0]}, {batch.tokens.shape[1]}], "
          f"{total:.2f} s; rollout {s['rollout']:.2f} s, train step {s['step']:.2f} s")
    for name, seconds in parts_s.items():
        line = f"  {name:10s} {seconds:7.2f} s  {seconds / total:6.1%}"
        if name in rates and seconds > 0:
            count, unit = rates[name]
            line += f"  {count / seconds:10.0f} {unit}"
        print(line)
    padding = 1.0 - held / positions
    print(f"  padding: {padding:.1%} of the train batch's {positions} positions "
          f"({held} held by rows)")
    return {"rows": rows, "batch_shape": list(batch.tokens.shape), "total_s": total,
            "parts_s": parts_s, "sampled_tokens": sampled,
            "inserted_tokens": clock.counts.get("extend", 0),
            "queries": clock.counts.get("retrieval", 0), "padding_share": padding}


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--world_dir", default="runs/world",
                        help="the demo's world: built there if missing (configs/demo.py)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=0, help="the sampler's buffer; 0: the demo's")


def main(argv=None):
    return json_main(__doc__.split("\n")[0], add_args, run, argv)


if __name__ == "__main__":
    main()
