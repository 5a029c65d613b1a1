"""The world as files, in the formats of the real data.

    corpus.jsonl    id, title, text, format   (as reference/corpus/*.corpus.jsonl)
    train.jsonl     idx, question, answer, gen_text_store  (RL training questions)
    eval.jsonl      idx, question, answer, gen_text_store  (as r1searcher/eval_set/*.jsonl)
    pretrain.jsonl  kind ("passage" or "demo"), text, and a demo's mode: everything the
                    base model is trained on

Training questions, demonstration questions and evaluation questions are
three disjoint sets; the first two are about the training part of the world,
the last about the evaluation part.
"""
import dataclasses
import json
import pathlib
import random

from searcher_jax.data import prompts
from searcher_jax.synthetic import demonstrations
from searcher_jax.synthetic import keyword_search
from searcher_jax.synthetic import passages
from searcher_jax.synthetic import questions as questions_lib
from searcher_jax.synthetic import world as world_lib

CORPUS_FILE, TRAIN_FILE, EVAL_FILE, PRETRAIN_FILE = (
    "corpus.jsonl", "train.jsonl", "eval.jsonl", "pretrain.jsonl")
PASSAGE, DEMO = "passage", "demo"
_TAGS = (prompts.BEGIN_QUERY, prompts.END_QUERY, prompts.BEGIN_DOCUMENTS, prompts.END_DOCUMENTS,
         "Title:", "Text:")


@dataclasses.dataclass(frozen=True)
class WorldTexts:
    """The rows of each world file."""
    corpus: list[dict]
    train: list[dict]
    eval: list[dict]
    pretrain: list[dict]


def leaked_names(names: list[str], texts: list[str]) -> list[str]:
    """The names that occur (case-sensitively) in any of `texts`."""
    joined = "\n".join(texts)
    return [name for name in names if name in joined]


def generate_world(config: world_lib.WorldConfig) -> world_lib.World:
    """The world of a config, its names kept out of the prompt and the tags."""
    reserved = prompts.base_prompt("") + "\n".join(_TAGS)
    return world_lib.generate_world(config, reserved_text=reserved)


def build_world_texts(config: world_lib.WorldConfig) -> WorldTexts:
    """All world files' rows; a pure function of the config."""
    world = generate_world(config)
    question_rng = random.Random(config.seed + 2)
    train_part_questions = questions_lib.generate_questions(
        question_rng, world.train, config.num_train_questions + config.num_demo_questions,
        config.kind_weights)
    train_questions = train_part_questions[:config.num_train_questions]
    demo_questions = train_part_questions[config.num_train_questions:]
    eval_questions = questions_lib.generate_questions(
        question_rng, world.eval, config.num_eval_questions, config.kind_weights)

    corpus = passages.corpus_rows(world)
    train_names = set(world.train.names())
    train_corpus = [row for row in corpus if row["title"] in train_names]
    writer = demonstrations.DemoWriter(world, keyword_search.KeywordSearch(train_corpus))
    demo_rng = random.Random(config.seed + 3)
    pretrain = [dict(kind=PASSAGE, text=passages.render_passage(row["title"], row["text"]))
                for row in train_corpus]
    if config.num_demos and not demo_questions:
        raise ValueError("WorldConfig: num_demos > 0 needs num_demo_questions > 0")
    for index in range(config.num_demos):
        question = demo_questions[index % len(demo_questions)]
        mode, text = writer.demonstration(demo_rng, question)
        pretrain.append(dict(kind=DEMO, text=text, mode=mode))

    leaks = leaked_names(list(world.eval.names()), [row["text"] for row in pretrain])
    if leaks:   # The name pool rules this out; a failure here is a bug in the generator.
        raise AssertionError(f"evaluation entities in the pretraining text: {leaks[:5]}")
    return WorldTexts(corpus=corpus, train=questions_lib.question_rows(train_questions),
                      eval=questions_lib.question_rows(eval_questions), pretrain=pretrain)


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_world(config: world_lib.WorldConfig, directory: pathlib.Path) -> WorldTexts:
    """Writes the four world files into `directory` (created if needed)."""
    texts = build_world_texts(config)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in ((CORPUS_FILE, texts.corpus), (TRAIN_FILE, texts.train),
                       (EVAL_FILE, texts.eval), (PRETRAIN_FILE, texts.pretrain)):
        write_jsonl(directory / name, rows)
    return texts
