"""The pure RL train step: one rollout batch in, several optimizer steps out.

    step(state, batch) -> (state, metrics)

Inside one jit, in order:
  1. old log-probs of every row with the rollout (current) params, micro-batch
     by micro-batch, through the same `policy_logprobs` the loss calls;
  2. the KL reward (when the KL goes into the reward) against the batch's
     reference log-probs, and the advantages over the whole rollout batch
     (whitening statistics are global, before any split);
  3. for each mini-batch, one optimizer step: gradients summed over its
     micro-batches, the loss normalised by the mini-batch's global row and
     token counts, then clip + Adam. A non-finite loss or gradient norm keeps
     params and optimizer state as they were and counts a skipped step; so does
     a mini-batch without any loss token (every prompt in it dropped by dynamic
     sampling), counted as an empty step: Adam's momentum would otherwise move
     the params on a zero gradient.

The first mini-batch scores its old log-probs as `stop_gradient(logp)` of
the very forward it differentiates: the params are still the rollout params,
so this is the same value, and the ratio is exactly 1 there regardless of
how XLA fuses a forward versus a forward-for-gradient.

Params and Adam state are fp32; the model computes in its config's dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searcher_jax.model import sharding
from searcher_jax.rl import advantages as adv_lib
from searcher_jax.rl import kl as kl_lib
from searcher_jax.rl import length_buckets
from searcher_jax.rl import losses
from searcher_jax.rl.batch import RolloutBatch, check_batch, split_rows, unsplit_rows
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.logprobs import policy_logprobs
from searcher_jax.rl.optimizer import learning_rate_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any  # nnx.State of fp32 parameters
    opt_state: Any  # optax state, fp32
    step: jax.Array  # int32: optimizer steps applied (drives the lr schedule)
    skipped: jax.Array  # int32: optimizer steps skipped for a non-finite loss or gradient


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "step", "skipped"],
                                 meta_fields=[])


def init_train_state(params, config: RLConfig) -> TrainState:
    """A fresh state for fp32 `params` (an nnx.State)."""
    return TrainState(params=params, opt_state=make_optimizer(config).init(params),
                      step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


# --- Shardings -------------------------------------------------------------------------------

def train_state_shardings(abstract_state: TrainState, mesh: Mesh, rules=sharding.DEFAULT_RULES):
    """NamedShardings for a TrainState: params by the rules, Adam moments like their params."""
    param_shardings = sharding.state_shardings(abstract_state.params, mesh, rules)
    param_paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(abstract_state.params)]
    by_path = dict(zip(param_paths, leaf_shardings(param_shardings)))
    shapes = {path: leaf.shape for path, leaf in
              jax.tree_util.tree_leaves_with_path(abstract_state.params)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf(path, leaf):
        # An optimizer leaf mirrors a parameter when its path ends with that parameter's path
        # (Adam's mu and nu); anything else (counts) is replicated.
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and tuple(leaf.shape) == tuple(shapes[tuple(path[start:])]):
                return match
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state)
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated,
                      skipped=replicated)


def leaf_shardings(shardings) -> list:
    """The shardings of a tree in leaf order (a sharding may stand for a whole nnx Variable)."""
    return jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def with_shardings(tree, shardings):
    """`tree` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying `shardings`: the
    abstract input of a lowering or of a checkpoint restore."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, leaf_shardings(shardings))])


def batch_shardings(batch: RolloutBatch, mesh: Mesh) -> RolloutBatch:
    """Rows over (data, fsdp), everything else replicated."""
    return jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)


def _traced_under(mesh: Mesh | None, fn):
    """fn, traced with `mesh` as the context mesh: the decoder reads its platform to pick
    attention (a TPU slice's when memory_plan.py compiles for one on a CPU host), and the
    splash kernel, which GSPMD cannot partition, runs in a shard_map over it
    (model/attention_kernels.py)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return traced


def _constrain_rows(x, mesh: Mesh | None, row_axis: int):
    """Keeps dimension `row_axis` sharded over (data, fsdp) after a reshape."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[row_axis] = ("data", "fsdp")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


# --- Gradients of one optimizer step ---------------------------------------------------------

def micro_batch_loss(params, graphdef, micro: dict, normalizer: losses.Normalizer,
                     config: RLConfig, old_is_current):
    """Loss share and metrics of one micro-batch (arrays [m, T] in `micro`)."""
    logp, entropy = policy_logprobs(graphdef, params, micro["tokens"], config.logprob_chunk)
    old_logp = jnp.where(old_is_current, jax.lax.stop_gradient(logp), micro["old_logp"])
    return losses.policy_objective(logp, old_logp, micro["advantages"], micro["loss_mask"],
                                   config.loss, normalizer, ref_logp=micro.get("ref_logp"),
                                   entropy=entropy, sampler_logp=micro.get("sampler_logp"))


def accumulate_gradients(params, graphdef, micro_batches: dict, config: RLConfig,
                         old_is_current=False, grad_shardings=None,
                         widths: tuple[int, ...] | None = None):
    """Gradients of one optimizer step, summed over micro-batches.

    Args:
      micro_batches: arrays [num_micro, m, T] (tokens, loss_mask, advantages,
        old_logp, optionally ref_logp and sampler_logp).
      old_is_current: True when params are the rollout params (see module doc).
      grad_shardings: the params' shardings, to keep the accumulator laid out like them.
      widths: static widths (length_buckets.bucket_widths); each micro-batch then runs at the
        smallest that holds its last loss token. None: every one at the full width T.
    Returns:
      (grads, metrics): the step's gradient and its metrics (loss, pg_loss, ...).
    """
    normalizer = losses.Normalizer.of(micro_batches["loss_mask"])
    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def micro_grads(micro):
        (_, metrics), grads = grad_fn(params, graphdef, micro, normalizer, config, old_is_current)
        return metrics, grads

    def body(carry, micro):
        grad_sum, metric_sum = carry
        if widths is None:
            metrics, grads = micro_grads(micro)
        else:
            needed = length_buckets.row_ends(micro["loss_mask"].astype(bool)).max()
            metrics, grads = length_buckets.at_width(micro_grads, widths, needed, micro)
        grad_sum = constrain(jax.tree.map(jnp.add, grad_sum, grads))
        return (grad_sum, jax.tree.map(jnp.add, metric_sum, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(params, graphdef, first, normalizer, config, old_is_current)[0][1])
    init = (constrain(jax.tree.map(jnp.zeros_like, params)),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
    (grads, metrics), _ = jax.lax.scan(body, init, micro_batches)
    return grads, metrics


# --- Rollout-batch preparation ---------------------------------------------------------------

def _masked_stats(prefix: str, x, mask):
    """Mean, std, min and max over the mask's tokens; all 0 when it has none (a batch whose
    every prompt dynamic sampling dropped)."""
    mean, var = adv_lib.masked_mean_var(x, mask)
    any_token = mask.any()
    return {f"{prefix}_mean": mean, f"{prefix}_std": jnp.sqrt(var),
            f"{prefix}_min": jnp.where(any_token, jnp.min(jnp.where(mask, x, jnp.inf)), 0.0),
            f"{prefix}_max": jnp.where(any_token, jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)}


def _positive_logp(logp, advantages, loss_mask):
    """The mean, over responses whose advantage is positive, of each one's token-mean log-prob
    under the rollout params (`positive_logp_mean`; 0 when no response is positive) and their
    count (`positive_rows`). A response's advantage is its mean over its loss tokens (one value
    per row under every estimator without a KL in the reward). A policy whose rewarded answers
    grow less likely step after step is collapsing (collapse.py), whatever its reward says."""
    mask = loss_mask.astype(bool)
    tokens = jnp.maximum(mask.sum(axis=1), 1)
    row_logp = jnp.where(mask, logp, 0.0).sum(axis=1) / tokens  # [B]
    positive = mask.any(axis=1) & (jnp.where(mask, advantages, 0.0).sum(axis=1) / tokens > 0)
    count = positive.sum()
    return {"positive_logp_mean": jnp.where(positive, row_logp, 0.0).sum() / jnp.maximum(count, 1),
            "positive_rows": count.astype(jnp.float32)}


def _rollout_metrics(batch: RolloutBatch, loss_mask, sampled, old_logp, advantages, returns,
                     config):
    """loss_mask: the tokens the loss uses; sampled: every token the sampler drew (rows that
    dynamic sampling dropped included)."""
    metrics = {"reward_mean": batch.rewards.mean(), "reward_std": batch.rewards.std(),
               "response_tokens_mean": loss_mask.sum(axis=1).mean()}
    metrics.update(_masked_stats("advantage", advantages, loss_mask))
    metrics.update(_masked_stats("return", returns, loss_mask))
    metrics.update(_positive_logp(old_logp, advantages, loss_mask))
    if config.uses_reference:
        ref_kl = kl_lib.token_kl(old_logp, batch.ref_logprobs, config.kl_estimator)
        metrics["ref_kl_mean"] = adv_lib.masked_mean_var(ref_kl, loss_mask)[0]
    if batch.sampler_logprobs is not None:
        # The sampler/trainer mismatch, every step: the sampler's kernels (a bf16 copy, a KV-cached
        # decode) differ from the training forward. A large gap flags a bug, or calls for
        # config.tis_cap (truncated importance sampling). Over every sampled token: a prompt
        # dynamic sampling dropped was sampled by the same kernels.
        gap = jnp.abs(batch.sampler_logprobs - old_logp)
        metrics["sampler_logp_abs_diff_mean"] = adv_lib.masked_mean_var(gap, sampled)[0]
        metrics["sampler_logp_abs_diff_max"] = jnp.max(jnp.where(sampled, gap, 0.0))
    return metrics


# --- The step --------------------------------------------------------------------------------

def build_train_step(graphdef, config: RLConfig, mesh: Mesh | None = None, param_shardings=None):
    """The un-jitted step function (state, batch) -> (state, metrics); see make_train_step."""
    tx = make_optimizer(config)
    schedule = learning_rate_schedule(config)

    def step(state: TrainState, batch: RolloutBatch):
        check_batch(batch, config)
        b, t = batch.tokens.shape
        loss_config = config
        widths = None
        if config.length_buckets > 1:
            widths = length_buckets.bucket_widths(t, config.length_buckets)
            # seq_sum_batch_mean's constant stays the batch's width, not a micro-batch's.
            loss_config = dataclasses.replace(config, loss_norm_tokens=config.loss_norm_tokens or t)
        num_mini = config.steps_per_batch(b)
        num_micro = config.mini_batch_size // config.micro_batch_size
        scored = jnp.arange(t)[None, :] >= 1  # column 0 has no log-prob (logprobs.py)
        sampled = batch.loss_mask.astype(bool) & scored  # [B, T]
        loss_mask = sampled if batch.keep is None else sampled & batch.keep.astype(bool)[:, None]

        def split(x):  # [B, ...] -> [num_mini, num_micro, m, ...]
            return _constrain_rows(split_rows(x, num_mini, num_micro), mesh, 2)

        def unsplit(x):
            return _constrain_rows(unsplit_rows(x), mesh, 0)

        tokens, split_sampled = split(batch.tokens), split(sampled)  # [k, nm, m, T]
        order = None
        if widths is not None:
            # Each mini-batch's rows by length (its last sampled token), so that its
            # micro-batches hold rows of like length; the same rows, only reordered.
            order = length_buckets.mini_batch_order(length_buckets.row_ends(split_sampled))
            tokens, split_sampled = (_constrain_rows(length_buckets.permute(x, order), mesh, 2)
                                     for x in (tokens, split_sampled))

        # 1. Old log-probs, micro-batch by micro-batch (the loss's shapes and function).
        def logprobs(micro):
            logp = policy_logprobs(graphdef, state.params, micro["tokens"], config.logprob_chunk)[0]
            return jnp.pad(logp, ((0, 0), (0, t - logp.shape[1])))

        def micro_logprobs(micro):
            if widths is None:
                return logprobs(micro)
            # Log-probs past a row's last sampled token are never read.
            needed = length_buckets.row_ends(micro["sampled"]).max()
            return length_buckets.at_width(logprobs, widths, needed, micro)

        flat = lambda x: x.reshape(num_mini * num_micro, *x.shape[2:])  # pylint: disable=unnecessary-lambda-assignment
        micro_inputs = {"tokens": flat(tokens)}
        if widths is not None:  # what picks each micro-batch's width
            micro_inputs["sampled"] = flat(split_sampled)
        old_logp = jax.lax.map(micro_logprobs, micro_inputs)
        old_logp = old_logp.reshape(tokens.shape)
        if order is not None:
            old_logp = _constrain_rows(length_buckets.unpermute(old_logp, order), mesh, 2)
        old_logp = unsplit(old_logp)  # [B, T]

        # 2. Advantages over the whole rollout batch.
        kl_reward = None
        if config.uses_reference and config.kl_in == "reward":
            kl_reward = kl_lib.token_kl(old_logp, batch.ref_logprobs, config.kl_estimator)
        advantages, returns = adv_lib.compute_advantages(
            config.estimator, batch.rewards, loss_mask, config.samples_per_prompt, kl=kl_reward,
            kl_coef=config.kl_coef)
        metrics = _rollout_metrics(batch, loss_mask, sampled, old_logp, advantages, returns,
                                   config)

        # 3. One optimizer step per mini-batch.
        per_step = {"tokens": tokens, "loss_mask": split(loss_mask),
                    "advantages": split(advantages), "old_logp": split(old_logp)}
        if config.uses_reference and config.kl_in == "loss":
            per_step["ref_logp"] = split(batch.ref_logprobs)
        if config.tis_cap is not None:
            per_step["sampler_logp"] = split(batch.sampler_logprobs)
        if order is not None:  # in the order of the tokens (already sorted above)
            per_step = {name: x if name == "tokens" else
                        _constrain_rows(length_buckets.permute(x, order), mesh, 2)
                        for name, x in per_step.items()}
        is_first = jnp.arange(num_mini) == 0

        def optimizer_step(carry: TrainState, inputs):
            mini, old_is_current = inputs
            grads, step_metrics = accumulate_gradients(carry.params, graphdef, mini, loss_config,
                                                       old_is_current, param_shardings, widths)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(grad_norm)
            # The normalizer's token count: 0 when dynamic sampling dropped every prompt here.
            empty = losses.Normalizer.of(mini["loss_mask"]).tokens == 0
            apply = finite & ~empty
            updates, opt_state = tx.update(grads, carry.opt_state, carry.params)
            params = optax.apply_updates(carry.params, updates)
            keep = lambda new, old: jnp.where(apply, new, old)  # pylint: disable=unnecessary-lambda-assignment
            new = TrainState(params=jax.tree.map(keep, params, carry.params),
                             opt_state=jax.tree.map(keep, opt_state, carry.opt_state),
                             step=carry.step + apply.astype(jnp.int32),
                             skipped=carry.skipped + (~finite).astype(jnp.int32))
            step_metrics.update(grad_norm=grad_norm, learning_rate=schedule(carry.step),
                                skipped=(~finite).astype(jnp.float32),
                                empty=(finite & empty).astype(jnp.float32))
            return new, step_metrics

        state, step_metrics = jax.lax.scan(optimizer_step, state, (per_step, is_first))
        metrics.update({name: value.mean() for name, value in step_metrics.items()
                        if name not in ("skipped", "empty")})
        metrics["skipped_steps"] = step_metrics["skipped"].sum()
        # Mini-batches without a loss token (dynamic sampling "drop"): no optimizer update.
        metrics["empty_steps"] = step_metrics["empty"].sum()
        metrics["optimizer_steps"] = jnp.asarray(num_mini, jnp.float32)
        metrics["total_skipped"] = state.skipped.astype(jnp.float32)
        return state, metrics

    return _traced_under(mesh, step)


def make_train_step(graphdef, abstract_state: TrainState, config: RLConfig,
                    mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES):
    """The jitted step. With a mesh: NamedShardings from the model's rules; the state is donated.

    `abstract_state` gives the state's structure and shapes (a real state or
    jax.eval_shape of one).
    """
    if mesh is None:
        return jax.jit(build_train_step(graphdef, config), donate_argnums=0)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.micro_batch_size % batch_shards:
        raise ValueError(f"micro_batch_size {config.micro_batch_size} must be a multiple of the "
                         f"data x fsdp mesh size {batch_shards} (rows are split over them)")
    state_shardings = train_state_shardings(abstract_state, mesh, rules)
    return _ShardedStep(build_train_step(graphdef, config, mesh, state_shardings.params),
                        state_shardings, mesh)


class _ShardedStep:
    """A jitted step whose batch shardings follow the batch's fields (ref/sampler log-probs or not)."""

    def __init__(self, step, state_shardings, mesh):
        self._step, self._state_shardings, self._mesh = step, state_shardings, mesh
        self._jitted = {}

    def _fn(self, batch: RolloutBatch):
        key = tuple(x is None for x in (batch.ref_logprobs, batch.sampler_logprobs, batch.keep))
        if key not in self._jitted:
            replicated = NamedSharding(self._mesh, PartitionSpec())
            self._jitted[key] = jax.jit(
                self._step, in_shardings=(self._state_shardings, batch_shardings(batch, self._mesh)),
                out_shardings=(self._state_shardings, replicated), donate_argnums=0)
        return self._jitted[key]

    def __call__(self, state, batch):
        return self._fn(batch)(state, batch)

    def lower(self, state, batch):
        return self._fn(batch).lower(state, batch)


def make_init_fn(config: RLConfig, abstract_params, mesh: Mesh | None = None,
                 rules=sharding.DEFAULT_RULES):
    """A jitted params -> TrainState that creates the optimizer state in place on its shards."""
    if mesh is None:
        return jax.jit(lambda p: init_train_state(p, config))
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, config), abstract_params)
    shardings = train_state_shardings(abstract_state, mesh, rules)
    return jax.jit(lambda p: init_train_state(p, config), in_shardings=(shardings.params,),
                   out_shardings=shardings)


def make_logprob_fn(graphdef, config: RLConfig, abstract_params=None, mesh: Mesh | None = None,
                    rules=sharding.DEFAULT_RULES):
    """A jitted (params, tokens [B, T]) -> logp [B, T], micro-batch by micro-batch.

    For reference log-probs (any params dtype, e.g. a bf16 reference copy) and
    for checks; the train step computes its own old log-probs.
    """

    def fn(params, tokens):
        b = tokens.shape[0]
        if b % config.micro_batch_size:
            raise ValueError(f"{b} rows are not whole micro-batches of {config.micro_batch_size}")
        micro = split_rows(tokens, 1, b // config.micro_batch_size)[0]  # [nm, m, T]
        micro = _constrain_rows(micro, mesh, 1)
        logp = jax.lax.map(lambda x: policy_logprobs(graphdef, params, x, config.logprob_chunk)[0],
                           micro)
        return _constrain_rows(unsplit_rows(logp[None]), mesh, 0)

    if mesh is None:
        return jax.jit(fn)
    params_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    rows = sharding.batch_sharding(mesh, 2)
    return jax.jit(_traced_under(mesh, fn), in_shardings=(params_shardings, rows),
                   out_shardings=rows)
