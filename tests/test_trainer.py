"""The RL loop end to end on the world's tiny model: metrics, checkpoints, resume, export,
and the hand-off from one stage to the next."""
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from searcher_jax import checkpoint as checkpoint_lib
from searcher_jax import run_config, trainer
from searcher_jax.model import hf_io
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.train_step import init_train_state
from tests.conftest import REPO_ROOT


def load_config(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def tiny_run(world_dir, workdir, steps: int):
    config = load_config("demo")
    config.world.dir = str(world_dir)
    config.mesh.update(data=2, fsdp=2, tensor=2)  # the 8 test devices: a sharded run
    # A short buffer, as the RL tests' runs (tests/rl) use: these runs' time is mostly
    # compiles, a short buffer has fewer attend buckets, and the same shapes are compiled
    # once for them all. It truncates some answers (format share 0.375 to 0.75 here).
    config.sampler.update(max_len=256, segment_len=64)
    config.rollout.max_retrievals = 2
    config.eval_rollout.max_retrievals = 2
    # The continuous schedule's rows decode beside whichever rows their searches' return
    # times put there; the batch-invariant sampler makes a rerun's numbers equal bit for bit.
    config.sampler.batch_invariant = True
    config.rl.update(samples_per_prompt=4, mini_batch_size=4, micro_batch_size=4)
    config.train.update(workdir=str(workdir), steps=steps, prompts_per_step=2, eval_every=0,
                        eval_questions=4, eval_batch_size=4, save_every=1)
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


STEPS = 3
# Not results: wall times, and the slot utilisation of the continuous schedule (when each
# search returns decides which rows decode together).
TIMING = ("rollout_s", "train_s", "slot_utilisation")


@pytest.fixture(scope="module")
def first_run(world_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = trainer.train(tiny_run(world_model_dir, workdir, steps=STEPS))
    return workdir, result


def test_a_run_logs_trains_evaluates_and_exports(first_run, world_paths):
    workdir, result = first_run
    records = read_metrics(workdir)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    train = records[1]
    assert train["optimizer_steps"] == 2 and train["skipped_steps"] == 0  # 8 rows / 4 per step
    assert -2.0 <= train["reward"] <= 1.0 and 0 <= train["format_ok"] <= 1
    assert np.isfinite(train["loss"]) and train["grad_norm"] > 0
    assert result["eval"]["questions"] == 4
    # The export is a HF checkpoint of the trained (changed) policy, with its tokenizer.
    exported = hf_io.load_pretrained(workdir / "hf")
    initial = hf_io.load_pretrained(world_paths.model_dir)
    assert not np.allclose(np.asarray(exported.embed[...]), np.asarray(initial.embed[...]))
    assert hf_io.load_tokenizer(workdir / "hf").eos_token_id is not None
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    # Every end-of-sequence id of the base model travels with the exported policy.
    assert (hf_io.eos_token_ids(workdir / "hf")
            == hf_io.eos_token_ids(world_paths.model_dir, hf_io.load_tokenizer(world_paths.model_dir)))


def _saved(workdir, step: int):
    """(state as host arrays, meta) of a saved step, read back with Orbax as it was written."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    path = workdir / "checkpoints" / str(step)
    state = ocp.PyTreeCheckpointer().restore(path / "state")
    meta = json.loads((path / "meta" / "metadata").read_text())
    return jax.tree.map(np.asarray, state), meta


# Run in a subprocess: stalls the commit of step KILL_AT's checkpoint (its files written, not
# yet renamed from orbax's temporary folder) and writes a marker, so the test can SIGKILL the
# process in the middle of that asynchronous save.
KILL_AT = STEPS
_STALLED_SAVE = """
import asyncio, pathlib, sys
from orbax.checkpoint._src.path import atomicity
from searcher_jax import trainer
from tests.test_trainer import tiny_run
world, workdir, step = sys.argv[1:]
commit = atomicity.AtomicRenameTemporaryPath.finalize
async def stalled(self):
    if self._final_path.name == step:
        (pathlib.Path(workdir) / "saving").write_text(str(self.get()))
        await asyncio.sleep(3600)
    return await commit(self)
atomicity.AtomicRenameTemporaryPath.finalize = stalled
trainer.train(tiny_run(world, pathlib.Path(workdir), steps=int(step)))
"""


def test_a_run_killed_while_saving_resumes_and_equals_the_uninterrupted_run(
        first_run, world_model_dir, tmp_path, caplog):
    """A run preempted right after saving step 2 is resumed with the same config and killed
    (SIGKILL) while its asynchronous save of step 3 is being written; then its step 2 is found
    damaged (array files truncated). The next start warns of the unfinished save, renames step
    2 aside (kept, with a warning naming it), resumes from step 1, the last complete
    checkpoint, and ends where the uninterrupted run ended: params, Adam state, data position
    and metrics equal bit for bit on CPU."""
    workdir, _ = first_run
    resumed = tmp_path / "resumed"
    for step in (1, 2):
        shutil.copytree(workdir / "checkpoints" / str(step), resumed / "checkpoints" / str(step))
    records = read_metrics(workdir)
    kept = [r for r in records if r["step"] <= 2 and r["kind"] == "train" or r["step"] == 0]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    process = subprocess.Popen(
        [sys.executable, "-c", _STALLED_SAVE, str(world_model_dir), str(resumed), str(KILL_AT)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (resumed / "saving").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "the save of the last step did not start in 300 s"
        time.sleep(0.2)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    unfinished = pathlib.Path((resumed / "saving").read_text())
    assert unfinished.is_dir() and unfinished.name.startswith(f"{KILL_AT}.orbax-checkpoint-tmp")
    checkpoints = resumed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["1", "2"]
    arrays = [p for p in (checkpoints / "2" / "state").rglob("*") if p.parent.name == "d"]
    for path in arrays:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    damaged = {p.relative_to(checkpoints / "2"): p.read_bytes()
               for p in (checkpoints / "2").rglob("*") if p.is_file()}

    with caplog.at_level(logging.WARNING):
        trainer.train(tiny_run(world_model_dir, resumed, steps=STEPS))
    assert f"{unfinished} is an unfinished save" in caplog.text
    assert re.search(rf"checkpoint step 2 in {re.escape(str(checkpoints))} is damaged and was "
                     rf"renamed aside to {re.escape(str(checkpoints / '2.damaged'))} .*resuming "
                     rf"from step 1", caplog.text)
    assert {p.relative_to(checkpoints / "2.damaged"): p.read_bytes()
            for p in (checkpoints / "2.damaged").rglob("*") if p.is_file()} == damaged
    again = read_metrics(resumed)
    # The killed process logged step 3 before its save began, and the rerun logs steps 2 and
    # 3 again: the same records.
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in kept] + [
        ("train", 3), ("train", 2), ("train", 3), ("eval", 3)]
    rerun = again[:2] + again[-3:]
    for one, two in zip(records, rerun, strict=True):
        assert {k: v for k, v in one.items() if k not in TIMING} == {
            k: v for k, v in two.items() if k not in TIMING}
    (state, meta), (state_again, meta_again) = _saved(workdir, STEPS), _saved(resumed, STEPS)
    assert meta == meta_again and meta["data_position"] == STEPS * 2
    assert set(state) == {"params", "opt_state", "step", "skipped"}
    assert jax.tree.structure(state) == jax.tree.structure(state_again)
    for path, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(state)),
                          jax.tree.leaves(state_again)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _no_rollouts(monkeypatch):
    """Makes any rollout (training or evaluation) fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a rollout ran before the init_from check")
    monkeypatch.setattr(trainer, "rollout", refuse)
    monkeypatch.setattr(trainer.evaluation, "rollout", refuse)


def test_stage_2_starts_from_stage_1s_checkpoint_as_policy_and_reference(
        first_run, world_model_dir, tmp_path, caplog):
    """SPEC section 4: stage 2's initial policy and reference are stage 1's final policy, read
    from stage 1's Orbax checkpoints (DESIGN.md point 8), so its first mini-batch has KL 0 to
    the reference and clips nothing."""
    stage1, _ = first_run
    config = tiny_run(world_model_dir, tmp_path, steps=3)
    config.model.init_from = str(stage1)
    # KL 1e-4 loads a reference. One mini-batch of all 8 rows a step: step 1's metrics are its
    # first mini-batch's. A learning rate that moves the policy, so that step 2 shows the
    # reference stays stage 1's policy instead of following the trained one.
    # 8 samples a prompt, so that a group whose rewards all tie (no update) is unlikely.
    config.rl.update(kl_coef=1e-4, samples_per_prompt=8, mini_batch_size=16,
                     micro_batch_size=8, learning_rate=3e-3)
    config.train.export_hf = False
    with caplog.at_level(logging.INFO):
        result = trainer.train(config)
    assert f"started from step {STEPS} of {stage1 / 'checkpoints'}" in caplog.text
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    first = records[1]  # rounded to 1e-6 in metrics.jsonl
    assert first["optimizer_steps"] == 1 and first["skipped_steps"] == 0
    assert first["ref_kl_mean"] == 0.0 and first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    # After the first step that moved the policy (a step whose groups all tie moves nothing:
    # CI drew one), the KL to the fixed reference is no longer 0.
    trains = [r for r in records if r["kind"] == "train"]
    moved = next(i for i, r in enumerate(trains) if r["grad_norm"] > 0)
    assert moved < len(trains) - 1, trains
    assert abs(trains[moved + 1]["ref_kl_mean"]) > 1e-5
    # Its greedy evaluation before training is stage 1's final one: the same policy.
    stage1_final_eval = read_metrics(stage1)[-1]
    assert stage1_final_eval["step"] == STEPS and records[0] == {**stage1_final_eval, "step": 0}
    # A new run: its own optimizer step count and data position, not stage 1's.
    start, meta = _saved(tmp_path, 1)
    assert int(start["step"]) == 1 and meta["data_position"] == 2


def test_evaluate_and_ask_run_init_froms_params(first_run, world_model_dir, tmp_path):
    """launch/evaluate.py and launch/ask.py with --config.model.init_from=<workdir> run that
    run's latest checkpoint (its params as Orbax wrote them), not the HF weights."""
    stage1, _ = first_run
    config = trainer.resolve_world(tiny_run(world_model_dir, tmp_path, steps=1))
    parts, hf_params = trainer.build_parts(config, with_train_questions=False)
    same, step_dir = trainer.evaluated_params(config, parts, hf_params)
    assert same is hf_params and step_dir is None

    config.model.init_from = str(stage1)
    params, step_dir = trainer.evaluated_params(config, parts, hf_params)
    assert step_dir == stage1 / "checkpoints" / str(STEPS)
    saved = _saved(stage1, STEPS)[0]["params"]
    sampled = parts.eval_sampler.params
    moved = 0
    for (path, leaf), hf_leaf, sampler_leaf in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(hf_params),
            jax.tree.leaves(sampled)):
        expected = np.asarray(_leaf_at(saved, path))
        np.testing.assert_array_equal(np.asarray(leaf), expected, jax.tree_util.keystr(path))
        np.testing.assert_array_equal(np.asarray(sampler_leaf, np.float32), expected)
        moved += not np.array_equal(np.asarray(hf_leaf), expected)
    assert moved > 0   # stage 1's training moved the weights away from the HF ones


def _leaf_at(tree, path):
    """The leaf of a restored Orbax tree (nested dicts) at an nnx.State leaf's path."""
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):   # the Variable's `.value`
            if isinstance(tree, dict) and key.name in tree:
                tree = tree[key.name]
            continue
        name = key.key if isinstance(key, jax.tree_util.DictKey) else key.idx
        tree = tree[name] if name in tree else tree[str(name)]
    return tree


def test_init_from_another_architecture_fails_before_any_rollout(
        world_model_dir, world_paths, tmp_path, monkeypatch):
    other = tmp_path / "other_stage"
    model_config = dataclasses.replace(
        hf_io.load_config(world_paths.model_dir, dtype="float32", scan_layers=False, remat=False),
        num_layers=1, intermediate_size=256)
    params = nnx.split(Decoder(model_config, rngs=nnx.Rngs(0)))[1]
    rl = RLConfig(samples_per_prompt=4, mini_batch_size=4, micro_batch_size=4, total_steps=1)
    with checkpoint_lib.Checkpointer(checkpoint_lib.CheckpointConfig(
            str(other / "checkpoints"), save_every=1)) as checkpointer:
        checkpointer.save(5, init_train_state(params, rl), {"step": 5, "data_position": 10})
    _no_rollouts(monkeypatch)
    config = tiny_run(world_model_dir, tmp_path / "run", steps=1)
    config.model.init_from = str(other)
    with pytest.raises(ValueError,
                       match=r"config.model.init_from=.*params of another model") as error:
        trainer.train(config)
    message = str(error.value)
    assert str(other / "checkpoints" / "5") in message
    assert re.search(r"layers/0/mlp/\w+/\w+: saved float32\[.*256.*\], expected float32\[.*384.*\]",
                     message)
    assert re.search(r"layers/1/.*not in the checkpoint", message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_init_from_without_a_checkpoint_fails_before_the_world_build(
        world_model_dir, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the world was built before the init_from check")
    monkeypatch.setattr(trainer.synthetic_build, "build", no_build)
    empty = tmp_path / "empty_stage"
    empty.mkdir()
    for init_from, reason in ((empty, "no checkpoint in"), (tmp_path / "typo", "no such directory")):
        config = tiny_run(world_model_dir, tmp_path / "run", steps=1)
        config.model.init_from = str(init_from)
        with pytest.raises(FileNotFoundError, match=f"config.model.init_from="
                                                    f"{re.escape(str(init_from))}: .*{reason}"):
            trainer.train(config)
    assert not (tmp_path / "typo").exists()


def test_a_run_with_its_own_checkpoint_resumes_and_ignores_init_from(
        first_run, world_model_dir, tmp_path, caplog):
    """A preempted stage 2 resumes where it stopped, not from stage 1 again: with its own
    checkpoint, init_from (here a path that would fail) is not read."""
    workdir, _ = first_run
    shutil.copytree(workdir / "checkpoints" / str(STEPS),
                    tmp_path / "checkpoints" / str(STEPS))
    config = tiny_run(world_model_dir, tmp_path, steps=STEPS)
    config.model.init_from = str(tmp_path / "no_such_stage")
    config.train.export_hf = False
    with caplog.at_level(logging.INFO):
        result = trainer.train(config)
    assert "is not used: the run resumes from its own checkpoint" in caplog.text
    assert f"at step {STEPS} (data position {STEPS * 2})" in caplog.text
    # Nothing left to do after step 3 of 3.
    assert result == {"train": {}, "eval": {}, "stopped": False}


def test_rows_that_do_not_split_fail_before_any_rollout(world_model_dir, tmp_path):
    config = tiny_run(world_model_dir, tmp_path, steps=1)
    config.rl.mini_batch_size = 3
    with pytest.raises(ValueError, match="mini_batch_size"):
        trainer.train(config)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_misspelt_train_key_says_where(world_model_dir, tmp_path):
    config = tiny_run(world_model_dir, tmp_path, steps=1)
    config.train.stpes = 3
    with pytest.raises(ValueError, match=r"config.train: unknown key\(s\) \['stpes'\]"):
        trainer.train(config)


@pytest.mark.parametrize("name, args, estimator, rows_per_step", [
    ("stage2", (), "reinforce_baseline", 256),
    ("stage2", ("llama",), "reinforce_baseline", 260),
    ("stage1", (), "grpo", 60),
    ("stage1", ("paper",), "grpo", 60),
    ("demo", (), "reinforce_baseline", 32),
])
def test_configs_build_every_part(name, args, estimator, rows_per_step):
    config = load_config(name, *args)
    rl = run_config.rl_config(config, rollout_steps=10)
    assert rl.estimator == estimator and rl.mini_batch_size == rows_per_step
    rows = config.train.prompts_per_step * rl.samples_per_prompt
    assert rl.steps_per_batch(rows) >= 1
    for part in (run_config.sampler_config, run_config.rollout_config, run_config.data_config,
                 run_config.reward_config, run_config.retriever_config):
        part(config)
    run_config.build(trainer.TrainConfig, config.train, "train")


def _tpu_pod(*args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "tpu_pod.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False,
                          cwd=tmp_path)


def test_the_main_entry_rejects_a_misspelt_override(tmp_path):
    result = _tpu_pod("--config.rl.estimater=grpo", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "estimater" in result.stderr


def test_sigterm_checkpoints_the_step_in_flight_and_a_rerun_resumes(world_model_dir, tmp_path):
    """A preempted run saves after the step it is in and exits 0, without going on to the
    next stage; the rerun continues."""
    args = [f"--config.world.dir={world_model_dir}", "--config.train.workdir=run",
            "--config.stages.stage1_steps=50", "--config.train.steps=50", "--config.train.prompts_per_step=2",
            "--config.rl.samples_per_prompt=4", "--config.rl.mini_batch_size=8",
            "--config.rl.micro_batch_size=8", "--config.train.eval_questions=0",
            "--config.sampler.max_len=512", "--config.sampler.segment_len=64",
            "--config.rollout.max_retrievals=1", "--config.train.save_every=100"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "tpu_pod.py"), *args],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run" / "stage1"
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stderr
    done = len(read_metrics(run))
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert 1 <= done < 50 and saved == [done]
    assert not (run / "hf").exists()  # no export of an unfinished run
    assert not (tmp_path / "run" / "stage2").exists()  # and no next stage
