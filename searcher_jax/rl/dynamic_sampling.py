"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, section 3.2): host side, per step.

A prompt whose samples all got the same reward (equal up to rounding,
advantages.tied_groups) shapes to zero reward under a group-relative estimator:
zero advantage under grpo and dr_grpo (with reinforce_baseline and rloo the
batch whitening then moves it to -mean / std, a shift with no signal of the
prompt's own). It adds rows to the batch and no signal to the gradient, so as
more prompts are always or never solved, the effective batch shrinks. RLConfig.dynamic_sampling:

  "off"     the batch as drawn; the step still reports how many prompts tied.
  "drop"    tied prompts are left out of the loss (their rows' loss mask is
            cleared, so they weigh nothing in any aggregation or in the
            whitening statistics): a smaller effective batch, no extra rollouts.
  "refill"  DAPO's: tied prompts are dropped and more prompts are drawn (a whole
            rollout batch at a time, so that the sampler's shapes stay the same)
            until the batch holds `prompts` untied ones or `max_draws` rollouts
            were drawn; untied prompts beyond the batch are discarded, and slots
            still empty at the end hold tied prompts left out of the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from searcher_jax.rl import advantages

MODES = ("off", "drop", "refill")


@dataclasses.dataclass(frozen=True)
class Draw:
    """One scored rollout of some prompts, host values, the n samples of a prompt contiguous."""
    rows: Any  # a dataclass whose fields are per row: arrays [B, ...] ([B, T] ones right padded
    #            with 0) or lists of B (rollout.Trajectories)
    rewards: np.ndarray  # [B] float32


@dataclasses.dataclass(frozen=True)
class Filled:
    """The step's batch: as many rows as the first draw, and which of them the loss may use."""
    rows: Any
    rewards: np.ndarray  # [B] float32
    keep: np.ndarray  # [B] bool: False on the rows of a prompt left out of the loss
    metrics: dict[str, float]  # tied_prompts, dropped_prompts, unfilled_prompts, sampling_draws


def fill(draw: Callable[[], Draw], mode: str, n: int, max_draws: int) -> Filled:
    """The step's batch under dynamic-sampling `mode` (a name in MODES).

    Args:
      draw: rolls out and scores the next prompts of the data order (the first call gives the
        step's batch size); called again only by "refill".
      n: samples per prompt.
      max_draws: "refill" calls `draw` at most this many times in all.
    Returns:
      Filled, whose metrics count prompts: `tied_prompts` over every draw, `dropped_prompts`
      of those not trained on, `unfilled_prompts` the batch's slots left out of the loss, and
      `sampling_draws`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown dynamic sampling mode {mode!r}; use one of {', '.join(MODES)}")
    draws = [draw()]
    prompts = len(draws[0].rewards) // n
    tied = [np.asarray(advantages.tied_groups(draws[0].rewards, n))]
    untied = [(0, g) for g in np.flatnonzero(~tied[0])]
    while mode == "refill" and len(untied) < prompts and len(draws) < max_draws:
        draws.append(draw())
        tied.append(np.asarray(advantages.tied_groups(draws[-1].rewards, n)))
        untied += [(len(draws) - 1, g) for g in np.flatnonzero(~tied[-1])]
    num_tied = int(sum(t.sum() for t in tied))
    metrics = {"tied_prompts": float(num_tied), "sampling_draws": float(len(draws))}
    if mode == "off":
        keep = np.ones(prompts, bool)
        rows, rewards = draws[0].rows, draws[0].rewards
    elif mode == "drop":
        keep = ~tied[0]
        rows, rewards = draws[0].rows, draws[0].rewards
    else:
        fillers = [(d, g) for d, t in enumerate(tied) for g in np.flatnonzero(t)]
        picks = untied[:prompts]
        keep = np.arange(prompts) < len(picks)
        picks += fillers[:prompts - len(picks)]
        rows = _gather([d.rows for d in draws], picks, n)
        rewards = np.concatenate([draws[d].rewards[g * n:(g + 1) * n] for d, g in picks])
    metrics.update(dropped_prompts=float(num_tied if mode != "off" else 0),
                   unfilled_prompts=float((~keep).sum()))
    return Filled(rows=rows, rewards=rewards, keep=np.repeat(keep, n), metrics=metrics)


def _gather(parts: list, picks: list[tuple[int, int]], n: int):
    """The rows of the groups `picks` ((part, group) pairs) of the dataclasses `parts`, in
    order, as one dataclass of their type; [B, T] arrays are right padded to the widest. An
    int field is a total over the batch (Trajectories.decode_slot_steps): the parts' sum,
    the work every draw took."""
    values = {}
    for field in dataclasses.fields(parts[0]):
        if isinstance(getattr(parts[0], field.name), int):
            values[field.name] = sum(getattr(part, field.name) for part in parts)
            continue
        pieces = [getattr(parts[d], field.name)[g * n:(g + 1) * n] for d, g in picks]
        if isinstance(pieces[0], np.ndarray):
            if pieces[0].ndim == 2:
                width = max(p.shape[1] for p in pieces)
                pieces = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in pieces]
            values[field.name] = np.concatenate(pieces)
        elif isinstance(pieces[0], list):
            values[field.name] = [row for piece in pieces for row in piece]
        else:
            raise TypeError(f"{type(parts[0]).__name__}.{field.name}: per-row fields must be "
                            f"numpy arrays or lists, got {type(pieces[0]).__name__}")
    return dataclasses.replace(parts[0], **values)
