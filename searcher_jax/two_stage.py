"""The paper's two stages back to back, then the policy comparison: the demo's whole run.

    python launch/tpu_pod.py          # configs/demo.py sets config.stages

Stage 1 (SPEC section 3: retrieval reward + format reward) starts from the base
model; stage 2 (the config's own reward: F1 and the format penalty) starts from
stage 1's Orbax checkpoint directory (`model.init_from`), whose final policy is
also stage 2's reference (SPEC section 4; DESIGN.md point 8). Then the four
policies of `searcher_jax/policies.py` (naive, standard RAG, the base model
searching, the trained policy) are evaluated on the same held-out questions
with the same base model and retriever.

The stages are ordinary runs, so either one resumes from its own checkpoint
when the command is run again; a finished stage is skipped (its last
checkpoint is its final step).

Writes under config.train.workdir:
    stage1/, stage2/   each stage's run: checkpoints/, metrics.jsonl, tensorboard/
    results.md         the comparison table, overall and per question kind
    results.json       the same numbers, and every question's prediction per policy
    training.png       reward and its parts, F1, retrievals and length over both stages
    policies.png       the comparison as bars
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
from etils import epath

from searcher_jax import checkpoint as checkpoint_lib
from searcher_jax import policies
from searcher_jax import run_config
from searcher_jax import run_report
from searcher_jax import trainer
from searcher_jax.synthetic import reading

STAGE1, STAGE2 = "stage1", "stage2"
POLICY_NAMES = ("naive (no search)", "standard RAG", "base, searching", "trained (RL)")


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    """config.stages: what stage 1 changes from the run config (stage 2 is the config)."""
    enabled: bool = True                      # False: the config is one run (trainer.train)
    stage1_steps: int = 5
    stage1_reward: str = "retrieval_format"   # SPEC section 3: 0.5 retrieval + 0.5 format
    compare: bool = True                      # evaluate the four policies at the end

    def __post_init__(self):
        if self.stage1_steps < 1:
            raise ValueError(f"config.stages.stage1_steps must be >= 1, got {self.stage1_steps}")


def stage_configs(config) -> tuple[Any, Any]:
    """(stage 1's run config, stage 2's): workdirs <workdir>/stage1 and /stage2, stage 2
    initialised from stage 1's."""
    stages = run_config.build(StagesConfig, config.stages, "stages")
    workdir = epath.Path(config.train.workdir)
    stage1 = config.copy_and_resolve_references()
    stage2 = config.copy_and_resolve_references()
    with stage1.unlocked(), stage2.unlocked():
        del stage1.stages, stage2.stages
        stage1.train.workdir = str(workdir / STAGE1)
        stage1.train.steps = stages.stage1_steps
        stage1.reward.recipe = stages.stage1_reward
        stage2.train.workdir = str(workdir / STAGE2)
        stage2.model.init_from = str(workdir / STAGE1)
    return stage1, stage2


def run(config) -> dict[str, Any]:
    """Both stages, then (config.stages.compare) the comparison; returns its table ({} when
    not compared, or when a stage was stopped by a signal: it saved, and a rerun resumes)."""
    stages = run_config.build(StagesConfig, config.stages, "stages")
    stage1, stage2 = stage_configs(config)
    if trainer.train(stage1)["stopped"] or trainer.train(stage2)["stopped"]:
        return {}
    workdir = epath.Path(config.train.workdir)
    if jax.process_index() == 0:   # the process that wrote the metrics
        run_report.plot_training([(name, run_report.read_metrics(workdir / name))
                                  for name in (STAGE1, STAGE2)], workdir / "training.png")
    if not stages.compare or not config.train.eval_questions:
        return {}
    return compare(stage2, workdir)


def _groups_and_gold(config, questions) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Question id -> kind, and -> gold passage titles, from the synthetic world, which
    knows both exactly."""
    world_config, _ = run_config.world_source(config).configs()
    by_text = {q.text: q for q in reading.world_questions(world_config)[1]}
    groups, gold = {}, {}
    for question in questions:
        generated = by_text.get(question.question)
        if generated is None:
            raise ValueError(f"compare: evaluation question {question.id} ({question.question!r}) "
                             f"is not one of the world's (seed {world_config.seed})")
        groups[question.id] = generated.kind
        gold[question.id] = [step.subject for step in generated.steps]
    return groups, gold


def _relative(path, start) -> str:
    """`path` from `start` when it lies below it (a results file that still names the right
    checkpoint after the run's directory is moved or shared), else as given."""
    path, start = epath.Path(path), epath.Path(start)
    for below, above in ((path, start), (path.resolve(), start.resolve())):
        try:
            return str(below.relative_to(above))
        except ValueError:
            continue
    return str(path)


def compare(config, workdir: epath.Path) -> dict[str, dict[str, dict[str, float]]]:
    """The four policies on config.train.eval_questions held-out questions: results.md,
    results.json and policies.png in `workdir`; returns the table.

    config: stage 2's run config (its init_from is stage 1; its own workdir holds the trained
    policy). Needs config.world.dir: the naive policy's forced opening is the synthetic base
    model's no-search mode.
    """
    config = trainer.resolve_world(config)
    if not run_config.world_source(config).dir:
        raise ValueError("compare: needs the embedded world (config.world.dir)")
    train_cfg = run_config.build(trainer.TrainConfig, config.train, "train")
    parts, base_params = trainer.build_parts(config, with_train_questions=False)
    abstract = jax.tree.map(trainer.abstract_like, base_params)
    trained_params, step_dir = checkpoint_lib.restore_params(train_cfg.workdir, abstract)
    logging.info("comparing the base model with %s", step_dir)
    questions = parts.eval_questions[:train_cfg.eval_questions]
    groups, gold = _groups_and_gold(config, questions)
    naive = policies.Policy(POLICY_NAMES[0], policies.NAIVE, naive_opening=reading.CLOSED_BOOK)
    rag = policies.Policy(POLICY_NAMES[1], policies.RAG)
    base = policies.Policy(POLICY_NAMES[2], policies.SEARCH)
    trained = policies.Policy(POLICY_NAMES[3], policies.SEARCH)
    encode = trainer.encode_prompt_fn(parts.tokenizer,
                                      run_config.data_config(config).prompt_style)
    results = {}
    for policy, params in ((naive, base_params), (rag, base_params), (base, base_params),
                           (trained, trained_params)):
        trainer.sample_for_eval(parts, params)
        results[policy.name] = policies.evaluate_policy(
            policy, parts.eval_sampler, parts.tokenizer, parts.retriever, questions, encode,
            train_cfg.eval_batch_size, run_config.eval_rollout_config(config),
            run_config.reward_config(config), eos_ids=parts.eos_ids)
        logging.info("%s: %s", policy.name, policies.summarize(results[policy.name], gold))
    table = policies.table(results, groups, gold)
    if jax.process_index() == 0:
        out = epath.Path(workdir)
        notes = (f"{len(questions)} held-out questions (entities never in the pretraining "
                 f"text), greedy decoding, the same base model and BM25 index for every policy.",
                 f"trained: {_relative(step_dir, out)}")
        (out / "results.md").write_text(run_report.results_markdown(
            table, "Held-out evaluation: four policies", notes))
        run_report.plot_policies(table, out / "policies.png")
        (out / "results.json").write_text(json.dumps(dict(
            table=table, predictions={
                name: [dict(id=r.record.id, question=r.record.question, gold=r.record.answer,
                            prediction=r.record.pred_ans, f1=r.record.f1,
                            retrievals=r.retrievals, kind=groups[r.record.id])
                       for r in records] for name, records in results.items()}), indent=1))
    return table
