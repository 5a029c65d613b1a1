"""The RL loop: it wires the parts (DESIGN.md, "How data flows") and contains none of them.

One rollout step:
    questions (QuestionOrder at a saved position) -> prompts x samples_per_prompt
    -> rollout (sampler <-> retriever) -> rewards (host strings)
    [-> more prompts while dynamic sampling refills: rl/dynamic_sampling.py]
    -> [reference log-probs] -> train_step (pure, jitted, sharded)
    -> metrics (with collapse signals: rl/collapse.py), checkpoint.
Everything a resumed run needs is in the checkpoint: the TrainState, the step
and the data position; each step's PRNG key is fold_in(seed, step) (a refill's k-th extra
draw: fold_in of that key and k). A new run may start from
another run's checkpoint (config.model.init_from: stage 2 from stage 1, SPEC section 4): its
params only, as the initial policy and the reference; optimizer, schedule and data are new.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath
from flax import nnx

from searcher_jax import checkpoint as checkpoint_lib
from searcher_jax import evaluation, run_config
from searcher_jax.data import prompts
from searcher_jax.data.questions import (
    Question,
    QuestionOrder,
    expand_samples,
    read_questions,
)
from searcher_jax.model import hf_io, sharding
from searcher_jax.retrieval.retriever import make_retriever
from searcher_jax.rl import collapse, dynamic_sampling
from searcher_jax.rl import rewards as rewards_lib
from searcher_jax.rl import train_step as train_step_lib
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rollout import STOP_STRINGS, Trajectories, rollout
from searcher_jax.sampling import sampler as sampling
from searcher_jax.sampling import select, stop_strings
from searcher_jax.synthetic import build as synthetic_build

MIN_TRAIN_LEN = 128  # the train batch's length: 128, 192, 256, 384, 512, 768, ... (few compiles)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = "runs/train"  # metrics.jsonl, config.json, checkpoints/, hf/
    steps: int = 0  # rollout steps; 0: one epoch over the training questions
    prompts_per_step: int = 64  # prompts per rollout batch (x samples_per_prompt rows)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # rollout steps between evaluations (also at the start and the end)
    eval_questions: int = 500  # the first N questions of data.eval_file
    eval_batch_size: int = 64
    save_every: int = 20  # rollout steps between checkpoints (and at the end)
    max_to_keep: int = 3
    # Write <workdir>/hf at the end, for serving and evaluation; the next stage starts from
    # the checkpoints (its model.init_from is this workdir).
    export_hf: bool = True
    # A progress bar on stdout (process 0), with reward, F1 and queries per row, and a line per
    # evaluation; the per-step log line stays at INFO, which the launchers hide by default.
    progress: bool = True
    # A step's optimizer steps whose loss or gradient norm is not finite are skipped (params and
    # optimizer state kept; `skipped_steps` in the metrics, and a warning). When more than this
    # share of the run's optimizer steps has been skipped, from rollout step
    # nonfinite_min_steps on, the run stops (NonFiniteStepsError): it is no longer training.
    max_nonfinite_share: float = 0.1
    nonfinite_min_steps: int = 10

    def __post_init__(self):
        for name in ("prompts_per_step", "log_every", "eval_batch_size", "save_every",
                     "max_to_keep", "nonfinite_min_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.train.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.steps, self.eval_every, self.eval_questions) < 0:
            raise ValueError("config.train.steps, eval_every and eval_questions must be >= 0")
        if not 0 <= self.max_nonfinite_share <= 1:
            raise ValueError(f"config.train.max_nonfinite_share must be in [0, 1], got "
                             f"{self.max_nonfinite_share}")


class NonFiniteStepsError(RuntimeError):
    """A run that skipped more than config.train.max_nonfinite_share of its optimizer steps."""


def resolve_world(config):
    """When config.world.dir is set: build (or reuse) the embedded synthetic world there and
    point every empty path of the config (model, data, BM25 index) at it."""
    config = config.copy_and_resolve_references()
    world = run_config.world_source(config)
    if not world.dir:
        return config
    paths = synthetic_build.build(epath.Path(world.dir), *world.configs(), log=_print_once)
    with config.unlocked():
        config.model.hf_dir = config.model.hf_dir or str(paths.model_dir)
        config.data.train_file = config.data.train_file or str(paths.train_questions)
        config.data.eval_file = config.data.eval_file or str(paths.eval_questions)
        # A remote backend (a retrieval server, web search) has no index to point at.
        if not config.retriever.index_dir and config.retriever.backend not in ("http", "web"):
            config.retriever.backend = "bm25"
            config.retriever.index_dir = str(paths.index_dir)
    return config


def _print_once(message: str) -> None:
    """On stderr from process 0: logs show warnings only, and stdout is the tools' output."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Parts:
    """Everything the loop calls, built once from the run config."""
    graphdef: Any  # the training Decoder's structure (its fp32 params live in the TrainState)
    tokenizer: Any
    eos_ids: tuple[int, ...]  # every id that ends a row (config.json, generation config, tokenizer)
    retriever: Any
    sampler: sampling.Sampler
    eval_sampler: sampling.Sampler
    mesh: Any
    train_questions: list[Question]
    eval_questions: list[Question]


def encode_prompt_fn(tokenizer, style: str):
    return lambda question: prompts.prompt_ids(tokenizer, question, style)


def load_questions(path: str, tokenizer, style: str, max_prompt_len: int) -> list[Question]:
    """The questions of a file whose prompt fits max_prompt_len (the others are dropped and
    logged: one overlong question must not stop a run)."""
    questions = read_questions(path)
    encode = encode_prompt_fn(tokenizer, style)
    kept = [q for q in questions if len(encode(q.question)) <= max_prompt_len]
    if len(kept) < len(questions):
        logging.warning("%s: dropped %d question(s) whose prompt is over %d tokens", path,
                        len(questions) - len(kept), max_prompt_len)
    if not kept:
        raise ValueError(f"{path}: no question has a prompt of at most {max_prompt_len} tokens")
    return kept


def build_parts(config, with_train_questions: bool = True) -> tuple[Parts, Any]:
    """(parts, the initial fp32 params) of a (world-resolved) run config."""
    data = run_config.data_config(config)
    if not config.model.hf_dir:
        raise ValueError("config.model.hf_dir is empty: give a local (or gs://) HF checkpoint "
                         "directory, or set config.world.dir for the embedded synthetic world")
    if with_train_questions and not data.train_file:
        raise ValueError("config.data.train_file is empty")
    mesh = sharding.make_mesh(dict(config.mesh))
    model = hf_io.load_pretrained(config.model.hf_dir, mesh=mesh,
                                  **run_config.model_overrides(config))
    tokenizer = hf_io.load_tokenizer(config.model.hf_dir)
    table = stop_strings.stop_table_for_tokenizer(tokenizer, list(STOP_STRINGS),
                                                  vocab_size=model.config.vocab_size)
    sample_config = run_config.sampler_config(config)
    copy = sampling.sampling_copy(model, mesh)
    greedy = dataclasses.replace(sample_config, select=select.SelectConfig(greedy=True))
    graphdef, params = nnx.split(model)
    return Parts(
        graphdef=graphdef, tokenizer=tokenizer,
        eos_ids=hf_io.eos_token_ids(config.model.hf_dir, tokenizer),
        retriever=make_retriever(run_config.retriever_config(config)),
        sampler=sampling.Sampler(copy, sample_config, table, mesh),
        eval_sampler=sampling.Sampler(copy, greedy, table, mesh), mesh=mesh,
        train_questions=(load_questions(data.train_file, tokenizer, data.prompt_style,
                                        data.max_prompt_len) if with_train_questions else []),
        eval_questions=(load_questions(data.eval_file, tokenizer, data.prompt_style,
                                       data.max_prompt_len) if data.eval_file else [])), params


def rollout_batch(trajectories: Trajectories, rewards: np.ndarray, max_len: int,
                  mesh, keep: np.ndarray | None = None) -> RolloutBatch:
    """Host trajectories -> the train step's batch, padded to a bucketed length, rows over
    (data, fsdp). Every process holds the same host arrays and places its own shards.
    Rows where `keep` [B] is False (prompts dynamic sampling dropped) are left out of the loss
    by the batch's `keep` (the step clears their loss mask; the sampler/trainer mismatch
    metric still reads their sampled tokens)."""
    width = sampling.attend_bucket(trajectories.tokens.shape[1], MIN_TRAIN_LEN, max_len)

    def place(x):
        if x.ndim == 2:
            x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
        return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))

    return RolloutBatch(tokens=place(trajectories.tokens),
                        loss_mask=place(trajectories.loss_mask),
                        rewards=place(np.asarray(rewards, np.float32)),
                        sampler_logprobs=place(trajectories.sampler_logprobs),
                        keep=None if keep is None else place(np.asarray(keep, bool)))


def score(trajectories: Trajectories, questions: list[Question],
          config: rewards_lib.RewardConfig) -> tuple[np.ndarray, dict[str, float]]:
    """Per-row rewards [B] and their means (reward, format, F1, CEM)."""
    results = [rewards_lib.score(response, q.answers, config)
               for response, q in zip(trajectories.responses, questions)]
    values = np.array([r.reward for r in results], np.float32)
    return values, {"reward": float(values.mean()), "reward_std": float(values.std()),
                    "format_ok": float(np.mean([r.format_ok for r in results])),
                    "f1": float(np.mean([r.f1 for r in results])),
                    "cem": float(np.mean([r.cem for r in results]))}


class MetricsWriter:
    """Where a run's metrics go: what it leaves in its workdir and what a user sees while it runs.

    Process 0 writes one JSON line per record to <workdir>/metrics.jsonl (the record of the
    run: run_report and the sweep read it) and the same numbers as TensorBoard scalars,
    `<kind>/<metric>`, to <workdir>/tensorboard (tensorboardX: event files without
    TensorFlow). With progress it also draws a bar over the run's steps on stdout and prints a
    line per evaluation. Every process logs each record at INFO.
    """

    def __init__(self, workdir: epath.Path, progress: bool = False):
        self.path = workdir / "metrics.jsonl"
        self._writer = jax.process_index() == 0
        self._progress = progress and self._writer
        self._bar = None
        self._tensorboard = _summary_writer(workdir / "tensorboard") if self._writer else None

    def start_progress(self, total: int, initial: int, name: str) -> None:
        """The bar of a run of `total` steps, `initial` of them already done (a resume)."""
        if self._progress and self._bar is None:
            self._bar = tqdm.tqdm(total=total, initial=initial, desc=name, unit="step",
                                  file=sys.stdout, dynamic_ncols=True)

    def step_done(self, values: dict[str, float]) -> None:
        """Advances the bar by one rollout step, showing that step's headline numbers."""
        if self._bar is not None:
            shown = {name: f"{values[key]:.3f}" for key, name in
                     (("reward", "reward"), ("f1", "F1"), ("queries_per_row", "queries"))
                     if key in values}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        record = {"kind": kind, "step": step, **{k: round(float(v), 6) for k, v in values.items()}}
        shown = ", ".join(f"{k} {v:.3g}" for k, v in record.items() if k not in ("kind", "step"))
        if self._writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tensorboard is not None:
                for name, value in record.items():
                    if name not in ("kind", "step"):
                        self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
                # A run killed without notice keeps every record written so far.
                self._tensorboard.flush()
            if self._progress and kind != "train":
                tqdm.tqdm.write(f"{kind} step {step}: {shown}", file=sys.stdout)
        logging.info("%s step %d: %s", kind, step, shown)

    def close(self) -> None:
        """Ends the bar and the event file; the writer takes no more records."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _summary_writer(logdir: epath.Path):
    """A tensorboardX SummaryWriter, or None (with a warning) where it cannot write.

    tensorboardX writes gs:// only with google-cloud-storage installed; a pod run without it
    still trains and keeps metrics.jsonl rather than failing on its dashboard.
    """
    # tensorboardX imports torch when it is installed (seconds): only the writing process pays.
    import tensorboardX  # pylint: disable=import-outside-toplevel
    try:
        return tensorboardX.SummaryWriter(str(logdir))
    except ImportError as e:
        logging.warning("no TensorBoard event files in %s: %s", logdir, e)
        return None


def sample_for_eval(parts: Parts, params) -> None:
    """Points parts.eval_sampler at `params` (fp32 params of parts.graphdef's model)."""
    parts.eval_sampler.set_model(sampling.sampling_copy(nnx.merge(parts.graphdef, params),
                                                        parts.mesh))


def run_eval(parts: Parts, config, params, step: int,
             writer: MetricsWriter) -> dict[str, float]:
    """Greedy evaluation of params on the first train.eval_questions evaluation questions."""
    train_cfg = run_config.build(TrainConfig, config.train, "train")
    questions = parts.eval_questions[:train_cfg.eval_questions]
    if not questions:
        return {}
    sample_for_eval(parts, params)
    records = evaluation.evaluate(
        parts.eval_sampler, parts.tokenizer, parts.retriever, questions,
        encode_prompt_fn(parts.tokenizer, run_config.data_config(config).prompt_style),
        train_cfg.eval_batch_size, run_config.eval_rollout_config(config),
        reward_config=run_config.reward_config(config), eos_ids=parts.eos_ids)
    summary = evaluation.summarize(records)
    writer.write("eval", step, summary)
    return summary


def train(config) -> dict[str, Any]:
    """Runs (or resumes) the configured run; returns the last train and eval metrics and
    "stopped" (True when a signal stopped it: it saved, and a rerun resumes).

    A run whose workdir holds a checkpoint resumes from it. Otherwise, with
    config.model.init_from, it starts from the params of that run's latest checkpoint.

    Raises (among others):
      FileNotFoundError: init_from does not exist or holds no checkpoint; before the world build.
      ValueError: init_from holds another model's params (names the differing leaves);
        before any rollout.
      NonFiniteStepsError: more than train.max_nonfinite_share of the optimizer steps were
        skipped for a non-finite loss or gradient norm (from step train.nonfinite_min_steps).
      collapse.CollapseError: a collapse signal stayed past its bound (rl/collapse.py) and
        collapse.action is "stop".
    Either of the last two leaves the step it stops on unsaved.
    """
    train_cfg = run_config.build(TrainConfig, config.train, "train")
    workdir = epath.Path(train_cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_cfg = checkpoint_lib.CheckpointConfig(
        directory=str(workdir / "checkpoints"), save_every=train_cfg.save_every,
        max_to_keep=train_cfg.max_to_keep)
    with checkpoint_lib.Checkpointer(checkpoint_cfg) as own:
        init_from = _init_from(config, resuming=own.latest_step() is not None)
    config = resolve_world(config)
    rollout_cfg = run_config.rollout_config(config)
    reward_cfg = run_config.reward_config(config)
    data = run_config.data_config(config)
    parts, params = build_parts(config)
    total = train_cfg.steps or max(1, len(parts.train_questions) // train_cfg.prompts_per_step)
    rl = run_config.rl_config(config, rollout_steps=total)
    # Fail before any rollout.
    optimizer_steps = rl.steps_per_batch(train_cfg.prompts_per_step * rl.samples_per_prompt)
    collapse_cfg = run_config.build(collapse.CollapseConfig, config.get("collapse", {}),
                                    "collapse")
    writer = MetricsWriter(workdir, progress=train_cfg.progress)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    graphdef = parts.graphdef
    if init_from:
        # The HF weights make way for the checkpoint's, laid out on the same shardings.
        params, step_dir = restore_init_params(init_from, params)
        logging.info("started from step %s of %s (config.model.init_from): the initial policy "
                     "and the reference", step_dir.name, step_dir.parent)
    state = train_step_lib.make_init_fn(rl, params, parts.mesh)(params)
    train_step = train_step_lib.make_train_step(graphdef, state, rl, parts.mesh)
    # The reference policy is the run's initial policy (init copied it into the state): the
    # previous stage's final one with init_from. With kl_coef 0 it is never needed, and
    # dropping it frees its memory.
    reference = params if rl.uses_reference else None
    logprob_fn = (train_step_lib.make_logprob_fn(graphdef, rl, params, parts.mesh)
                  if rl.uses_reference else None)
    del params
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_cfg)
    start, position, history = 0, 0, []
    if checkpointer.latest_step() is not None:
        # The newest step that reads back whole; damaged newer ones are renamed aside, warned.
        state, meta, _ = checkpointer.restore_latest(jax.tree.map(abstract_like, state))
        start, position = meta["step"], meta["data_position"]
        history = meta.get("collapse_history", [])  # absent in checkpoints of older versions
        logging.info("resumed from %s at step %d (data position %d)", workdir / "checkpoints",
                     start, position)

    order = QuestionOrder(parts.train_questions, seed=train_cfg.seed, shuffle=data.shuffle)
    encode = encode_prompt_fn(parts.tokenizer, data.prompt_style)
    base_key = jax.random.key(train_cfg.seed)
    last = {"train": {}, "eval": {}, "stopped": False}
    writer.start_progress(total, start, workdir.name)
    if start == 0:
        last["eval"] = run_eval(parts, config, state.params, 0, writer)
    stop = _StopSignal()
    for step in range(start, total):
        if stop.agreed():
            checkpointer.save(step, state, {"step": step, "data_position": position,
                                            "collapse_history": history}, force=True)
            checkpointer.close()
            writer.close()
            logging.warning("stopped by signal %s after step %d; saved, and a rerun resumes here",
                            stop.received or "on another process", step)
            return {**last, "stopped": True}
        t0 = time.perf_counter()
        parts.sampler.set_model(sampling.sampling_copy(nnx.merge(graphdef, state.params),
                                                       parts.mesh))
        step_key = jax.random.fold_in(base_key, step)
        drawn = []  # the metrics of each draw of this step

        def draw() -> dynamic_sampling.Draw:
            """Rolls out and scores the next prompts of the data order (draw k > 0 of a step:
            dynamic sampling's refill, with its own key)."""
            nonlocal position
            prompt_questions = order.batch(position, train_cfg.prompts_per_step)
            position += train_cfg.prompts_per_step
            questions = expand_samples(prompt_questions, rl.samples_per_prompt)
            # Each prompt is tokenized once, then repeated for its samples.
            prompt_ids = expand_samples([encode(q.question) for q in prompt_questions],
                                        rl.samples_per_prompt)
            key = jax.random.fold_in(step_key, len(drawn)) if drawn else step_key
            trajectories = rollout(parts.sampler, parts.tokenizer, parts.retriever, prompt_ids,
                                   rollout_cfg, key, eos_ids=parts.eos_ids)
            rewards, reward_metrics = score(trajectories, questions, reward_cfg)
            if rl.overlong_buffer:
                # DAPO's |y|: the tokens the policy sampled (documents excluded).
                penalty = rewards_lib.trajectory_overlong_penalty(
                    trajectories, parts.sampler.config.max_len, rl.overlong_buffer,
                    rl.overlong_penalty)
                rewards = rewards + penalty
                reward_metrics["overlong_penalty"] = float(penalty.mean())
            # The http backend's queries that got the document "None" after failing (on_failure).
            take_retrieval = getattr(parts.retriever, "take_metrics", dict)
            drawn.append({**reward_metrics, **trajectories.metrics(), **take_retrieval()})
            return dynamic_sampling.Draw(trajectories, rewards)

        filled = dynamic_sampling.fill(draw, rl.dynamic_sampling, rl.samples_per_prompt,
                                       rl.dynamic_sampling_draws)
        t1 = time.perf_counter()
        batch = rollout_batch(filled.rows, filled.rewards, parts.sampler.config.max_len,
                              parts.mesh, keep=filled.keep)
        if logprob_fn is not None:
            batch = dataclasses.replace(batch, ref_logprobs=logprob_fn(reference, batch.tokens))
        state, step_metrics = train_step(state, batch)
        # Rollout and reward metrics are the first draw's: the step's prompts as the data order
        # gives them, unfiltered, so that runs with and without dynamic sampling compare.
        last["train"] = {**drawn[0], **filled.metrics, **jax.device_get(step_metrics),
                         "rollout_s": t1 - t0, "train_s": time.perf_counter() - t1,
                         "epoch": order.epoch_of(position)}
        history, derived, alarms = collapse.observe(history, last["train"], collapse_cfg)
        last["train"].update(derived, skipped_share=last["train"]["total_skipped"] / (
            (step + 1) * optimizer_steps))
        writer.step_done(last["train"])
        if (step + 1) % train_cfg.log_every == 0 or step + 1 == total:
            writer.write("train", step + 1, last["train"])
        error = _health_error(step + 1, last["train"], alarms, train_cfg, collapse_cfg)
        if error is not None:
            # The step that stops the run is not saved: the checkpoints keep the run before it.
            checkpointer.close()
            writer.close()
            raise error
        checkpointer.save(step + 1, state, {"step": step + 1, "data_position": position,
                                            "collapse_history": history},
                          force=step + 1 == total)
        if train_cfg.eval_every and (step + 1) % train_cfg.eval_every == 0 and step + 1 < total:
            last["eval"] = run_eval(parts, config, state.params, step + 1, writer)
    checkpointer.wait()
    if start < total:
        last["eval"] = run_eval(parts, config, state.params, total, writer)
    if train_cfg.export_hf:
        hf_io.save_pretrained(nnx.merge(graphdef, state.params), workdir / "hf",
                              eos_ids=parts.eos_ids)
        if jax.process_index() == 0:
            parts.tokenizer.save_pretrained(str(workdir / "hf"))
        logging.info("exported the policy to %s (for serving and evaluation)", workdir / "hf")
    checkpointer.close()
    writer.close()
    return last


def _health_error(step: int, metrics: dict[str, float], alarms: list[collapse.Alarm],
                  train_cfg: TrainConfig, collapse_cfg: collapse.CollapseConfig):
    """Logs rollout step `step`'s skipped optimizer steps and collapse alarms (a warning each);
    returns the error that stops the run (NonFiniteStepsError, collapse.CollapseError), or None.
    Its inputs are the same on every process (metrics of the jitted step, rewards of the same
    host rows), so every process stops on the same step."""
    skipped, share = int(metrics["skipped_steps"]), metrics["skipped_share"]
    if skipped:
        logging.warning("step %d: %d of %d optimizer steps skipped for a non-finite loss or "
                        "gradient norm (loss %s, grad_norm %s): params and optimizer state kept "
                        "as they were; %.1f%% of the run's optimizer steps skipped so far",
                        step, skipped, int(metrics["optimizer_steps"]), metrics["loss"],
                        metrics["grad_norm"], 100 * share)
    for alarm in alarms:
        logging.warning("step %d: %s", step, alarm.message)
    if step >= train_cfg.nonfinite_min_steps and share > train_cfg.max_nonfinite_share:
        return NonFiniteStepsError(
            f"step {step}: {int(metrics['total_skipped'])} of the run's optimizer steps "
            f"({100 * share:.1f}%) were skipped for a non-finite loss or gradient norm, more than "
            f"config.train.max_nonfinite_share={train_cfg.max_nonfinite_share}; the run stops, "
            f"this step unsaved (look for NaN/Inf in the rewards, a too high learning rate, or "
            f"a damaged checkpoint)")
    if alarms and collapse_cfg.action == "stop":
        return collapse.CollapseError(
            f"step {step}: stopped by config.collapse.action='stop', this step unsaved: "
            + "; ".join(alarm.message for alarm in alarms))
    return None


def _init_from(config, resuming: bool) -> str:
    """config.model.init_from when this run starts from it ("" otherwise), checked to hold a
    checkpoint before anything is built: a run's own checkpoint wins (a preempted stage 2
    resumes where it stopped, not from stage 1 again)."""
    init_from = run_config.model_source(config).init_from
    if init_from and resuming:
        logging.info("config.model.init_from=%s is not used: the run resumes from its own "
                     "checkpoint", init_from)
        return ""
    if init_from:
        with _naming(init_from):
            checkpoint_lib.latest_checkpoint(init_from)
    return init_from


@contextlib.contextmanager
def _naming(init_from: str):
    """Errors about init_from's checkpoint say which config key they come from."""
    try:
        yield
    except (FileNotFoundError, ValueError, checkpoint_lib.CheckpointDamagedError) as error:
        raise type(error)(f"config.model.init_from={init_from}: {error}") from error


def restore_init_params(init_from: str, params):
    """(params of init_from's latest step laid out like `params`, that step's directory).
    Raises what checkpoint.restore_params raises, naming config.model.init_from."""
    abstract = jax.tree.map(abstract_like, params)
    with _naming(init_from):
        return checkpoint_lib.restore_params(init_from, abstract)


def evaluated_params(config, parts: Parts, params):
    """The params a tool (evaluate.py, ask.py) runs: those of config.model.init_from's latest
    checkpoint when it is set, loaded into parts.eval_sampler, else `params` (the HF
    weights, already there). Returns (params, that checkpoint's step directory or None).
    Raises what restore_init_params raises."""
    init_from = run_config.model_source(config).init_from
    if not init_from:
        return params, None
    params, step_dir = restore_init_params(init_from, params)
    sample_for_eval(parts, params)
    logging.warning("evaluating the params of %s", step_dir)
    return params, step_dir


class _StopSignal:
    """Records SIGTERM (a preempted TPU VM or a cluster scheduler's notice) so the loop can
    checkpoint after the step in flight and exit cleanly instead of dying mid-step."""

    def __init__(self):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any process has received the signal, the same answer on every process.

        Hosts of a pod see a preemption notice at different moments; a process that
        stopped alone would save while the others wait in the next rollout's
        collectives, and the pod would hang instead of saving. One all-gather of a
        flag at the top of each step makes every process stop on the same step.
        """
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


def abstract_like(x):
    """A ShapeDtypeStruct of array x, on its sharding: what a restore is asked for."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
