"""Ask a policy questions and watch it search: each query and the documents it got as they
happen, then the answer.

    python launch/ask.py "Where was Gremegrial Pigom born?"          # the demo's world
    python launch/ask.py                                             # an interactive prompt
    python launch/ask.py --config.model.hf_dir=runs/demo/hf "Who founded Fezeith Academy?"
    python launch/ask.py --config.model.init_from=runs/demo/stage2 "Who founded Fezeith Academy?"
    python launch/ask.py --config=configs/stage2.py --config.model.hf_dir=... \
        --config.retriever.index_dir=... "Which film came out first, ...?"

Greedy, with the config's `eval_rollout` (9 retrievals, top 5) and its prompt style. With no
question on the command line it reads one per line ("question> "), until end of input or
`quit`. --trajectory also prints the whole response (the model's reasoning with its queries
and documents) before the answer.
"""
import logging
import sys
from collections.abc import Callable, Iterable

import cli  # the --config flag; puts the repository root on sys.path
from absl import app, flags

flags.DEFINE_boolean("trajectory", False, "print the whole response before each answer")

PROMPT = "question> "
QUIT = ("quit", "exit", ":q")


class ShowingRetriever:
    """A retriever that prints each query and the documents it returns, as it is called."""

    def __init__(self, retriever, out=sys.stdout):
        self.retriever, self.out = retriever, out

    def search(self, queries, k):
        # pylint: disable=import-outside-toplevel
        from searcher_jax.retrieval.passage import documents_text
        found = self.retriever.search(queries, k)
        for query, passages in zip(queries, found):
            print(f"  search: {query}", file=self.out)
            for line in documents_text(passages).rstrip("\n").split("\n"):
                print(f"    {line}", file=self.out)
        self.out.flush()
        return found


def questions_from(lines: Iterable[str], out=sys.stdout) -> Iterable[str]:
    """The questions typed at the prompt: one per line, blank lines skipped, until `quit` or
    the end of input."""
    lines = iter(lines)
    while True:
        print(PROMPT, end="", file=out, flush=True)
        try:
            line = next(lines)
        except StopIteration:
            print(file=out)
            return
        question = line.strip()
        if question.lower() in QUIT:
            return
        if question:
            yield question


def answer_all(questions: Iterable[str], ask: Callable[[str], None]) -> int:
    """Asks each question in turn; returns how many were asked."""
    count = 0
    for question in questions:
        ask(question)
        count += 1
    return count


def main(argv):
    questions = argv[1:]
    # pylint: disable=import-outside-toplevel
    import jax

    from searcher_jax import evaluation, run_config, trainer
    from searcher_jax.data.questions import Question
    logging.getLogger().setLevel(logging.WARNING)
    config = trainer.resolve_world(app.flags.FLAGS.config)
    with config.unlocked():
        config.data.eval_file = ""  # only the questions asked here
    parts, params = trainer.build_parts(config, with_train_questions=False)
    trainer.evaluated_params(config, parts, params)   # --config.model.init_from=<workdir>
    retriever = ShowingRetriever(parts.retriever)
    encode = trainer.encode_prompt_fn(parts.tokenizer,
                                      run_config.data_config(config).prompt_style)

    def ask(question: str) -> None:
        print(f"Q: {question}", flush=True)
        [record] = evaluation.evaluate(
            parts.eval_sampler, parts.tokenizer, retriever,
            [Question(id="0", question=question, answers=("?",))], encode, batch_size=1,
            config=run_config.eval_rollout_config(config), key=jax.random.key(0),
            reward_config=run_config.reward_config(config), eos_ids=parts.eos_ids)
        if flags.FLAGS.trajectory:
            print(record.gen_text_store)
        print(f"=> {record.pred_ans.strip()}  ({len(record.queries)} searches, "
              f"ended: {record.end_reason})\n", flush=True)

    answer_all(questions or questions_from(sys.stdin), ask)


if __name__ == "__main__":
    cli.run(main)
