"""launch/sweep.py: one run per combination, a table, and a rerun that skips finished runs."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "launch"))
import sweep  # noqa: E402  pylint: disable=wrong-import-position


def test_axis_parsing_and_names():
    assert sweep.parse_axis("rl.estimator=grpo,reinforce_pp") == ("rl.estimator",
                                                                 ["grpo", "reinforce_pp"])
    with pytest.raises(ValueError, match="section.field=value1"):
        sweep.parse_axis("rl.estimator")
    assert sweep.run_name({"rl.estimator": "grpo", "rl.learning_rate": "1e-4"}) == \
        "estimator-grpo_learning_rate-1e-4"


def test_a_two_run_sweep(world_model_dir, tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, str(REPO_ROOT / "launch" / "sweep.py"), f"--out={out}",
               "--sweep=rl.estimator=reinforce_baseline,grpo", "--",
               f"--config.world.dir={world_model_dir}", "--config.train.steps=1",
               "--config.stages.enabled=false",   # one run each, not the demo's two stages
               "--config.train.prompts_per_step=2", "--config.rl.samples_per_prompt=4",
               "--config.rl.mini_batch_size=8", "--config.rl.micro_batch_size=8",
               "--config.train.eval_questions=0", "--config.sampler.max_len=512",
               "--config.sampler.segment_len=64", "--config.rollout.max_retrievals=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                           check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [row["rl.estimator"] for row in summary] == ["reinforce_baseline", "grpo"]
    assert all(-2 <= row["train_reward"] <= 1 for row in summary)
    assert "| estimator-grpo |" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                           check=False)
    assert again.returncode == 0 and "running" not in again.stdout  # both runs were done
