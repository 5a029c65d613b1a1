"""configs/base.py builds every part's static configuration; bad keys say where."""
import importlib.util

import pytest

from searcher_jax import run_config
from tests.conftest import REPO_ROOT


def _load_base():
    spec = importlib.util.spec_from_file_location("base", REPO_ROOT / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_base_config_builds_the_released_qwen_recipe():
    config = _load_base()
    sampler = run_config.sampler_config(config)
    assert sampler.select.top_p == 0.95 and sampler.segment_len == 512
    rl = run_config.rl_config(config, rollout_steps=127)
    assert rl.total_steps == 127 * 64 * 16 // 256  # the schedule spans the run
    assert rl.estimator == "reinforce_baseline" and rl.kl_coef == 0 and not rl.uses_reference
    assert (rl.adam_b1, rl.adam_b2, rl.learning_rate) == (0.9, 0.95, 2e-6)
    assert run_config.reward_config(config).format_penalty == -2.0
    assert run_config.rollout_config(config).top_k == 3
    assert run_config.rollout_config(config).max_retrievals == 8
    assert run_config.eval_rollout_config(config) == run_config.RolloutConfig(9, 5)
    assert run_config.model_overrides(config) == {"dtype": "bfloat16", "scan_layers": True,
                                                  "remat": True}


def test_overrides_reach_the_dataclasses_and_typos_fail_clearly():
    config = _load_base()
    config.rl.estimator = "grpo"
    assert run_config.rl_config(config, rollout_steps=1).estimator == "grpo"
    config.rl.estimator = "ppo2"
    with pytest.raises(ValueError, match="RLConfig.estimator='ppo2' is not one of"):
        run_config.rl_config(config, rollout_steps=1)
    config.reward.unknown_field = 1
    with pytest.raises(ValueError, match=r"config.reward: unknown key\(s\) \['unknown_field'\]"):
        run_config.reward_config(config)
