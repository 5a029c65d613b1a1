"""Builds the synthetic world, its tokenizer and its tiny base model into a directory.

    python launch/pretrain_world.py --out_dir=artifacts/world            # the demo preset
    python launch/pretrain_world.py --out_dir=/tmp/world --preset=ci     # the tests' size
    python launch/pretrain_world.py --out_dir=/tmp/w --train --package   # rebuild the base model

The base model does not depend on the world's seed or sizes (synthetic/build.py,
model_payload); the one the presets use is committed in
searcher_jax/synthetic/base_model and copied in seconds. --train trains it anyway
(about 15 minutes on 2 CPU cores); --package then replaces the committed copy.

Writes <out_dir>/world (corpus.jsonl, train.jsonl, eval.jsonl, pretrain.jsonl),
<out_dir>/tokenizer and <out_dir>/model (a HF checkpoint directory, loaded like
Qwen through searcher_jax.model.hf_io). Stages whose config is unchanged are
reused. With --probe, samples the model after the base prompt for evaluation
questions and reports how many samples write a well-formed query.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from searcher_jax.data import prompts  # pylint: disable=wrong-import-position
from searcher_jax.model import hf_io  # pylint: disable=wrong-import-position
from searcher_jax.synthetic import build  # pylint: disable=wrong-import-position
from searcher_jax.synthetic import probe  # pylint: disable=wrong-import-position
from searcher_jax.synthetic import reading  # pylint: disable=wrong-import-position
from searcher_jax.synthetic import world_files  # pylint: disable=wrong-import-position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, type=pathlib.Path)
    parser.add_argument("--preset", default="demo", choices=sorted(build.PRESETS))
    parser.add_argument("--seed", type=int, default=None, help="overrides the world's seed")
    parser.add_argument("--steps", type=int, default=None,
                        help="overrides pretraining steps (warmup capped at a tenth of them, "
                             "the short-row phase at a half)")
    parser.add_argument("--train", action="store_true",
                        help="train the base model even if the committed one matches")
    parser.add_argument("--package", action="store_true",
                        help="copy the built base model into searcher_jax/synthetic/base_model")
    parser.add_argument("--probe", type=int, default=0, metavar="N",
                        help="after building, sample N evaluation prompts and count queries")
    args = parser.parse_args()

    world_config, pretrain_config = build.PRESETS[args.preset]
    if args.seed is not None:
        world_config = dataclasses.replace(world_config, seed=args.seed)
    if args.steps is not None:
        pretrain_config = dataclasses.replace(
            pretrain_config, steps=args.steps,
            warmup_steps=min(pretrain_config.warmup_steps, args.steps // 10),
            short_steps=min(pretrain_config.short_steps, args.steps // 2))
    start = time.time()
    paths = build.build(args.out_dir, world_config, pretrain_config, use_packaged=not args.train)
    print(f"build done in {time.time() - start:.1f}s: {paths.root}")
    if args.package:
        shutil.rmtree(build.PACKAGED_MODEL_DIR, ignore_errors=True)
        shutil.copytree(paths.model_dir, build.PACKAGED_MODEL_DIR)
        print(f"packaged {paths.model_dir} as {build.PACKAGED_MODEL_DIR}")
    log = json.loads((paths.model_dir / build.PRETRAIN_LOG_FILE).read_text())
    print(f"model: {log['num_params']:,} parameters, trained in {log['train_seconds']}s, "
          f"final loss {log['loss_last_10_mean']:.3f}")

    if args.probe:
        model = hf_io.load_pretrained(paths.model_dir)
        tokenizer = hf_io.load_tokenizer(paths.model_dir)
        questions = world_files.read_jsonl(paths.eval_questions)[:args.probe]
        prompt_texts = [prompts.base_prompt(row["question"]) for row in questions]
        eos_ids = hf_io.eos_token_ids(paths.model_dir, tokenizer)
        start = time.time()
        rate, texts = probe.query_rate(model, tokenizer, prompt_texts, max_new_tokens=96, seed=0,
                                       eos_ids=eos_ids)
        print(f"probe: {rate:.0%} of {len(prompt_texts)} samples write a well-formed query "
              f"({time.time() - start:.1f}s); first sample:\n{texts[0]}")
        # Reading: can it copy an answer out of oracle documents, on unseen entities?
        eval_questions = reading.world_questions(world_config)[1][:args.probe]
        documents = reading.OracleDocuments(world_files.read_jsonl(paths.corpus))
        read, _ = reading.reading_f1(model, tokenizer, eval_questions, documents, eos_ids,
                                   top_k=world_config.demo_top_k)
        closed, _ = reading.closed_book_f1(model, tokenizer, eval_questions, eos_ids)
        print(f"reading F1 (oracle documents) {read:.3f}, closed-book F1 {closed:.3f}, "
              f"on {len(eval_questions)} unseen evaluation questions")


if __name__ == "__main__":
    main()
