"""Memory plans for TPU slices, read from XLA's compile of the real programs.

`jax[tpu]` (libtpu) compiles for a TPU topology on a machine with no TPU
(`jax.experimental.topologies`). This module compiles, for such a topology:
  - the RL train step (train_step.py) with its shardings and donation,
  - the reference log-prob forward (when kl_coef > 0), on bf16 reference params,
  - one decode step of the model with a KV cache on the bf16 sampling copy
    of the weights (sharding.SAMPLING_RULES): the program the sampler's
    decode loop repeats,
and reads XLA's per-device memory analysis of each. Resident buffers
(params, optimizer state, reference params, sampling copy, KV cache) are
also counted exactly from their shard shapes, so the plan says what each
byte is for. Nothing is allocated: all inputs are abstract.

Phases of one RL iteration, each a sum of what is live at once (per device):
  sampling:  train state + reference + sampling copy + KV cache + decode temporaries
  reference: train state + reference + batch + log-prob temporaries (kl_coef > 0)
  training:  train step arguments (state, reference, batch) + its temporaries
             + outputs not aliased to donated inputs
The peak is the largest phase; it is compared with the chip's HBM.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from searcher_jax.model import attention, sharding
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl import train_step as train_lib
from searcher_jax.rl.train_step import with_shardings
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig

GIB = 1 << 30
# Nominal HBM per chip by jax device_kind (compile-only devices report no memory size).
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e
}


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One memory-plan question: this model and RL recipe on this slice and mesh."""
    model: ModelConfig  # Run fields matter: dtype (compute), scan_layers, remat, attention.
    rl: RLConfig
    topology: str  # e.g. "v5p:2x4x4" (32 chips), "v5e:8x8" (64 chips)
    mesh_shape: Mapping[str, int]  # e.g. {"fsdp": 8, "tensor": 4}
    train_rows: int  # rows of one rollout batch (prompts * samples per prompt)
    train_len: int  # tokens per row (prompt + response, padded)
    sample_rows: int  # rows the sampler decodes at once
    sample_len: int  # KV cache length
    # XLA's exec_time_optimization_effort in [-1, 1]; None keeps the default (what a run
    # compiles). -1 compiles about 10x faster for checks, with a different schedule and
    # so different temporaries: use it for tests, not for the numbers.
    compile_effort: float | None = None


def topology_devices(topology: str):
    """Compile-only TPU devices of a topology name; needs libtpu (`pip install "jax[tpu]"`).

    libtpu takes a machine-wide lock file on load; compiling touches no TPU, so
    several processes may do it at once (ALLOW_MULTIPLE_LIBTPU_LOAD).
    """
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); compiling for "
            f"TPU without a TPU needs libtpu: pip install \"jax[tpu]=={jax.__version__}\"") from e


def shard_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree of arrays placed by `shardings` (the largest shard)."""
    leaves = jax.tree.leaves(abstract_tree)
    shards = train_lib.leaf_shardings(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
    return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(leaves, shards))


def _compile_stats(lowered) -> dict[str, Any]:
    """XLA's per-device memory analysis, or {"error": ...} when XLA finds it cannot fit HBM."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"error": str(e).splitlines()[0]}
    analysis = compiled.memory_analysis()
    return {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "code": analysis.generated_code_size_in_bytes,
    }


def _cast(abstract_params, dtype):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract_params)


def _decode_step(graphdef):
    def step(params, cache, tokens, write_index):
        model = nnx.merge(graphdef, params)
        hidden, cache = model.forward_hidden(tokens, cache=cache, write_index=write_index)
        logits = model.logits(hidden[:, -1])  # [B, V]
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache
    return step


def _cache_shardings(cache, model: Decoder, mesh: Mesh):
    """The KV cache split like the sampling weights: rows over (data, fsdp), kv heads over tensor."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # pylint: disable=unnecessary-lambda-assignment
    leaves, treedef = jax.tree.flatten(cache)
    axes = jax.tree.leaves(model.cache_logical_axes(), is_leaf=is_axes)
    return treedef.unflatten([
        NamedSharding(mesh, sharding.logical_to_spec(a, x.shape, mesh, sharding.SAMPLING_RULES,
                                                     "kv_cache"))
        for x, a in zip(leaves, axes)])


def memory_plan(spec: PlanSpec) -> dict[str, Any]:
    """Compiles the programs of `spec` for its TPU topology; per-device bytes, see module doc."""
    if spec.compile_effort is None:
        return _memory_plan(spec)
    previous = jax.config.jax_exec_time_optimization_effort
    jax.config.update("jax_exec_time_optimization_effort", spec.compile_effort)
    try:
        return _memory_plan(spec)
    finally:
        jax.config.update("jax_exec_time_optimization_effort", previous)


def _memory_plan(spec: PlanSpec) -> dict[str, Any]:
    devices = topology_devices(spec.topology)
    mesh = sharding.make_mesh(dict(spec.mesh_shape), devices=devices)
    # "auto" attention means the TPU's path here, not this host's (model/attention.py).
    model_config = dataclasses.replace(
        spec.model, attention=attention.resolve(spec.model.attention, devices[0].platform))
    abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model)
    compute_dtype = jnp.dtype(spec.model.dtype)

    # Resident buffers, counted exactly from their shard shapes.
    state = jax.eval_shape(lambda p: train_lib.init_train_state(p, spec.rl), params)
    state_shardings = train_lib.train_state_shardings(state, mesh)
    ref_params = _cast(params, compute_dtype)
    ref_shardings = sharding.state_shardings(ref_params, mesh)
    sample_params = _cast(params, compute_dtype)
    sample_shardings = sharding.state_shardings(sample_params, mesh, sharding.SAMPLING_RULES)
    cache = jax.eval_shape(lambda: abstract_model.init_cache(spec.sample_rows, spec.sample_len))
    cache_shardings = _cache_shardings(cache, abstract_model, mesh)
    b, t = spec.train_rows, spec.train_len
    batch = RolloutBatch(
        tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
        loss_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_),
        rewards=jax.ShapeDtypeStruct((b,), jnp.float32),
        ref_logprobs=jax.ShapeDtypeStruct((b, t), jnp.float32) if spec.rl.uses_reference else None)
    batch_shardings = train_lib.batch_shardings(batch, mesh)
    resident = {
        "params": shard_bytes(state.params, state_shardings.params),
        "optimizer_state": shard_bytes(state.opt_state, state_shardings.opt_state),
        "reference_params": (shard_bytes(ref_params, ref_shardings) if spec.rl.uses_reference
                             else 0),
        "sampling_params": shard_bytes(sample_params, sample_shardings),
        "kv_cache": shard_bytes(cache, cache_shardings),
        "rollout_batch": shard_bytes(batch, batch_shardings),
    }

    programs = {}
    step = train_lib.make_train_step(graphdef, state, spec.rl, mesh)
    programs["train_step"] = _compile_stats(step.lower(with_shardings(state, state_shardings),
                                                       with_shardings(batch, batch_shardings)))
    decode = jax.jit(_decode_step(graphdef), donate_argnums=1)
    rows = sharding.batch_sharding(mesh, 2)
    programs["decode_step"] = _compile_stats(decode.lower(
        with_shardings(sample_params, sample_shardings), with_shardings(cache, cache_shardings),
        jax.ShapeDtypeStruct((spec.sample_rows, 1), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((spec.sample_rows,), jnp.int32,
                             sharding=sharding.batch_sharding(mesh, 1))))
    if spec.rl.uses_reference:
        logprob_fn = train_lib.make_logprob_fn(graphdef, spec.rl, ref_params, mesh)
        programs["reference_logprobs"] = _compile_stats(logprob_fn.lower(
            with_shardings(ref_params, ref_shardings),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)))

    errors = {name: stats["error"] for name, stats in programs.items() if "error" in stats}
    state_bytes = resident["params"] + resident["optimizer_state"]
    phases = {}
    if "decode_step" not in errors:
        phases["sampling"] = (state_bytes + resident["reference_params"]
                              + resident["sampling_params"] + resident["kv_cache"]
                              + programs["decode_step"]["temporaries"])
    if "train_step" not in errors:
        train = programs["train_step"]
        phases["training"] = (train["arguments"] + resident["reference_params"]
                              + train["temporaries"] + train["outputs"] - train["aliased"])
    if spec.rl.uses_reference and "reference_logprobs" not in errors:
        ref = programs["reference_logprobs"]
        phases["reference"] = (state_bytes + resident["rollout_batch"] + ref["arguments"]
                               + ref["temporaries"] + ref["outputs"])
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    peak = max(phases.values()) if phases else None
    fits = False if errors else (None if hbm is None else peak <= hbm)
    return {
        "topology": spec.topology,
        "device_kind": kind,
        "num_devices": len(devices),
        "mesh": dict(mesh.shape),
        "attention": model_config.attention,
        "num_params": spec.model.num_params,
        "hbm_bytes": hbm,
        "resident": resident,
        "programs": programs,
        "phases": phases,
        "peak_bytes": peak,
        "fits": fits,
        "errors": errors,
    }


def format_plan(plan: Mapping[str, Any]) -> str:
    """A human-readable table of one plan (GiB per device)."""
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # pylint: disable=unnecessary-lambda-assignment
    lines = [f"{plan['topology']} ({plan['num_devices']} x {plan['device_kind']}), mesh "
             f"{plan['mesh']}, {plan['num_params'] / 1e9:.2f}B params; bytes per device:"]
    for name, value in plan["resident"].items():
        lines.append(f"  resident {name:<24}{gib(value)}")
    for name, stats in plan["programs"].items():
        if "error" in stats:
            lines.append(f"  {name:<18} {stats['error']}")
            continue
        lines.append(f"  {name:<18} arguments {gib(stats['arguments'])}  temporaries "
                     f"{gib(stats['temporaries'])}  outputs {gib(stats['outputs'])}  aliased "
                     f"{gib(stats['aliased'])}")
    for name, value in plan["phases"].items():
        lines.append(f"  phase {name:<27}{gib(value)}")
    hbm = plan["hbm_bytes"]
    if plan["peak_bytes"] is None:
        lines.append("  DOES NOT FIT: no program compiled within HBM")
        return "\n".join(lines)
    verdict = "unknown HBM" if hbm is None else (
        f"{'fits' if plan['fits'] else 'DOES NOT FIT'} in {hbm / GIB:.0f} GiB HBM "
        f"({100 * plan['peak_bytes'] / hbm:.0f}%)")
    lines.append(f"  peak {gib(plan['peak_bytes'])}: {verdict}")
    return "\n".join(lines)
