"""Collapse detection: signs, in a run's per-step metrics, that RL is destroying the policy.

GRPO-style runs of search agents are reported to collapse after a while (Search-R1 and
ZeroSearch trackers; Deng et al. 2025, "On Group Relative Policy Optimization Collapse in Agent
Search: The Lazy Likelihood-Displacement", arXiv 2512.04220): the reward may still look fine
for some steps while
  - the policy turns deterministic: the entropy of its sampled tokens falls towards 0;
  - the responses it is rewarded for grow unlikely under it (the likelihood displacement):
    their token-mean log-prob falls;
  - its responses shrink to nothing or run to the length limit;
  - it stops writing the tags the rollout and the rewards parse.
The step's metrics carry the first two (train_step.py: `entropy`, from the loss's forward, and
`positive_logp_mean`, from the old log-probs' forward: no extra forward) and the raw length and
format share (`sampled_tokens`, `format_ok`, from the rollout and the rewards); `derive` adds
the two that need the run's recent history, and `check` says which signal has been past its
bound for `patience` consecutive steps.

    history = [...records of earlier steps, oldest first..., this step's record]
    record.update(derive(history, config))   # response_length_trend, format_ok_best, ..._drop
    alarms = check(history, config)          # [] on a healthy run

(`observe` does the three, keeping only the keys it reads.)

Pure functions over plain dicts of floats; the trainer wires them (logs each alarm, stops when
`action` is "stop") and keeps the last `history_len(config)` records in its checkpoint, so a
resumed run judges its first steps as the uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

ACTIONS = ("warn", "stop")


@dataclasses.dataclass(frozen=True)
class CollapseConfig:
    """Bounds of the collapse signals (config section `collapse`).

    A signal fires when it is past its bound on `patience` consecutive rollout steps. The
    defaults leave the demo's healthy runs silent by a wide margin (both world seeds, both
    stages, five policy losses: entropy 0.13 to 0.30, length trend 0.85 to 1.21, format drop
    at most 0.094), and fire on a policy that has stopped exploring, lost its format or its
    length.
    """
    action: str = "warn"  # "warn": log each alarm; "stop": also stop the run (CollapseError)
    patience: int = 3  # consecutive rollout steps past a bound before a signal fires
    # `entropy`: the mean entropy (nats) of the policy's distributions at its sampled tokens.
    min_entropy: float = 0.02
    # `positive_logp_mean`: the mean token log-prob (nats) of positive-advantage responses
    # under the policy that sampled them; -2 is a per-token perplexity of e^2 = 7.4.
    min_positive_logp: float = -2.0
    # `response_length_trend`: the mean sampled tokens per row over the last `length_window`
    # steps over its mean over the `length_window` steps before (fewer while the run is
    # young: half its steps each).
    length_window: int = 10
    min_length_trend: float = 0.5
    max_length_trend: float = 2.0
    # `format_ok_drop`: the run's best share of well-formed responses so far minus this step's
    # (a best, not a first value: a base model may learn the format in the first steps).
    max_format_drop: float = 0.5

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"config.collapse.action={self.action!r} is not one of "
                             f"{', '.join(ACTIONS)}")
        for name in ("patience", "length_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.collapse.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.min_length_trend < 1 < self.max_length_trend:
            raise ValueError(f"config.collapse: want 0 < min_length_trend < 1 < "
                             f"max_length_trend, got {self.min_length_trend} and "
                             f"{self.max_length_trend}")
        if self.max_format_drop <= 0:
            raise ValueError(f"config.collapse.max_format_drop must be > 0, got "
                             f"{self.max_format_drop}")


@dataclasses.dataclass(frozen=True)
class Bound:
    """One signal's bound: `metric` of a step record is bad when below (or above) `field`."""
    metric: str
    field: str  # the CollapseConfig field holding the bound
    below: bool  # True: bad when metric < bound; False: bad when metric > bound
    present_when: str | None = None  # a record key that must be > 0 for the metric to count


BOUNDS = (
    Bound("entropy", "min_entropy", below=True),
    Bound("positive_logp_mean", "min_positive_logp", below=True, present_when="positive_rows"),
    Bound("response_length_trend", "min_length_trend", below=True),
    Bound("response_length_trend", "max_length_trend", below=False),
    Bound("format_ok_drop", "max_format_drop", below=False),
)
LENGTH, FORMAT = "sampled_tokens", "format_ok"  # the raw metrics derive reads


@dataclasses.dataclass(frozen=True)
class Alarm:
    """A signal past its bound for `steps` (>= patience) consecutive steps up to the latest
    one, as far back as the history goes."""
    metric: str
    value: float  # its latest value
    field: str
    bound: float
    below: bool
    steps: int

    @property
    def message(self) -> str:
        side = "below" if self.below else "above"
        return (f"training collapse? {self.metric} {self.value:.4g} is {side} its bound "
                f"{self.bound:g} (config.collapse.{self.field}) for {self.steps} consecutive "
                f"steps")


class CollapseError(RuntimeError):
    """A run stopped by collapse detection (config.collapse.action="stop")."""


def history_len(config: CollapseConfig) -> int:
    """How many of the latest records `derive` and `check` read (older ones may be dropped)."""
    return max(2 * config.length_window, config.patience)


WATCHED = ("entropy", "positive_logp_mean", "positive_rows", LENGTH, FORMAT,
           "response_length_trend", "format_ok_best", "format_ok_drop")  # what a history record keeps


def observe(history: Sequence[Mapping[str, float]], metrics: Mapping[str, float],
            config: CollapseConfig) -> tuple[list[dict[str, float]], dict[str, float],
                                             list[Alarm]]:
    """One step's turn: (the history with this step's record appended, trimmed to
    history_len and made of plain floats (JSON, for the checkpoint), this step's derived
    signals, the alarms). `metrics` is the step's metrics; only WATCHED keys are kept."""
    record = {key: float(metrics[key]) for key in WATCHED if key in metrics}
    history = [*history, record][-history_len(config):]
    derived = derive(history, config)
    record.update(derived)
    return history, derived, check(history, config)


def derive(history: Sequence[Mapping[str, float]], config: CollapseConfig) -> dict[str, float]:
    """The signals of the latest record that need earlier ones (history oldest first, the latest
    last, each a step's metrics, with what `derive` gave for it): `response_length_trend`
    (from step 2 on), `format_ok_best` (the run's best share so far) and `format_ok_drop`.

    A signal whose raw metric is missing from a record it needs, or whose earlier window has
    no length, is left out (not judged)."""
    out = {}
    lengths = [record.get(LENGTH) for record in history[-history_len(config):]]
    window = min(config.length_window, len(lengths) // 2)
    recent, earlier = lengths[len(lengths) - window:], lengths[len(lengths) - 2 * window:
                                                               len(lengths) - window]
    if window and None not in recent + earlier and sum(earlier) > 0:
        out["response_length_trend"] = (sum(recent) / window) / (sum(earlier) / window)
    if history and FORMAT in history[-1]:
        share = history[-1][FORMAT]
        earlier = [record["format_ok_best"] for record in history[:-1] if "format_ok_best" in record]
        out["format_ok_best"] = max([share, *earlier[-1:]])
        out["format_ok_drop"] = out["format_ok_best"] - share
    return out


def check(history: Sequence[Mapping[str, float]], config: CollapseConfig) -> list[Alarm]:
    """The signals past their bound on each of the last `patience` (or more) records (oldest
    first, `derive`'s signals included); [] when none is, or the history is shorter."""
    alarms = []
    for bound in BOUNDS:
        limit = getattr(config, bound.field)
        steps = 0
        for record in reversed(history):
            if not _past(record, bound, limit):
                break
            steps += 1
        if steps >= config.patience:
            alarms.append(Alarm(bound.metric, history[-1][bound.metric], bound.field, limit,
                                bound.below, steps))
    return alarms


def _past(record: Mapping[str, float], bound: Bound, limit: float) -> bool:
    """Whether the record's value is past the bound; a missing (or undefined: present_when
    is 0) value is not, so it also ends a run of bad steps."""
    if bound.metric not in record:
        return False
    if bound.present_when is not None and not record.get(bound.present_when, 0) > 0:
        return False
    value = record[bound.metric]
    return value < limit if bound.below else value > limit
