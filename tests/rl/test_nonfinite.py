"""Non-finite losses and collapse in a real tiny run (the world's tiny model, the sharded
trainer of test_trainer.py), at a learning rate of 0.1, which wrecks the policy in one step.

Rewards are NaN at rollout step 2 (what a broken reward function, or a judge that answers
garbage, hands the step). One run of 3 steps serves every test here, to keep the suite's time
(collapse.action "stop", patience 2; at most half of the optimizer steps skipped, from step 2):
step 1 trains; step 2 is skipped (checkpoint 2 equals checkpoint 1 bit for bit, the metrics
and a warning say so), its share of skipped steps (2 of 4) not over the bound; the wrecked
policy's format collapse, seen at steps 2 and 3, is warned of at step 3 and stops the run with
CollapseError, step 3 unsaved. The stop on too many skipped steps is the same path in the
trainer, checked here on its function. That a resumed run restores the collapse history is in
test_trainer.py (a resumed run logs what the uninterrupted run logged, the trend included).
"""
import logging

import jax
import numpy as np
import pytest

from searcher_jax import trainer
from searcher_jax.rl import collapse
from tests.test_trainer import _saved, read_metrics, tiny_run

POISONED = (2,)  # rollout steps (from 1) whose rewards are NaN


def _config(world, workdir):
    config = tiny_run(world, workdir, steps=3)
    # tiny_run's short buffer truncates some answers, so that the policy's format share is
    # 0.375 before the collapse (0.875 at a 512-token buffer): the format bound is scaled down
    # with it.
    config.rl.learning_rate = 0.1
    config.train.update(eval_questions=0, export_hf=False, progress=False,
                        max_nonfinite_share=0.5, nonfinite_min_steps=2)
    config.collapse.update(action="stop", patience=2, max_format_drop=0.25)
    return config


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(config, poisoned=()):
    """(the error that stopped the run, the warnings it logged)."""
    calls = []
    score = trainer.score

    def poisoning_score(trajectories, questions, reward_config):
        rewards, metrics = score(trajectories, questions, reward_config)
        calls.append(None)
        return (np.full_like(rewards, np.nan) if len(calls) in poisoned else rewards), metrics

    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "score", poisoning_score)
            with pytest.raises(RuntimeError) as stopped:
                trainer.train(config)
    finally:
        logging.getLogger().removeHandler(handler)
    return stopped.value, handler.messages


@pytest.fixture(scope="module")
def poisoned_run(world_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("poisoned")
    error, warnings = _train(_config(world_model_dir, workdir), POISONED)
    return workdir, error, warnings


def test_a_non_finite_step_is_skipped_and_reported(poisoned_run):
    workdir, _, warnings = poisoned_run
    records = [r for r in read_metrics(workdir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [(r["skipped_steps"], r["total_skipped"]) for r in records] == [(0, 0), (2, 2), (0, 2)]
    assert [r["skipped_share"] for r in records] == [0, 0.5, pytest.approx(2 / 6, abs=1e-6)]
    assert np.isfinite(records[0]["loss"]) and np.isnan(records[1]["loss"])
    (one, meta_one), (two, meta_two) = _saved(workdir, 1), _saved(workdir, 2)
    assert (int(one["step"]), int(one["skipped"])) == (2, 0)  # step 1's 2 updates applied
    assert (int(two["step"]), int(two["skipped"])) == (2, 2)  # step 2's skipped
    assert meta_two["data_position"] > meta_one["data_position"]
    for name in ("params", "opt_state"):
        leaves = zip(*(_leaves(tree[name]) for tree in (one, two)))
        for (path, a), (_, b) in leaves:
            np.testing.assert_array_equal(a, b, err_msg=f"{name}{path}")
    assert any(w.startswith("step 2: 2 of 2 optimizer steps skipped for a non-finite loss or "
                            "gradient norm") and "kept as they were" in w for w in warnings)


def _leaves(tree):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_a_run_skipping_too_many_steps_stops_with_a_clear_error():
    """The trainer's check after each step (the real run above stays under its bound)."""
    config = trainer.TrainConfig(max_nonfinite_share=0.5, nonfinite_min_steps=3)
    metrics = {"skipped_steps": 2, "optimizer_steps": 2, "total_skipped": 4, "loss": np.nan,
               "grad_norm": np.nan}
    assert trainer._health_error(2, {**metrics, "skipped_share": 1.0}, [], config,
                                 collapse.CollapseConfig()) is None  # before step 3
    assert trainer._health_error(4, {**metrics, "skipped_share": 0.5}, [], config,
                                 collapse.CollapseConfig()) is None  # not over the share
    error = trainer._health_error(3, {**metrics, "skipped_share": 4 / 6}, [], config,
                                  collapse.CollapseConfig())
    assert isinstance(error, trainer.NonFiniteStepsError)
    assert str(error).startswith(
        "step 3: 4 of the run's optimizer steps (66.7%) were skipped for a non-finite loss or "
        "gradient norm, more than config.train.max_nonfinite_share=0.5; the run stops, this "
        "step unsaved")
    with pytest.raises(ValueError, match=r"config.train.max_nonfinite_share must be in \[0, 1\]"):
        trainer.TrainConfig(max_nonfinite_share=1.5)


def test_a_wrecked_policy_is_warned_of_as_collapse(poisoned_run):
    workdir, _, warnings = poisoned_run
    records = [r for r in read_metrics(workdir) if r["kind"] == "train"]
    # lr 0.1: after step 1's update the policy no longer writes the format.
    assert records[0]["format_ok"] > 0.25 and records[0]["format_ok_drop"] == 0
    assert all(r["format_ok_drop"] > 0.25 for r in records[1:])
    collapse_warnings = [w for w in warnings if "training collapse?" in w]
    assert collapse_warnings and all(w.startswith("step 3: ") for w in collapse_warnings)
    assert any("format_ok_drop" in w and "above its bound 0.25 (config.collapse.max_format_drop) "
               "for 2 consecutive steps" in w for w in collapse_warnings)
    # Every signal is logged every step (the length trend from step 2).
    for r in records:
        assert {"entropy", "positive_logp_mean", "positive_rows", "sampled_tokens",
                "format_ok", "format_ok_drop"} <= set(r)
    assert all("response_length_trend" in r for r in records[1:])


def test_collapse_with_action_stop_stops_the_run_with_a_clear_error(poisoned_run):
    workdir, error, _ = poisoned_run
    assert isinstance(error, collapse.CollapseError)
    assert str(error).startswith("step 3: stopped by config.collapse.action='stop', this step "
                                 "unsaved: training collapse? format_ok_drop")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [1, 2]
