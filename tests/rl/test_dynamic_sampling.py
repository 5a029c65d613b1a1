"""DAPO's dynamic sampling (drop or refill prompts whose samples all scored the same, with the
counts in the step's metrics) and its soft overlong punishment."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from searcher_jax.rl import dynamic_sampling, rewards
from searcher_jax.rl import train_step as ts
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig

N = 4  # samples per prompt


@dataclasses.dataclass(frozen=True)
class Rows:
    """A stand-in for rollout.Trajectories: per-row arrays of two ranks and a list, and a
    batch total (as decode_slot_steps)."""
    tokens: np.ndarray  # [B, T]
    ids: np.ndarray  # [B]
    texts: list
    work: int = 0


def _draws(group_rewards, widths):
    """A draw function over scripted draws: draw k has one reward list per prompt (each a
    constant for a tied prompt or N values) and tokens of width widths[k]; every row's id says
    which draw, prompt and sample it is (100 * k + 10 * prompt + sample)."""
    scripted = []
    for k, (groups, width) in enumerate(zip(group_rewards, widths)):
        values = np.concatenate([np.broadcast_to(np.asarray(g, np.float32), (N,))
                                 for g in groups])
        ids = np.asarray([100 * k + 10 * p + s for p in range(len(groups)) for s in range(N)])
        scripted.append(dynamic_sampling.Draw(
            Rows(tokens=np.repeat(ids[:, None], width, axis=1).astype(np.int32) + 1, ids=ids,
                 texts=[f"row {i}" for i in ids], work=1000 * (k + 1)), values))
    calls = []

    def draw():
        calls.append(len(calls))
        return scripted[len(calls) - 1]

    return draw, calls


UNTIED = [0.1, 0.5, 0.9, 0.3]
# Draw 0: prompts 1 and 3 tied (all -2, all 0.4 whose float32 mean is a rounding step off);
# draw 1: prompt 0 tied; draw 2: nothing tied.
SCRIPT = [[UNTIED, -2.0, UNTIED, 0.4], [1.0, UNTIED, UNTIED, UNTIED], [UNTIED] * 4]


def test_off_keeps_the_batch_and_counts_the_tied_prompts():
    draw, calls = _draws(SCRIPT, [6, 9, 5])
    filled = dynamic_sampling.fill(draw, "off", N, max_draws=4)
    assert calls == [0] and np.all(filled.keep)
    assert np.array_equal(filled.rows.ids, np.arange(4).repeat(N) * 10 + np.tile(np.arange(N), 4))
    assert filled.metrics == {"tied_prompts": 2.0, "dropped_prompts": 0.0,
                              "unfilled_prompts": 0.0, "sampling_draws": 1.0}


def test_drop_leaves_tied_prompts_out_of_the_loss():
    draw, calls = _draws(SCRIPT, [6, 9, 5])
    filled = dynamic_sampling.fill(draw, "drop", N, max_draws=4)
    assert calls == [0]
    assert np.array_equal(filled.keep, np.repeat([True, False, True, False], N))
    assert filled.metrics == {"tied_prompts": 2.0, "dropped_prompts": 2.0,
                              "unfilled_prompts": 2.0, "sampling_draws": 1.0}


def test_refill_replaces_tied_prompts_with_untied_ones_of_later_draws():
    draw, calls = _draws(SCRIPT, [6, 9, 5])
    filled = dynamic_sampling.fill(draw, "refill", N, max_draws=4)
    assert calls == [0, 1]  # two untied prompts were missing; draw 1 has three
    assert np.all(filled.keep)
    # Draw 0's untied prompts 0 and 2, then draw 1's first untied ones, 1 and 2.
    want = [base + s for base in (0, 20, 110, 120) for s in range(N)]
    assert filled.rows.ids.tolist() == want
    assert filled.rows.texts == [f"row {i}" for i in want]
    assert filled.rows.work == 1000 + 2000  # both draws' work
    assert filled.rows.tokens.shape == (4 * N, 9)  # the widest draw; narrower rows padded with 0
    assert np.array_equal(filled.rows.tokens[:, 0], np.asarray(want) + 1)
    assert np.all(filled.rows.tokens[:2 * N, 6:] == 0) and np.all(filled.rows.tokens[2 * N:] > 0)
    np.testing.assert_array_equal(filled.rewards, np.tile(np.float32(UNTIED), 4))
    assert filled.metrics == {"tied_prompts": 3.0, "dropped_prompts": 3.0,
                              "unfilled_prompts": 0.0, "sampling_draws": 2.0}


def test_refill_stops_at_max_draws_and_leaves_the_rest_out_of_the_loss():
    script = [[-2.0, UNTIED, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [UNTIED] * 4]
    draw, calls = _draws(script, [6, 6, 6])
    filled = dynamic_sampling.fill(draw, "refill", N, max_draws=2)
    assert calls == [0, 1]
    # One untied prompt; the three other slots hold the first tied prompts, out of the loss.
    assert filled.rows.ids[::N].tolist() == [10, 0, 20, 30]
    assert np.array_equal(filled.keep, np.repeat([True, False, False, False], N))
    assert filled.metrics == {"tied_prompts": 7.0, "dropped_prompts": 7.0,
                              "unfilled_prompts": 3.0, "sampling_draws": 2.0}


def test_refill_without_a_tie_is_the_batch_as_drawn():
    draw, calls = _draws(SCRIPT[2:], [5])
    filled = dynamic_sampling.fill(draw, "refill", N, max_draws=4)
    assert calls == [0] and np.all(filled.keep)
    assert filled.rows.ids.tolist() == [10 * p + s for p in range(4) for s in range(N)]
    assert filled.metrics["tied_prompts"] == 0 and filled.metrics["unfilled_prompts"] == 0


def test_an_unknown_mode_or_row_field_fails_clearly():
    draw, _ = _draws(SCRIPT, [6, 9, 5])
    with pytest.raises(ValueError, match="dynamic sampling mode 'on'"):
        dynamic_sampling.fill(draw, "on", N, max_draws=2)

    @dataclasses.dataclass(frozen=True)
    class Bad:
        name: str

    bad = dynamic_sampling.Draw(Bad("x"), np.asarray([-2.0] * N + UNTIED, np.float32))
    with pytest.raises(TypeError, match="Bad.name"):
        dynamic_sampling.fill(iter([bad, bad]).__next__, "refill", N, max_draws=2)


def test_a_dropped_prompt_trains_as_if_it_were_not_in_the_batch(tiny_model):
    """The loss mask of a dropped prompt's rows is cleared (the step does it for
    RolloutBatch.keep, which trainer.rollout_batch sets): one
    optimizer step on 12 rows of which 4 are dropped equals the step on the 8 others, under
    both aggregations (the row count excludes empty rows) and whitening (mask tokens only)."""
    graphdef, params = tiny_model(num_layers=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (12, 12)).astype(np.int32)
    mask = np.zeros((12, 12), np.float32)
    mask[:, 3:11] = 1
    mask[1::2, 5:7] = 0  # document holes
    rewards = rng.normal(size=12).astype(np.float32)
    rewards[4:8] = 0.5  # prompt 1 tied: dropped
    keep = np.repeat([True, False, True], N)
    for estimator, aggregation in (("reinforce_baseline", "seq_mean_batch_mean"),
                                   ("grpo", "token_mean")):
        finals, step_metrics = [], []
        for rows, rows_mask in ((np.arange(12), mask * keep[:, None]),
                                (np.flatnonzero(keep), mask[keep])):
            config = RLConfig(estimator=estimator, aggregation=aggregation, samples_per_prompt=N,
                              mini_batch_size=len(rows), micro_batch_size=len(rows),
                              learning_rate=1e-2, total_steps=1, logprob_chunk=8)
            state = ts.init_train_state(jax.tree.map(jnp.array, params), config)
            batch = RolloutBatch(tokens=jnp.asarray(tokens[rows]), loss_mask=jnp.asarray(rows_mask),
                                 rewards=jnp.asarray(rewards[rows]))
            state, metrics = ts.make_train_step(graphdef, state, config)(state, batch)
            assert float(metrics["skipped_steps"]) == 0
            step_metrics.append(jax.device_get(metrics))
            finals.append(np.concatenate([np.asarray(x).ravel()
                                          for x in jax.tree.leaves(state.params)]))
        start = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
        moved = np.linalg.norm(finals[1] - start)
        assert moved > 1e-3
        for name in ("loss", "pg_loss", "grad_norm", "advantage_mean", "advantage_std"):
            np.testing.assert_allclose(step_metrics[0][name], step_metrics[1][name], rtol=1e-5,
                                       atol=1e-7, err_msg=f"{estimator} {name}")
        # Adam's first step divides each gradient by its own magnitude, so the rounding of the
        # two batches' sums reaches small gradients' updates: measured 1.2e-5 of the movement.
        # (The first step is nearly blind to the gradient's scale: the metrics above are what
        # would show dropped rows counted in seq_mean_batch_mean's row count, a 2/3 scale.)
        assert np.linalg.norm(finals[0] - finals[1]) <= 1e-4 * moved, estimator


def _step_batch(tiny_model, mini_batches=1, first_step=True):
    """A tiny model's state (with first_step, after one real step: Adam's moments non-zero), its
    step function and a 12-row batch's arrays (tokens, loss mask, rewards, sampler log-probs)."""
    graphdef, params = tiny_model(num_layers=1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, (12, 12)).astype(np.int32)
    mask = np.zeros((12, 12), np.float32)
    mask[:, 3:11] = 1
    rewards = rng.normal(size=12).astype(np.float32)
    sampler_logp = np.where(mask, -rng.uniform(1, 6, (12, 12)), 0).astype(np.float32)
    config = RLConfig(estimator="grpo", aggregation="token_mean", samples_per_prompt=N,
                      mini_batch_size=12 // mini_batches, micro_batch_size=12 // mini_batches,
                      learning_rate=1e-2, total_steps=4, logprob_chunk=8)
    state = ts.init_train_state(jax.tree.map(jnp.array, params), config)
    step = ts.make_train_step(graphdef, state, config)
    if first_step:
        state, _ = step(state, RolloutBatch(tokens=jnp.asarray(tokens),
                                            loss_mask=jnp.asarray(mask),
                                            rewards=jnp.asarray(rewards)))
    return state, step, (tokens, mask, rewards, sampler_logp)


def test_a_mini_batch_without_loss_tokens_takes_no_optimizer_step(tiny_model):
    """Dynamic sampling "drop" can leave a mini-batch with no loss token: its gradient is 0, but
    Adam's momentum would still move the params. The step is skipped and counted."""
    state, step, (tokens, mask, rewards, _) = _step_batch(tiny_model, mini_batches=2)
    before = jax.device_get(state)
    assert int(before.step) == 2
    empty = RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.zeros_like(jnp.asarray(mask)),
                         rewards=jnp.asarray(rewards))
    state, metrics = step(jax.tree.map(jnp.array, state), empty)
    assert float(metrics["empty_steps"]) == 2 and float(metrics["skipped_steps"]) == 0
    after = jax.device_get(state)
    assert int(after.step) == 2 and int(after.skipped) == 0
    for new, old in zip(jax.tree.leaves((after.params, after.opt_state)),
                        jax.tree.leaves((before.params, before.opt_state))):
        np.testing.assert_array_equal(new, old)
    # Half the rows dropped, all of them in the second mini-batch (rows stride over the
    # mini-batches: odd rows are the second's): one step taken, one empty.
    keep = np.arange(12) % 2 == 0
    half = RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(mask * keep[:, None]),
                        rewards=jnp.asarray(rewards))
    state, metrics = step(state, half)
    assert float(metrics["empty_steps"]) == 1 and int(state.step) == 3


def test_dropped_rows_leave_the_loss_but_not_the_mismatch_metric(tiny_model):
    """RolloutBatch.keep (trainer.rollout_batch's dropped prompts): the loss is the batch's with
    those rows' loss mask cleared, and the sampler/trainer mismatch reads every sampled token."""
    state, step, (tokens, mask, rewards, sampler_logp) = _step_batch(tiny_model,
                                                                     first_step=False)
    keep = np.repeat([True, False, True], N)
    every_row = np.ones(12, bool)  # keep given in every run: one compiled step
    sampler_logp[~keep] -= 3.0  # a larger gap on the dropped rows: visible in the mean

    def run(loss_mask, keep_rows):
        batch = RolloutBatch(tokens=jnp.asarray(tokens), loss_mask=jnp.asarray(loss_mask),
                             rewards=jnp.asarray(rewards), sampler_logprobs=jnp.asarray(
                                 sampler_logp),
                             keep=jnp.asarray(keep_rows))
        new, metrics = step(jax.tree.map(jnp.array, state), batch)
        return jax.device_get(metrics), np.concatenate(
            [np.asarray(x).ravel() for x in jax.tree.leaves(new.params)])

    with_keep, params_keep = run(mask, keep)
    cleared, params_cleared = run(mask * keep[:, None], every_row)
    everything, _ = run(mask, every_row)
    for name in ("loss", "pg_loss", "grad_norm", "advantage_mean", "advantage_std"):
        np.testing.assert_allclose(with_keep[name], cleared[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(params_keep, params_cleared, rtol=1e-6, atol=1e-7)
    for name in ("sampler_logp_abs_diff_mean", "sampler_logp_abs_diff_max"):
        np.testing.assert_allclose(with_keep[name], everything[name], rtol=1e-6, err_msg=name)
        assert with_keep[name] > cleared[name] + 0.1, name


def test_overlong_penalty_is_dapos_soft_punishment():
    """R_length(y) = 0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to
    L_max, -1 beyond (DAPO, arXiv 2503.14476, eq. 13); here |y| is the tokens a row sampled
    (inserted documents excluded), L_max the room the row's buffer leaves its response (max_len
    minus its prompt), and a truncated row is beyond it."""
    max_len, cache, prompt = 100, 20, 10
    l_max = max_len - prompt
    responses = np.asarray([30, 70, 71, 80, 89, 90, 60])
    truncated = np.asarray([False] * 6 + [True])  # a document block did not fit: cut short

    def published(y, cut):
        if cut or y > l_max:
            return -1.0
        return 0.0 if y <= l_max - cache else ((l_max - cache) - y) / cache

    want = 0.5 * np.asarray([published(y, c) for y, c in zip(responses, truncated)])
    got = rewards.overlong_penalty(responses, truncated, l_max, cache, penalty=0.5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 0 and got[5] == -0.5 and got[6] == -0.5
    # A per-row budget (each row's own prompt length) gives the same values.
    np.testing.assert_allclose(
        rewards.overlong_penalty(responses, truncated, max_len - np.full(7, prompt), cache, 0.5),
        want, rtol=1e-6)
    with pytest.raises(ValueError, match="overlong buffer"):
        rewards.overlong_penalty(responses, truncated, max_len, 0)


def test_overlong_penalty_counts_only_sampled_tokens():
    """The trainer's shaping of a rollout: |y| is each row's sampled-token count (the loss mask),
    against the room its buffer leaves after the prompt. A row whose buffer is mostly inserted
    documents but that sampled few tokens is not punished; a truncated row gets the full
    penalty."""
    from searcher_jax.rollout import Trajectories
    max_len, cache = 100, 20
    prompts = np.asarray([10, 10, 20], np.int32)
    mask = np.zeros((3, max_len), bool)
    mask[0, 10:30] = True  # 20 sampled, then 65 document tokens, 5 more sampled: length 95
    mask[0, 95:100] = True
    mask[1, 10:95] = True  # 85 sampled of a budget of 90: in the ramp
    mask[2, 20:30] = True  # 10 sampled, then cut short by a document block
    trajectories = Trajectories(
        tokens=np.zeros((3, max_len), np.int32), loss_mask=mask,
        sampler_logprobs=np.zeros((3, max_len), np.float32), prompt_lengths=prompts,
        lengths=np.asarray([100, 95, 100], np.int32), responses=["", "", ""],
        queries=[["q"], [], ["q"]], end_reasons=["answer", "answer", "truncated"],
        overshoot_mismatches=np.zeros(3, np.int32))
    got = rewards.trajectory_overlong_penalty(trajectories, max_len, cache, penalty=0.5)
    np.testing.assert_allclose(got, 0.5 * np.asarray([0.0, -(85 - 70) / 20, -1.0]), rtol=1e-6)


def test_rollout_batch_carries_the_dropped_rows_as_keep():
    """trainer.rollout_batch leaves the sampled-token mask whole and marks the dropped prompts'
    rows in `keep` (the step leaves them out of the loss, not out of the mismatch metric)."""
    from searcher_jax import trainer
    from searcher_jax.model import sharding
    from searcher_jax.rollout import Trajectories
    mask = np.zeros((8, 10), bool)
    mask[:, 4:9] = True
    trajectories = Trajectories(
        tokens=np.ones((8, 10), np.int32), loss_mask=mask,
        sampler_logprobs=np.where(mask, -1.0, 0.0).astype(np.float32),
        prompt_lengths=np.full(8, 4, np.int32), lengths=np.full(8, 9, np.int32),
        responses=[""] * 8, queries=[[]] * 8, end_reasons=["answer"] * 8,
        overshoot_mismatches=np.zeros(8, np.int32))
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    keep = np.repeat([True, False], N)
    batch = trainer.rollout_batch(trajectories, np.zeros(8, np.float32), 256, mesh, keep=keep)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask)[:, :10], mask)
    np.testing.assert_array_equal(np.asarray(batch.keep), keep)
    assert trainer.rollout_batch(trajectories, np.zeros(8, np.float32), 256, mesh).keep is None
