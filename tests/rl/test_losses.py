"""Policy losses: clipping, aggregation over pieces of a step, gradients on a tiny model."""
import ast
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.rl import losses
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.logprobs import policy_logprobs


def test_losses_does_not_import_config():
    """config.py imports losses.py (its registries); the reverse, even for type checking only,
    would close an import cycle. The losses read their own LossConfig, which RLConfig.loss
    builds with every unset choice resolved."""
    tree = ast.parse(inspect.getsource(losses))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names}
    assert not any(name and name.endswith("config") for name in imported), imported
    assert RLConfig().loss == losses.LossConfig(
        policy_loss="ppo", clip_eps_low=0.2, clip_eps_high=0.2, aggregation="seq_mean_batch_mean")


def _token_loss_grad(config, ratio, advantage):
    """d(per-token loss)/d(logp) at one token with the given ratio and advantage."""
    def loss(logp):
        return losses.ppo_clipped(logp, jnp.zeros(()), jnp.asarray(advantage), jnp.ones(()),
                                  config.loss).loss
    return float(jax.grad(loss)(jnp.log(jnp.asarray(ratio, jnp.float32))))


def test_clipped_surrogate_is_flat_outside_the_clip_range():
    config = RLConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    for ratio in (1.3, 2.0):  # above 1 + eps_high with A > 0
        assert _token_loss_grad(config, ratio, 1.5) == 0.0
    for ratio in (0.7, 0.3):  # below 1 - eps_low with A < 0
        assert _token_loss_grad(config, ratio, -1.5) == 0.0
    # Inside the range, and on the sides where min() keeps the unclipped term: -A * ratio.
    for ratio, adv in ((1.0, 1.5), (1.25, 1.5), (0.85, -1.5), (0.5, 1.5), (1.5, -1.5)):
        np.testing.assert_allclose(_token_loss_grad(config, ratio, adv), -adv * ratio, rtol=1e-5)
    out = losses.ppo_clipped(jnp.log(jnp.asarray([1.3, 1.25, 0.7])), jnp.zeros(3),
                             jnp.asarray([1.0, 1.0, -1.0]), jnp.ones(3), config.loss)
    np.testing.assert_array_equal(np.asarray(out.clipped), [1.0, 0.0, 1.0])


def test_dual_clip_bounds_negative_advantage_loss():
    config = RLConfig(dual_clip=3.0)
    adv = -2.0
    out = losses.ppo_clipped(jnp.log(jnp.asarray([5.0, 2.0])), jnp.zeros(2),
                             jnp.asarray([adv, adv]), jnp.ones(2), config.loss)
    np.testing.assert_allclose(np.asarray(out.loss), [3.0 * 2.0, 2.0 * 2.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.clipped), [1.0, 0.0])
    assert _token_loss_grad(config, 5.0, adv) == 0.0
    assert _token_loss_grad(config, 2.0, adv) != 0.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_batch_mean"])
def test_aggregation_over_unequal_pieces_equals_the_whole(mode):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12, 20)).astype(np.float32)
    mask = np.zeros((12, 20), np.float32)
    for row, (start, end) in enumerate(rng.integers(1, 20, size=(12, 2))):
        mask[row, min(start, end):max(start, end) + 1] = 1
    whole = losses.Normalizer.of(jnp.asarray(mask))
    full = losses.aggregate(jnp.asarray(values), jnp.asarray(mask), mode, whole)
    pieces = [(0, 2), (2, 9), (9, 12)]  # rows of unequal counts and token totals
    parts = sum(losses.aggregate(jnp.asarray(values[a:b]), jnp.asarray(mask[a:b]), mode, whole)
                for a, b in pieces)
    np.testing.assert_allclose(float(parts), float(full), rtol=1e-6)
    on = mask.astype(bool)
    if mode == "token_mean":
        want = values[on].mean()
    else:
        want = np.mean([values[r][on[r]].mean() for r in range(12)])
    np.testing.assert_allclose(float(full), want, rtol=1e-5)
    # A NaN on a masked-out token cannot leak into the loss.
    values[~on] = np.nan
    assert np.isfinite(float(losses.aggregate(jnp.asarray(values), jnp.asarray(mask), mode, whole)))


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model()


def test_chunked_logprobs_match_full_logits(model):
    graphdef, params = model
    tokens = jax.random.randint(jax.random.key(1), (3, 13), 0, 64)

    @jax.jit
    def compare(params, tokens):
        logp, entropy = policy_logprobs(graphdef, params, tokens, 5)  # 12 targets, chunks of 5
        log_probs = jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens), axis=-1)[:, :-1]
        want = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]  # t -> t+1
        return logp, entropy, want, -(jnp.exp(log_probs) * log_probs).sum(-1)

    logp, entropy, want, want_entropy = compare(params, tokens)
    np.testing.assert_allclose(np.asarray(logp[:, 1:]), np.asarray(want), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(logp[:, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(entropy[:, 1:]), np.asarray(want_entropy), atol=5e-6)
    np.testing.assert_array_equal(np.asarray(entropy[:, 0]), 0.0)


def test_loss_gradient_matches_finite_differences(model):
    """Both aggregations, with the KL in the loss, in one compiled value-and-gradient."""
    graphdef, params = model
    configs = [RLConfig(aggregation=a, kl_coef=0.05, kl_in="loss", kl_estimator="k3",
                        logprob_chunk=4) for a in ("token_mean", "seq_mean_batch_mean")]
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 10)), jnp.int32)
    mask = np.zeros((4, 10), np.float32)
    mask[:, 3:9] = 1
    mask[1, 5:7] = 0
    mask = jnp.asarray(mask)
    logp0, _ = jax.jit(policy_logprobs, static_argnums=(0, 3))(graphdef, params, tokens, 4)
    # Old and reference log-probs near the current ones: ratios inside and outside the clip range.
    old = logp0 + jnp.asarray(rng.normal(scale=0.15, size=(4, 10)), jnp.float32)
    ref = logp0 + jnp.asarray(rng.normal(scale=0.3, size=(4, 10)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
    normalizer = losses.Normalizer.of(mask)

    def loss(p):
        logp, entropy = policy_logprobs(graphdef, p, tokens, 4)
        return jnp.stack([losses.policy_objective(logp, old, adv, mask, c.loss, normalizer,
                                                  ref_logp=ref, entropy=entropy)[0]
                          for c in configs])

    value_and_jacobian = jax.jit(lambda p: (loss(p), jax.jacrev(loss)(p)))
    _, jacobian = value_and_jacobian(params)
    directions = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    h = 1e-3
    plus, _ = value_and_jacobian(jax.tree.map(lambda x, d: x + h * d, params, directions))
    minus, _ = value_and_jacobian(jax.tree.map(lambda x, d: x - h * d, params, directions))
    finite_difference = np.asarray(plus - minus) / (2 * h)
    analytic = sum(np.asarray(jnp.tensordot(j, d, axes=d.ndim))
                   for j, d in zip(jax.tree.leaves(jacobian), jax.tree.leaves(directions)))
    assert np.all(np.abs(analytic) > 1e-2)  # a real signal, not two zeros
    np.testing.assert_allclose(analytic, finite_difference, rtol=2e-2)
