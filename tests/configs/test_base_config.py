"""configs/base.py builds every part's static configuration; bad keys say where."""
import dataclasses
import importlib.util

import pytest
from absl import flags
from ml_collections import config_flags

from searcher_jax import run_config, trainer
from searcher_jax.synthetic import build as synthetic_build
from searcher_jax.synthetic import world_files
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
    # The continuous schedule in training and evaluation: faster than barrier rounds in
    # every case measured (README, Benchmarks); the sampler is not batch-invariant.
    assert run_config.rollout_config(config).schedule == "continuous"
    assert run_config.eval_rollout_config(config) == run_config.RolloutConfig(
        9, 5, schedule="continuous")
    assert not run_config.sampler_config(config).batch_invariant
    assert run_config.model_overrides(config) == {"dtype": "bfloat16", "scan_layers": True,
                                                  "remat": True, "attention": "auto",
                                                  "attention_block": 512}
    assert run_config.model_source(config) == run_config.ModelSource(hf_dir="", init_from="")


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


def test_a_misspelt_model_key_names_init_from_among_the_valid_ones():
    config = _load_base()
    config.model.init_form = "runs/stage1"
    for part in (run_config.model_source, run_config.model_overrides):
        with pytest.raises(ValueError, match=r"config.model: unknown key\(s\) \['init_form'\]; "
                                             r"valid keys: \[.*'init_from'"):
            part(config)


def _parse(*overrides):
    """configs/base.py with command-line overrides, through the launchers' own flag."""
    argv = ["tpu_pod.py", *overrides]
    flag_values = flags.FlagValues()
    # config_flags finds the override flags in the argv it is given when defined.
    config_flags.DEFINE_config_file("config", str(REPO_ROOT / "configs" / "base.py"),
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_seeds_come_from_the_command_line():
    preset_world, preset_pretrain = synthetic_build.PRESETS["demo"]
    # Unset: the preset's world exactly, so build.py's fingerprints reuse an existing build.
    assert run_config.world_source(_parse()).configs() == (preset_world, preset_pretrain)
    config = _parse("--config.world.seed=7", "--config.train.seed=3",
                    "--config.model.init_from=runs/stage1")
    world, pretrain = run_config.world_source(config).configs()
    assert world == dataclasses.replace(preset_world, seed=7) != preset_world
    assert pretrain == preset_pretrain
    assert run_config.build(trainer.TrainConfig, config.train, "train").seed == 3
    assert run_config.model_source(config).init_from == "runs/stage1"
    with pytest.raises(ValueError, match="config.world.preset must be one of"):
        run_config.world_source(_parse("--config.world.preset=huge"))


def test_another_world_seed_draws_another_world():
    """What the build writes first (the world's names and facts) changes with the seed."""
    names = []
    for seed in ((), ("--config.world.seed=7",)):
        world, _ = run_config.world_source(_parse("--config.world.preset=ci", *seed)).configs()
        names.append(world_files.generate_world(world).train.names())
    assert names[0] != names[1]
