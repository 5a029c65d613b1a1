"""Collapse detection (rl/collapse.py) on synthetic histories, and the step's collapse metrics
(entropy, positive_logp_mean) against plain numpy from the policy's logits.

The real run driven into collapse is in test_nonfinite.py (one run serves both)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.rl import collapse
from searcher_jax.rl import train_step as ts
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig

CONFIG = collapse.CollapseConfig(patience=3, length_window=4)


def healthy(steps: int, seed: int = 0) -> list[dict[str, float]]:
    """Step metrics as the demo's healthy runs have them (entropy 0.13-0.30, 50-90 sampled
    tokens, 90-100% well formed), drawn at random."""
    rng = np.random.default_rng(seed)
    return [{"entropy": rng.uniform(0.13, 0.30), "positive_logp_mean": rng.uniform(-0.5, -0.1),
             "positive_rows": float(rng.integers(1, 20)), "sampled_tokens": rng.uniform(50, 90),
             "format_ok": rng.uniform(0.9, 1.0)} for _ in range(steps)]


def run(records, config=CONFIG):
    """(the last history, each step's alarms, each step's signals), as the trainer feeds them:
    one observe per step."""
    history, alarms, signals = [], [], []
    for record in records:
        history, derived, fired = collapse.observe(history, record, config)
        alarms.append(fired)
        signals.append({**record, **derived})
    return history, alarms, signals


def test_a_healthy_history_fires_nothing_and_is_kept_short_as_json():
    history, alarms, _ = run(healthy(60))
    assert alarms == [[]] * 60
    assert len(history) == collapse.history_len(CONFIG) == 8
    assert json.loads(json.dumps(history)) == history  # goes into the checkpoint's meta
    assert {"response_length_trend", "format_ok_best", "format_ok_drop"} <= set(history[-1])


@pytest.mark.parametrize("metric, value, signal, field, bad_steps", [
    ("entropy", 0.01, "entropy", "min_entropy", (8, 20)),
    ("positive_logp_mean", -3.0, "positive_logp_mean", "min_positive_logp", (8, 20)),
    # Lengths shrink to a twelfth, or grow sevenfold, from step 8: the trend (windows of 4) is
    # past its bound once the recent window holds enough new lengths, until the earlier one
    # holds enough of them too.
    ("sampled_tokens", 5.0, "response_length_trend", "min_length_trend", (10, 15)),
    ("sampled_tokens", 500.0, "response_length_trend", "max_length_trend", (8, 13)),
    ("format_ok", 0.2, "format_ok_drop", "max_format_drop", (8, 20)),
])
def test_a_signal_fires_after_patience_consecutive_bad_steps_not_before(metric, value, signal,
                                                                        field, bad_steps):
    records = healthy(20)
    for record in records[8:]:
        record[metric] = value
    _, alarms, signals = run(records)
    limit = getattr(CONFIG, field)
    past = [signal in s and (s[signal] < limit if field.startswith("min") else s[signal] > limit)
            for s in signals]
    first = past.index(True)
    last = past.index(False, first) if False in past[first:] else len(past)
    assert (first, last) == bad_steps
    # Steps first and first + 1 are bad: 2 < patience 3.
    assert alarms[:first + 2] == [[]] * (first + 2) and alarms[last:] == [[]] * (20 - last)
    for step in range(first + 2, last):
        fired = min(step - first + 1, collapse.history_len(CONFIG))
        assert [(a.metric, a.field, a.steps) for a in alarms[step]] == [(signal, field, fired)]
        alarm = alarms[step][0]
        assert alarm.bound == limit and alarm.value == signals[step][signal]
        assert f"(config.collapse.{field}) for {fired} consecutive steps" in alarm.message
    if signal != "response_length_trend":  # (a trend spans windows: one step does not end it)
        # One healthy step among bad ones resets the count.
        records[9] = healthy(1, seed=1)[0]
        _, alarms, _ = run(records)
        assert alarms[10] == [] and alarms[11] == [] and alarms[12] != []


def test_no_positive_response_is_no_evidence():
    """positive_logp_mean is 0 when no response had a positive advantage: not judged."""
    records = healthy(10)
    for record in records[5:]:
        record.update(positive_logp_mean=-9.0, positive_rows=0.0)
    assert run(records)[1] == [[]] * 10


def test_derived_length_trend_and_format_drop():
    lengths = [60.0] * 4 + [20.0] * 4
    shares = [0.1, 0.9, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1]  # learnt, then lost
    history, _, signals = run([{"sampled_tokens": n, "format_ok": f}
                               for n, f in zip(lengths, shares)])
    np.testing.assert_allclose(signals[-1]["response_length_trend"], 20 / 60)
    np.testing.assert_allclose([s["format_ok_drop"] for s in signals],
                               [0, 0, 0.4, 0.5, 0.6, 0.6, 0.7, 0.8])
    assert "response_length_trend" not in signals[0]  # one step has no trend yet
    # A young run compares its halves (windows of 1, then of 2 over 5 steps).
    assert signals[1]["response_length_trend"] == 1.0
    np.testing.assert_allclose(signals[4]["response_length_trend"], (60 + 20) / (60 + 60))
    # The best share outlives the window the history keeps.
    assert signals[-1]["format_ok_best"] == 0.9 and len(history) == 8
    _, _, signals = run([{"format_ok": 0.9}] + [{"format_ok": 0.1}] * 30)
    assert signals[-1]["format_ok_drop"] == pytest.approx(0.8)


@pytest.mark.parametrize("field, value, message", [
    ("action", "halt", "config.collapse.action='halt' is not one of warn, stop"),
    ("patience", 0, "config.collapse.patience must be >= 1"),
    ("min_length_trend", 1.5, "0 < min_length_trend < 1 < max_length_trend"),
    ("max_format_drop", 0.0, "config.collapse.max_format_drop must be > 0"),
])
def test_bad_bounds_say_which(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        collapse.CollapseConfig(**{field: value})


def test_step_entropy_and_positive_likelihood_match_numpy(tiny_model):
    """One optimizer step (so the loss's forward runs on the rollout params) over 8 rows in two
    micro-batches: the logged entropy is the mean over loss tokens of -sum p log p of the
    logits that predicted them, and positive_logp_mean the mean over rows whose reward beats
    their group's (grpo's positive advantages) of their token-mean log-prob; numpy, float64."""
    graphdef, params = tiny_model()
    rows, length = 8, 12
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for row in range(rows):
        mask[row, 3:3 + int(rng.integers(2, length - 3))] = 1
    rewards = rng.normal(size=rows).astype(np.float32)
    config = RLConfig(estimator="grpo", samples_per_prompt=4, mini_batch_size=rows,
                      micro_batch_size=4, total_steps=1, logprob_chunk=length)
    state = ts.init_train_state(params, config)
    step = jax.jit(ts.build_train_step(graphdef, config))
    _, metrics = step(state, RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask),
                                          rewards=jnp.asarray(rewards)))

    model = nnx.merge(graphdef, params)
    logits = np.asarray(model.logits(model.forward_hidden(jnp.asarray(tokens))[0]), np.float64)
    logits = logits[:, :-1]  # position t predicts token t + 1
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)  # [rows, length - 1]
    logp = np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    scored = mask[:, 1:].astype(bool)
    np.testing.assert_allclose(metrics["entropy"], entropy[scored].mean(), rtol=1e-5)
    group_mean = rewards.reshape(-1, 4).mean(1).repeat(4)
    positive = rewards > group_mean
    row_logp = (logp * scored).sum(1) / scored.sum(1)
    assert 0 < positive.sum() < rows
    assert metrics["positive_rows"] == positive.sum()
    np.testing.assert_allclose(metrics["positive_logp_mean"], row_logp[positive].mean(),
                               rtol=1e-5)
