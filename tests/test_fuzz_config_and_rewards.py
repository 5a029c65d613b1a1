"""Property-based fuzzing (issue 20, item 5) of the config loader and the reward parser.

- A config section with any keys and values either builds its part's config or fails with a
  ValueError that starts with `config.<section>` and names the offending key.
- Any response text, against any gold answers, gets a reward within its recipe's range (and
  answer metrics within [0, 1]), never an exception."""
import dataclasses
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from searcher_jax import run_config
from searcher_jax.data import prompts
from searcher_jax.rl import rewards
from searcher_jax.trainer import TrainConfig

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)

SECTIONS = {"rollout": run_config.RolloutConfig, "eval_rollout": run_config.RolloutConfig,
            "reward": rewards.RewardConfig, "rl": run_config.RLConfig,
            "data": run_config.DataConfig, "retriever": run_config.RetrieverConfig,
            "select": run_config.SelectConfig, "world": run_config.WorldSource,
            "train": TrainConfig}
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(),
                  st.text(max_size=12), st.lists(st.integers(), max_size=2))


@st.composite
def sections(draw):
    name = draw(st.sampled_from(sorted(SECTIONS)))
    fields = [f.name for f in dataclasses.fields(SECTIONS[name])]
    keys = draw(st.lists(st.one_of(st.sampled_from(fields), st.text(min_size=1, max_size=8)),
                         max_size=4, unique=True))
    # Values of the field's own kind often, so the classes' own checks are reached too.
    section = {key: draw(st.one_of(VALUE, st.just(_default(SECTIONS[name], key)))) for key in keys}
    return name, section


def _default(cls, key):
    field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    return None if field is None or field.default is dataclasses.MISSING else field.default


@FUZZ
@given(sections())
def test_any_config_section_builds_or_names_the_key(drawn):
    name, section = drawn
    cls = SECTIONS[name]
    try:
        built = run_config.build(cls, section, name)
    except ValueError as error:
        message = str(error)
        assert message.startswith(f"config.{name}"), message
        if message.startswith(f"config.{name}."):  # a value of the wrong type: its key
            key = message[len(f"config.{name}."):].split(":")[0]
            assert key in section, message
        return
    assert isinstance(built, cls)
    for key, value in section.items():
        got = getattr(built, key)
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got))


MARKERS = [prompts.BEGIN_QUERY, prompts.END_QUERY, prompts.BEGIN_DOCUMENTS,
           prompts.END_DOCUMENTS, "<answer>", "</answer>", "<think>", "</think>", "\n", "\n\n",
           "(1)", "assistant", "Assistant", "中文", "True", "the", " ", "\ufffd", "\ud800"]
RESPONSE = st.lists(st.one_of(st.sampled_from(MARKERS), st.text(max_size=6)),
                    max_size=25).map("".join)
GOLDS = st.one_of(st.text(max_size=10), st.lists(st.text(max_size=10), min_size=1, max_size=3))
CONFIGS = st.builds(rewards.RewardConfig, recipe=st.sampled_from(sorted(rewards.RECIPES)),
                    answer_metric=st.sampled_from(sorted(rewards.ANSWER_METRICS)),
                    format_penalty=st.floats(-3, 0), strict_format=st.booleans(),
                    max_answer_words=st.integers(1, 12))


@FUZZ
@given(RESPONSE, GOLDS, CONFIGS)
def test_any_response_gets_a_reward_in_range(response, golds, config):
    result = rewards.score(response, golds, config)
    low, high = rewards.reward_bounds(config)
    assert low <= result.reward <= high
    assert all(0.0 <= value <= 1.0 for value in (result.f1, result.em, result.cem))
    assert result.num_retrievals >= 0
    assert not result.format_ok or result.retrieval_ok
    if result.answer is not None:
        assert isinstance(result.answer, str)
