"""Difficulty labels of training questions, for the paper's data-mix ablation (SPEC section 4).

A question's difficulty is how many rollouts a reference policy needs to answer it: the
1-based index of its first correct rollout among n. The paper's thresholds (configurable):
fewer than 10 rollouts is easy, 10 to 20 medium, more than 20 difficult. A question no rollout
answers needed more than n: difficult when n > 20, else undecided ("unsolved": n was too few
to tell medium from difficult).

Rollouts come from a row's stored reference rollouts where it has them (stage_1.jsonl's
`pred_anses`: 10 predicted answers per question), else they are sampled with a policy
(`sample_predictions`: the training sampler and rollout, n per question). A rollout is correct
when its prediction scores 1 under the chosen metric (CEM, the paper's ACC_R, by default; or
EM; or F1 at a threshold); a rollout that gave no answer (its prediction is evaluation's
"I don't know." placeholder, or empty) is wrong, whatever the golds. Each labelled row
keeps its predictions as `pred_anses`, so a labels file can be read back and relabelled
without a model.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import jax
from etils import epath

from searcher_jax import evaluation
from searcher_jax.data.questions import Question, expand_samples, read_questions, split_spec
from searcher_jax.rl import metrics

EASY, MEDIUM, DIFFICULT, UNSOLVED = "easy", "medium", "difficult", "unsolved"
METRICS = ("cem", "em", "f1")


@dataclasses.dataclass(frozen=True)
class DifficultyConfig:
    rollouts: int = 10          # n sampled per question (stored ones are used as they are)
    easy_below: int = 10        # needed < easy_below: easy
    difficult_above: int = 20   # needed > difficult_above: difficult; in between: medium
    metric: str = "cem"         # what makes a rollout correct
    f1_threshold: float = 1.0   # metric "f1": correct when F1 >= this

    def __post_init__(self):
        if self.rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {self.rollouts}")
        if not 1 <= self.easy_below <= self.difficult_above + 1:
            raise ValueError(f"thresholds need 1 <= easy_below ({self.easy_below}) <= "
                             f"difficult_above + 1 ({self.difficult_above + 1})")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


@dataclasses.dataclass(frozen=True)
class Source:
    """Questions of one source set: a file, optionally rows first..last (1-based)."""
    name: str
    path: str
    first: int = 1
    last: int = 0   # 0: to the end


def parse_sources(spec: str) -> list[Source]:
    """Comma-separated NAME=FILE[@FIRST-LAST] or FILE (named by its stem). Rows are numbered
    from 1 in file order, e.g. "hotpotqa=stage_1.jsonl@1-201,2wiki=stage_1.jsonl@202-350"
    (stage_1 holds 201 HotpotQA questions, then 149 from 2Wiki). Raises ValueError."""
    out = []
    for item in [i.strip() for i in spec.split(",") if i.strip()]:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        first, last = 1, 0
        if "@" in path:
            path, _, span = path.rpartition("@")
            try:
                first, last = (int(x) for x in span.split("-"))
            except ValueError:
                raise ValueError(f"{item!r}: a row range is @FIRST-LAST, e.g. @1-200") from None
            if not 1 <= first <= last:
                raise ValueError(f"{item!r}: rows {first}-{last} are not a range from 1")
        out.append(Source(name or epath.Path(path).stem, path, first, last))
    if not out:
        raise ValueError("no question file given")
    return out


def read_source(source: Source) -> list[tuple[Question, list[str] | None]]:
    """(question, its stored predictions or None) for the source's rows.

    Raises ValueError naming file and line for a malformed row (read_questions) or a
    `pred_anses` that is not a list of strings; for a row range beyond the file.
    """
    questions = read_questions(source.path)
    stored: list = [None] * len(questions)
    path = epath.Path(source.path)
    if split_spec(source.path) is None:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            raws = [(f"item {n}", row) for n, row in enumerate(json.loads(text), 1)]
        else:
            raws = [(f"line {n}", json.loads(line))
                    for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        for i, (where, raw) in enumerate(raws):
            answers = raw.get("pred_anses")
            if answers is None:
                continue
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{path}, {where}: 'pred_anses' must be a list of strings")
            stored[i] = answers or None
    last = source.last or len(questions)
    if last > len(questions):
        raise ValueError(f"{source.path}: rows {source.first}-{source.last} asked, the file has "
                         f"{len(questions)}")
    return list(zip(questions, stored))[source.first - 1:last]


def correct(prediction: str, golds: Sequence[str], config: DifficultyConfig) -> bool:
    """Whether one rollout's prediction answers the question. A rollout with no answer (the
    evaluation's NO_ANSWER placeholder, or an empty prediction) is wrong: the placeholder is not
    scored as text (it would cover a gold such as "know")."""
    if prediction == evaluation.NO_ANSWER or not prediction.strip():
        return False
    if config.metric == "em":
        return metrics.exact_match(prediction, golds) == 1.0
    if config.metric == "f1":
        return metrics.f1_score(prediction, golds) >= config.f1_threshold
    return metrics.cover_exact_match(prediction, golds) == 1.0


def rollouts_needed(hits: Sequence[bool]) -> int | None:
    """The 1-based index of the first correct rollout, None when none is."""
    return next((i for i, hit in enumerate(hits, 1) if hit), None)


def label(needed: int | None, rollouts: int, config: DifficultyConfig) -> str:
    """easy / medium / difficult by the thresholds; unsolved when no rollout of `rollouts`
    answered and rollouts <= difficult_above (it may be medium or difficult)."""
    if needed is None:
        return DIFFICULT if rollouts > config.difficult_above else UNSOLVED
    if needed < config.easy_below:
        return EASY
    return MEDIUM if needed <= config.difficult_above else DIFFICULT


def labelled_row(question: Question, source: str, predictions: Sequence[str], sampled: bool,
                 config: DifficultyConfig) -> dict:
    hits = [correct(p, question.answers, config) for p in predictions]
    needed = rollouts_needed(hits)
    return {"idx": question.id, "question": question.question, "answer": list(question.answers),
            "source": source, "difficulty": label(needed, len(predictions), config),
            "rollouts_needed": needed, "rollouts": len(predictions), "correct": hits,
            "rollouts_from": "sampled" if sampled else "stored", "pred_anses": list(predictions)}


def sample_predictions(questions: Sequence[Question], n: int, draw: Callable, batch_size: int,
                       key) -> list[list[str]]:
    """n predictions per question, drawn in batches of batch_size rows (the last one padded).

    draw(questions, key) -> evaluation records, one per question given (in order): a rollout
    of a policy (`policy_draw`). Each batch's key is fold_in(key, its first row).
    """
    rows = expand_samples(list(questions), n)
    predictions: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        records = draw(padded, jax.random.fold_in(key, start))
        predictions += [r.pred_ans for r in records[:len(chunk)]]
    return [predictions[i * n:(i + 1) * n] for i in range(len(questions))]


def policy_draw(sampler, tokenizer, retriever, encode_prompt, rollout_config, reward_config,
                eos_ids) -> Callable:
    """draw() for sample_predictions: one rollout batch of the policy behind `sampler` (its
    own SelectConfig: the training temperature), scored on the policy's own text."""
    # pylint: disable=import-outside-toplevel
    from searcher_jax.rollout import rollout

    def draw(questions: Sequence[Question], key) -> list[evaluation.Record]:
        trajectories = rollout(sampler, tokenizer, retriever,
                               [encode_prompt(q.question) for q in questions], rollout_config,
                               key, eos_ids=eos_ids)
        return evaluation.score_trajectories(trajectories, questions, tokenizer, reward_config)
    return draw


def label_sources(sources: Sequence[Source], config: DifficultyConfig, draw: Callable | None,
                  batch_size: int, key, resample: bool = False,
                  limit: int = 0) -> list[dict]:
    """Labelled rows of every source's questions, in order (limit: the first N of each).

    Stored predictions are used unless `resample`; the others are sampled with `draw`
    (config.rollouts each). Raises ValueError when some question needs sampling and `draw`
    is None.
    """
    items = [(source.name, q, stored) for source in sources
             for q, stored in read_source(source)[:limit or None]]
    to_sample = [q for _, q, stored in items if resample or stored is None]
    if to_sample and draw is None:
        raise ValueError(f"{len(to_sample)} question(s) have no stored rollouts (pred_anses): "
                         "give a policy to sample them")
    sampled = iter(sample_predictions(to_sample, config.rollouts, draw, batch_size, key)
                   if to_sample else [])
    out = []
    for source, question, stored in items:
        if resample or stored is None:
            out.append(labelled_row(question, source, next(sampled), True, config))
        else:
            out.append(labelled_row(question, source, stored, False, config))
    return out


def summary(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """{source: {difficulty: count}}."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = out.setdefault(row["source"], {})
        counts[row["difficulty"]] = counts.get(row["difficulty"], 0) + 1
    return out
