"""Memory plans for TPU slices, read from XLA's compile of the real programs.

`jax[tpu]` (libtpu) compiles for a TPU topology on a machine with no TPU
(`jax.experimental.topologies`). This module compiles, for such a topology:
  - the RL train step (train_step.py) with its shardings and donation,
  - the reference log-prob forward (when kl_coef > 0), on bf16 reference params,
  - the sampler's own programs (sampling/sampler.py) on the bf16 sampling
    copy of the weights (sharding.SAMPLING_RULES) and a whole SamplingState:
    `decode_segment` (the while loop over segment_len tokens the rollout
    runs) attending the whole cache, and attending the largest window below
    it (that window is cut out of the cache: a copy), `extend` of one
    max_extend_chunk (a prefill or a document insert) attending the whole cache,
    and the continuous schedule's `extend_rows` (an eighth of the rows) and
    `compact` (the last rows into half the slots, or the largest fraction the rollout uses),
and reads XLA's per-device memory analysis of each. Resident buffers
(params, optimizer state, reference params, sampling copy, KV cache) are
also counted exactly from their shard shapes, so the plan says what each
byte is for. Nothing is allocated: all inputs are abstract.

Phases of one RL iteration, each a sum of what is live at once (per device):
  sampling:  train state + reference + the largest sampler program's arguments (sampling
             copy, SamplingState with its KV cache, stop table) + temporaries
             + outputs not aliased to the donated state
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from searcher_jax import continuous_rollout
from searcher_jax.model import attention, sharding
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl import train_step as train_lib
from searcher_jax.rl.train_step import with_shardings
from searcher_jax.rl.batch import RolloutBatch
from searcher_jax.rl.config import RLConfig
from searcher_jax.rollout import STOP_STRINGS
from searcher_jax.sampling import sampler as sampler_lib
from searcher_jax.sampling.state import init_state
from searcher_jax.sampling.stop_strings import build_stop_table

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
    sample_len: int  # KV cache length (the sampler's max_len)
    segment_len: int = 512  # tokens a decode segment samples (configs/base.py's sampler)
    max_extend_chunk: int = 512  # the longest extend call (SamplerConfig.max_extend_chunk)
    num_eos_ids: int = 2  # end-of-sequence ids per row (Qwen2.5's instruct models have 2)
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


def largest_window(config: sampler_lib.SamplerConfig) -> int | None:
    """The largest attend window below max_len that decode_segment is compiled for (None if
    none): the window the loop cuts out of the cache, so that call holds a copy of it."""
    buckets = {sampler_lib.attend_bucket(n, config.min_attend_bucket, config.max_len)
               for n in range(1, config.max_len + 1)}
    below = [b for b in buckets if b < config.max_len]
    return max(below) if below else None


def largest_compaction(slots: int, shards: int) -> int | None:
    """The most slots the continuous rollout compacts `slots` into; None when it never does
    (Llama's 260 rows over fsdp 4)."""
    return max(continuous_rollout.compaction_sizes(slots, shards), default=None)


def _sampler_programs(spec: PlanSpec, model_config: ModelConfig, mesh: Mesh):
    """Lowers the sampler's jitted programs as the rollout calls them, on abstract inputs.

    Returns ({name: lowered}, resident bytes of the sampling copy, of its KV cache and of
    the stop table)."""
    # sampling.sampling_copy: compute dtype, a separate output head, split over tensor only.
    copy_config = dataclasses.replace(model_config, tie_word_embeddings=False)
    copy_model = nnx.eval_shape(lambda: Decoder(copy_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(copy_model)
    params = _cast(params, jnp.dtype(model_config.dtype))
    params_shardings = sharding.state_shardings(params, mesh, sharding.SAMPLING_RULES)
    config = sampler_lib.SamplerConfig(max_len=spec.sample_len, segment_len=spec.segment_len,
                                       max_extend_chunk=spec.max_extend_chunk)
    rows = spec.sample_rows
    eos = jnp.zeros((rows, spec.num_eos_ids), jnp.int32)
    state = jax.eval_shape(lambda key: init_state(copy_model, rows, spec.sample_len, eos,
                                                  jnp.arange(rows, dtype=jnp.int32), key),
                           jax.random.key(0))
    state_shardings = sampler_lib.state_shardings(copy_model, state, mesh)
    # The real automaton's states ([S, V] tables): the rollout's stop strings over a byte
    # vocabulary padded to the model's.
    table = build_stop_table([bytes([i]) for i in range(256)], list(STOP_STRINGS),
                             vocab_size=model_config.vocab_size)
    stop_table = {name: jax.ShapeDtypeStruct(getattr(table, name).shape,
                                             getattr(table, name).dtype,
                                             sharding=NamedSharding(mesh, PartitionSpec()))
                  for name in ("next_state", "stop_id", "overshoot")}
    args = (graphdef, with_shardings(params, params_shardings),
            with_shardings(state, state_shardings))
    decode = jax.jit(sampler_lib.decode_segment, static_argnames=("config", "attend_len"),
                     donate_argnums=(2,), out_shardings=(state_shardings, None))
    lowered = {"decode_segment": decode.lower(*args, stop_table, config=config,
                                              attend_len=spec.sample_len)}
    window = largest_window(config)
    if window is not None:
        lowered["decode_segment_window"] = decode.lower(*args, stop_table, config=config,
                                                        attend_len=window)
    extend = jax.jit(sampler_lib.extend, static_argnames=("attend_len",), donate_argnums=(2,),
                     out_shardings=state_shardings)
    chunk = min(spec.max_extend_chunk, spec.sample_len)
    lowered["extend"] = extend.lower(
        *args, jax.ShapeDtypeStruct((rows, chunk), jnp.int32, sharding=state_shardings.tokens),
        jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=state_shardings.cursor),
        attend_len=spec.sample_len)
    # The continuous schedule's programs: documents written for an eighth of the rows
    # (gathered, extended, scattered back), and the last rows moved into the most slots the
    # rollout compacts into (the smaller state is not donated: both are live while it copies).
    replicated = NamedSharding(mesh, PartitionSpec())
    part = max(rows // 8, 1)
    extend_rows = jax.jit(sampler_lib.extend_rows, static_argnames=("attend_len",),
                          donate_argnums=(2,), out_shardings=state_shardings)
    lowered["extend_rows"] = extend_rows.lower(
        *args, jax.ShapeDtypeStruct((part,), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((part, chunk), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((part,), jnp.int32, sharding=replicated),
        attend_len=spec.sample_len)
    half = largest_compaction(rows, mesh.shape["data"] * mesh.shape["fsdp"])
    if half is not None:
        lowered["compact"] = jax.jit(sampler_lib.compact_rows,
                                     out_shardings=state_shardings).lower(
            *args, jax.ShapeDtypeStruct((half,), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((half,), jnp.bool_, sharding=replicated))
    resident = {"sampling_params": shard_bytes(params, params_shardings),
                "kv_cache": shard_bytes(state.cache, state_shardings.cache),
                "stop_table": sum(x.size * x.dtype.itemsize for x in stop_table.values())}
    return lowered, resident


def _footprint(stats: Mapping[str, int]) -> int:
    """Bytes live while a program runs: its inputs, temporaries, and outputs not written
    over donated inputs."""
    return stats["arguments"] + stats["temporaries"] + stats["outputs"] - stats["aliased"]


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
    # "auto" attention means the TPU's path here (splash), not this host's; the train step
    # and log-prob programs trace under the mesh, so the decoder sees the TPU platform too
    # and runs the splash kernel in a shard_map (model/attention.py, train_step.py).
    model_config = dataclasses.replace(spec.model, attention=attention.resolve(
        spec.model.attention, devices[0].platform, spec.model.dtype))
    abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model)
    compute_dtype = jnp.dtype(spec.model.dtype)

    # Resident buffers, counted exactly from their shard shapes.
    state = jax.eval_shape(lambda p: train_lib.init_train_state(p, spec.rl), params)
    state_shardings = train_lib.train_state_shardings(state, mesh)
    ref_params = _cast(params, compute_dtype)
    ref_shardings = sharding.state_shardings(ref_params, mesh)
    sampler_lowered, sampler_resident = _sampler_programs(spec, model_config, mesh)
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
        **sampler_resident,
        "rollout_batch": shard_bytes(batch, batch_shardings),
    }

    programs = {}
    step = train_lib.make_train_step(graphdef, state, spec.rl, mesh)
    programs["train_step"] = _compile_stats(step.lower(with_shardings(state, state_shardings),
                                                       with_shardings(batch, batch_shardings)))
    for name, lowered in sampler_lowered.items():
        programs[name] = _compile_stats(lowered)
    rows = sharding.batch_sharding(mesh, 2)
    if spec.rl.uses_reference:
        logprob_fn = train_lib.make_logprob_fn(graphdef, spec.rl, ref_params, mesh)
        programs["reference_logprobs"] = _compile_stats(logprob_fn.lower(
            with_shardings(ref_params, ref_shardings),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)))

    errors = {name: stats["error"] for name, stats in programs.items() if "error" in stats}
    state_bytes = resident["params"] + resident["optimizer_state"]
    phases = {}
    if not errors.keys() & sampler_lowered.keys():
        phases["sampling"] = (state_bytes + resident["reference_params"]
                              + max(_footprint(programs[name]) for name in sampler_lowered))
    if "train_step" not in errors:
        train = programs["train_step"]
        phases["training"] = resident["reference_params"] + _footprint(train)
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
