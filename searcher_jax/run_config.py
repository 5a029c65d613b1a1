"""From an ml_collections run config (configs/*.py) to the frozen dataclasses of each part.

A run config has one section per part: `model`, `mesh`, `sampler`, `retriever`,
`rollout`, `eval_rollout`, `rl`, `reward`, `data` and `train` (plus `world`, which
builds the embedded synthetic world and points the others at it). Each section's keys are the fields of that part's static
configuration, so `--config.rl.estimator=grpo` reaches `RLConfig.estimator`
and a misspelt key fails here with the section and the valid names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from searcher_jax.data.config import DataConfig
from searcher_jax.retrieval.retriever import RetrieverConfig
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.rewards import RewardConfig
from searcher_jax.rollout import RolloutConfig
from searcher_jax.sampling.sampler import SamplerConfig
from searcher_jax.sampling.select import SelectConfig

MODEL_RUN_FIELDS = ("dtype", "scan_layers", "remat")


def defaults(cls) -> dict[str, Any]:
    """A dataclass's fields and defaults as a plain dict (a config section)."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default)}


def build(cls, section: Mapping[str, Any], name: str):
    """cls(**section), with an error that names the section and its valid keys."""
    section = dict(section)
    unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"config.{name}: unknown key(s) {unknown}; valid keys: "
                         f"{sorted(f.name for f in dataclasses.fields(cls))}")
    return cls(**section)


def sampler_config(config) -> SamplerConfig:
    section = dict(config.sampler)
    select_keys = {f.name for f in dataclasses.fields(SelectConfig)}
    select = build(SelectConfig, {k: v for k, v in section.items() if k in select_keys},
                   "sampler")
    rest = {k: v for k, v in section.items() if k not in select_keys}
    return build(SamplerConfig, {**rest, "select": select}, "sampler")


def retriever_config(config) -> RetrieverConfig:
    return build(RetrieverConfig, config.retriever, "retriever")


def rl_config(config, rollout_steps: int | None = None) -> RLConfig:
    """RLConfig; total_steps 0 means the optimizer steps of `rollout_steps` rollout batches of
    config.train.prompts_per_step prompts (the schedule spans the run)."""
    section = dict(config.rl)
    if section.get("total_steps", 1) == 0:
        if rollout_steps is None:
            raise ValueError("config.rl.total_steps=0 needs the run's length (rollout steps)")
        rows = config.train.prompts_per_step * section.get("samples_per_prompt",
                                                           RLConfig.samples_per_prompt)
        mini = section.get("mini_batch_size", RLConfig.mini_batch_size)
        section["total_steps"] = max(1, rollout_steps * rows // mini)
    return build(RLConfig, section, "rl")


def rollout_config(config) -> RolloutConfig:
    return build(RolloutConfig, config.rollout, "rollout")


def eval_rollout_config(config) -> RolloutConfig:
    return build(RolloutConfig, config.eval_rollout, "eval_rollout")


def data_config(config) -> DataConfig:
    return build(DataConfig, config.data, "data")


def reward_config(config) -> RewardConfig:
    return build(RewardConfig, config.reward, "reward")


def model_overrides(config) -> dict[str, Any]:
    """The run fields of ModelConfig (the architecture comes from the checkpoint)."""
    unknown = sorted(set(config.model) - set(MODEL_RUN_FIELDS) - {"hf_dir"})
    if unknown:
        raise ValueError(f"config.model: unknown key(s) {unknown}; valid keys: "
                         f"{['hf_dir', *MODEL_RUN_FIELDS]}")
    return {k: config.model[k] for k in MODEL_RUN_FIELDS if k in config.model}
