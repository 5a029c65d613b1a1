"""Difficulty labels of training questions (searcher_jax/difficulty.py), for the paper's
data-mix ablation: how many rollouts a reference policy needs to answer each question.

    # the stored reference rollouts of stage_1.jsonl (no model), its two source sets
    python launch/label_difficulty.py --out=runs/labels/stage1.jsonl \
        --questions=hotpotqa=../shared/reference/r1searcher/training_set/stage_1.jsonl@1-201,2wiki=../shared/reference/r1searcher/training_set/stage_1.jsonl@202-350
    # sampled: 30 rollouts per question with a policy (the run config's model, sampler and
    # training rollout), the paper's thresholds
    python launch/label_difficulty.py --config=configs/stage2.py --config.model.hf_dir=... \
        --config.retriever.index_dir=... --questions=hotpotqa=hotpot_train.jsonl \
        --rollouts=30 --out=runs/labels/hotpot.jsonl

Writes one JSON line per question (idx, question, answer, source, difficulty,
rollouts_needed, rollouts, correct, rollouts_from, pred_anses) and prints the counts per source
and difficulty. With no --config the demo's world model samples (on the host CPU).
"""
import json
import logging

import cli  # the --config flag; puts the repository root on sys.path
from absl import app, flags

flags.DEFINE_string("questions", "", "comma-separated NAME=FILE[@FIRST-LAST] or FILE: each "
                    "source set's questions (rows FIRST..LAST, from 1)")
flags.DEFINE_string("out", "runs/difficulty.jsonl", "the labels file to write")
flags.DEFINE_integer("rollouts", 10, "rollouts sampled per question without stored ones")
flags.DEFINE_integer("easy_below", 10, "needing fewer rollouts than this: easy")
flags.DEFINE_integer("difficult_above", 20, "needing more rollouts than this: difficult")
flags.DEFINE_enum("metric", "cem", ["cem", "em", "f1"], "what makes a rollout correct")
flags.DEFINE_float("f1_threshold", 1.0, "metric f1: correct at F1 >= this")
flags.DEFINE_boolean("resample", False, "sample even questions that have stored rollouts")
flags.DEFINE_integer("limit", 0, "only the first N questions of each source (0: all)")
flags.DEFINE_integer("batch_size", 0, "rows per rollout (0: config.train.eval_batch_size)")
flags.DEFINE_integer("seed", 0, "the rollouts' PRNG seed")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cli.quiet_logging()
    # pylint: disable=import-outside-toplevel
    import jax
    from etils import epath

    from searcher_jax import difficulty
    config = difficulty.DifficultyConfig(rollouts=f.rollouts, easy_below=f.easy_below,
                                         difficult_above=f.difficult_above, metric=f.metric,
                                         f1_threshold=f.f1_threshold)
    sources = difficulty.parse_sources(f.questions)
    needs_model = f.resample or any(
        stored is None for source in sources
        for _, stored in difficulty.read_source(source)[:f.limit or None])
    draw, batch_size = None, 1
    if needs_model:
        draw, batch_size = policy(f.batch_size)
    rows = difficulty.label_sources(sources, config, draw, batch_size, jax.random.key(f.seed),
                                    resample=f.resample, limit=f.limit)
    out = epath.Path(f.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(json.dumps({"out": str(out), "questions": len(rows),
                      "by_source": difficulty.summary(rows)}))


def policy(batch_size: int):
    """(draw, rows per rollout) of the run config's policy: its model (or init_from's latest
    checkpoint), training sampler and rollout config."""
    # pylint: disable=import-outside-toplevel
    from flax import nnx

    from searcher_jax import difficulty, run_config, trainer
    from searcher_jax.sampling import sampler as sampling
    config = trainer.resolve_world(flags.FLAGS.config)
    with config.unlocked():
        config.data.eval_file = ""
    parts, params = trainer.build_parts(config, with_train_questions=False)
    init_from = run_config.model_source(config).init_from
    if init_from:
        params, step_dir = trainer.restore_init_params(init_from, params)
        parts.sampler.set_model(sampling.sampling_copy(nnx.merge(parts.graphdef, params),
                                                       parts.mesh))
        logging.warning("sampling with the params of %s", step_dir)
    encode = trainer.encode_prompt_fn(parts.tokenizer, run_config.data_config(config).prompt_style)
    draw = difficulty.policy_draw(parts.sampler, parts.tokenizer, parts.retriever, encode,
                                  run_config.rollout_config(config),
                                  run_config.reward_config(config), parts.eos_ids)
    return draw, batch_size or config.train.eval_batch_size


if __name__ == "__main__":
    cli.run(main)
