"""From an ml_collections run config (configs/*.py) to the frozen dataclasses of each part.

A run config has one section per part: `model`, `mesh`, `sampler`, `retriever`,
`rollout`, `eval_rollout`, `rl`, `reward`, `data` and `train` (plus `world`, which
builds the embedded synthetic world and points the others at it). Each section's keys are
the fields of that part's static configuration (`model`: ModelSource's and ModelConfig's run
fields), so `--config.rl.estimator=grpo` reaches `RLConfig.estimator` and a misspelt key
fails here with the section and the valid names.
"""
from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from typing import Any, Mapping

import numpy as np
from ml_collections import config_dict

from searcher_jax.data.config import DataConfig
from searcher_jax.retrieval.retriever import RetrieverConfig
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.rewards import RewardConfig
from searcher_jax.rollout import RolloutConfig
from searcher_jax.sampling.sampler import SamplerConfig
from searcher_jax.sampling.select import SelectConfig
from searcher_jax.synthetic import build as synthetic_build
from searcher_jax.synthetic.pretrain import PretrainConfig
from searcher_jax.synthetic.world import WorldConfig

MODEL_RUN_FIELDS = ("dtype", "scan_layers", "remat", "attention", "attention_block")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a run's model comes from: config.model's keys besides ModelConfig's run fields."""
    hf_dir: str = ""  # HF directory: architecture, tokenizer and, without init_from, the weights
    # A run's workdir (or its checkpoints/): its latest params are this run's initial policy and
    # reference (stage 2 from stage 1, SPEC section 4). A run that has its own checkpoint
    # resumes from that instead.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class WorldSource:
    """config.world: the embedded synthetic world (configs/demo.py)."""
    dir: str = ""  # set: build (or reuse) the world there and point the empty paths at it
    preset: str = "demo"  # a key of synthetic.build.PRESETS: the world's sizes and its base model
    # None: the preset's, so an existing build is reused. Another seed draws another world,
    # whose files and index are then built anew; the base model is the same for every seed
    # (build.py, model_payload).
    seed: int | None = None

    def __post_init__(self):
        presets = sorted(synthetic_build.PRESETS)
        if self.preset not in presets:
            raise ValueError(f"config.world.preset must be one of {presets}, got {self.preset!r}")

    def configs(self) -> tuple[WorldConfig, PretrainConfig]:
        """The build's configs: the preset's, drawn from `seed` when one is given (the base
        model's own pretraining seed stays the preset's)."""
        world, pretrain = synthetic_build.PRESETS[self.preset]
        if self.seed is not None:
            world = dataclasses.replace(world, seed=self.seed)
        return world, pretrain


def defaults(cls) -> dict[str, Any]:
    """A dataclass's fields and defaults as a plain dict (a config section).

    A None default of an `X | None` field becomes a placeholder of type X: ml_collections
    refuses to override a plain None from the command line (`--config.rl.dual_clip=3`).
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING or dataclasses.is_dataclass(f.default):
            continue
        out[f.name] = (config_dict.placeholder(_optional_type(hints[f.name], f.name))
                       if f.default is None else f.default)
    return out


def _optional_type(hint, name: str) -> type:
    """X of the type hint `X | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (typing.Union, types.UnionType) or len(args) != 1:
        raise TypeError(f"field {name}: a None default needs an `X | None` type, got {hint}")
    return args[0]


def build(cls, section: Mapping[str, Any], name: str):
    """cls(**section), with an error that names the section and the key.

    Raises ValueError, starting `config.<name>`: an unknown key (listing the valid ones), a
    value of another type than the field's (`config.rl.kl_coef: expected float, got 'abc'`;
    an int is a float, a bool is not a number), or a value the class refuses (its own check).
    """
    section = dict(section)
    unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"config.{name}: unknown key(s) {unknown}; valid keys: "
                         f"{sorted(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    for key, value in section.items():
        if not _has_type(value, hints[key]):
            raise ValueError(f"config.{name}.{key}: expected {_type_name(hints[key])}, got "
                             f"{value!r} ({type(value).__name__})")
    try:
        return cls(**section)
    except ValueError as error:
        raise ValueError(f"config.{name}: {error}") from error


def _has_type(value, hint) -> bool:
    """Whether `value` fits a config field's type hint (bool, int, float, str, a dataclass, or
    `X | None` of these; a generic such as tuple[str, ...] is not checked)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    is_bool = isinstance(value, (bool, np.bool_))
    if hint is bool:
        return is_bool
    if hint is int:
        return isinstance(value, numbers.Integral) and not is_bool
    if hint is float:
        return isinstance(value, numbers.Real) and not is_bool
    if isinstance(hint, type) and typing.get_origin(hint) is None:  # not list[str] and the like
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


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
    config.train.prompts_per_step prompts (the schedule spans the run), and loss_norm_tokens 0
    the sampler's row buffer, config.sampler.max_len (Dr. GRPO's constant: the generation
    budget, the same at every step whatever length the step's batch is padded to)."""
    section = dict(config.rl)
    if section.get("loss_norm_tokens", 0) == 0 and "sampler" in config:
        section["loss_norm_tokens"] = config.sampler.max_len
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


def world_source(config) -> WorldSource:
    return build(WorldSource, config.get("world", {}), "world")


def _check_model_keys(config) -> None:
    valid = [f.name for f in dataclasses.fields(ModelSource)] + list(MODEL_RUN_FIELDS)
    unknown = sorted(set(config.model) - set(valid))
    if unknown:
        raise ValueError(f"config.model: unknown key(s) {unknown}; valid keys: {valid}")


def model_source(config) -> ModelSource:
    _check_model_keys(config)
    return ModelSource(**{f.name: config.model[f.name] for f in dataclasses.fields(ModelSource)
                          if f.name in config.model})


def model_overrides(config) -> dict[str, Any]:
    """The run fields of ModelConfig (the architecture comes from the checkpoint)."""
    _check_model_keys(config)
    return {k: config.model[k] for k in MODEL_RUN_FIELDS if k in config.model}
