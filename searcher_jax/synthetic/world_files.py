"""The world as files, in the formats of the real data.

    corpus.jsonl    id, title, text, format   (as reference/corpus/*.corpus.jsonl)
    train.jsonl     idx, question, answer, gen_text_store  (RL training questions)
    eval.jsonl      idx, question, answer, gen_text_store  (as r1searcher/eval_set/*.jsonl)

Training questions are about the training part of the world, evaluation
questions about the evaluation part. No text of the world is pretraining text:
the base model learns from fresh entities (synthetic/fresh.py).
"""
import dataclasses
import json
import pathlib
import random

from searcher_jax.data import prompts
from searcher_jax.synthetic import passages
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import world as world_lib

CORPUS_FILE, TRAIN_FILE, EVAL_FILE = "corpus.jsonl", "train.jsonl", "eval.jsonl"
_TAGS = (prompts.BEGIN_QUERY, prompts.END_QUERY, prompts.BEGIN_DOCUMENTS, prompts.END_DOCUMENTS,
         "Title:", "Text:")


@dataclasses.dataclass(frozen=True)
class WorldTexts:
    """The rows of each world file."""
    corpus: list[dict]
    train: list[dict]
    eval: list[dict]


def reserved_text() -> str:
    """The fixed text besides the templates that no drawn name may occur in: the prompt and
    the tags."""
    return prompts.base_prompt("") + "\n".join(_TAGS)


def generate_world(config: world_lib.WorldConfig) -> world_lib.World:
    """The world of a config, its names kept out of the prompt and the tags."""
    return world_lib.generate_world(config, reserved_text=reserved_text())


def build_world_texts(config: world_lib.WorldConfig) -> WorldTexts:
    """All world files' rows; a pure function of the config."""
    world = generate_world(config)
    question_rng = random.Random(config.seed + 2)
    train_questions = questions_lib.generate_questions(
        question_rng, world.train, config.num_train_questions, config.kind_weights)
    eval_questions = questions_lib.generate_questions(
        question_rng, world.eval, config.num_eval_questions, config.kind_weights)
    return WorldTexts(corpus=passages.corpus_rows(world),
                      train=questions_lib.question_rows(train_questions),
                      eval=questions_lib.question_rows(eval_questions))


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_world(config: world_lib.WorldConfig, directory: pathlib.Path) -> WorldTexts:
    """Writes the three world files into `directory` (created if needed)."""
    texts = build_world_texts(config)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in ((CORPUS_FILE, texts.corpus), (TRAIN_FILE, texts.train),
                       (EVAL_FILE, texts.eval)):
        write_jsonl(directory / name, rows)
    return texts
