"""Greedy evaluation of a policy on a question set (SPEC section 6): EM, CEM (ACC_R), F1.

    python launch/evaluate.py --config=configs/stage2.py --config.model.hf_dir=runs/demo/hf \
        --config.data.eval_file=.../hotpotqa_500.jsonl --config.retriever.index_dir=... \
        --out=runs/eval/hotpotqa

Reads the same run config as training (model, sampler, retriever, reward, data.prompt_style)
and its `eval_rollout` section (9 retrievals, top 5). Writes <out>/records.jsonl, one line per
question in the released traces' field names (question, answer, pred_ans, gen_text_store, ...),
and <out>/summary.json. With no --config it evaluates the demo's world (configs/demo.py).
"""
import dataclasses
import json
import logging

import cli  # the --config flag; puts the repository root on sys.path
from absl import app, flags

flags.DEFINE_string("out", "runs/eval", "directory for records.jsonl and summary.json")
flags.DEFINE_integer("limit", 0, "evaluate only the first N questions (0: all)")
flags.DEFINE_integer("batch_size", 0, "rows per rollout (0: config.train.eval_batch_size)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # pylint: disable=import-outside-toplevel
    import jax
    from etils import epath

    from searcher_jax import evaluation, run_config, trainer
    logging.getLogger().setLevel(logging.INFO)
    config = trainer.resolve_world(flags.FLAGS.config)
    data = run_config.data_config(config)
    if not data.eval_file:
        raise app.UsageError("config.data.eval_file is empty: give the questions to evaluate")
    parts, _ = trainer.build_parts(config, with_train_questions=False)
    questions = parts.eval_questions[:flags.FLAGS.limit or None]
    batch_size = flags.FLAGS.batch_size or config.train.eval_batch_size
    logging.info("evaluating %d questions of %s with %s", len(questions), data.eval_file,
                 config.model.hf_dir)
    records = evaluation.evaluate(
        parts.eval_sampler, parts.tokenizer, parts.retriever, questions,
        trainer.encode_prompt_fn(parts.tokenizer, data.prompt_style), batch_size,
        run_config.eval_rollout_config(config), reward_config=run_config.reward_config(config),
        eos_ids=parts.eos_ids)
    summary = evaluation.summarize(records)
    if jax.process_index() == 0:
        out = epath.Path(flags.FLAGS.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "records.jsonl").open("w") as f:
            for record in records:
                f.write(json.dumps(dataclasses.asdict(record)) + "\n")
        (out / "summary.json").write_text(json.dumps(
            {**summary, "eval_file": data.eval_file, "hf_dir": config.model.hf_dir}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
