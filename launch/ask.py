"""Ask a policy questions and watch it search: the whole trajectory, then the answer.

    python launch/ask.py "Where was Gremegrial Pigom born?"          # the demo's world
    python launch/ask.py --config.model.hf_dir=runs/demo/hf "Who founded Fezeith Academy?"
    python launch/ask.py --config=configs/stage2.py --config.model.hf_dir=... \
        --config.retriever.index_dir=... "Which film came out first, ...?"

Greedy, with the config's `eval_rollout` (9 retrievals, top 5) and its prompt style.
"""
import logging

import cli  # the --config flag; puts the repository root on sys.path
from absl import app


def main(argv):
    questions = argv[1:]
    if not questions:
        raise app.UsageError("give one or more questions, e.g. ask.py \"Where was X born?\"")
    # pylint: disable=import-outside-toplevel
    import jax

    from searcher_jax import evaluation, run_config, trainer
    from searcher_jax.data.questions import Question
    logging.getLogger().setLevel(logging.WARNING)
    config = trainer.resolve_world(app.flags.FLAGS.config)
    with config.unlocked():
        config.data.eval_file = ""  # only the questions given here
    parts, _ = trainer.build_parts(config, with_train_questions=False)
    records = evaluation.evaluate(
        parts.eval_sampler, parts.tokenizer, parts.retriever,
        [Question(id=str(i), question=q, answers=("",)) for i, q in enumerate(questions)],
        trainer.encode_prompt_fn(parts.tokenizer, run_config.data_config(config).prompt_style),
        batch_size=len(questions), config=run_config.eval_rollout_config(config),
        key=jax.random.key(0), reward_config=run_config.reward_config(config),
        eos_ids=parts.eos_ids)
    for record in records:
        print(f"Q: {record.question}\n{record.gen_text_store}\n"
              f"=> {record.pred_ans.strip()}  ({len(record.queries)} searches, "
              f"ended: {record.end_reason})\n")


if __name__ == "__main__":
    cli.run(main)
