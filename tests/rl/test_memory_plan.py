"""The TPU memory plan: a reduced-depth Qwen2.5-7B RL step compiled for a v5e 2x2 slice, no TPU.

Compiles with XLA's fastest schedule (compile_effort -1) to stay within CI time;
launch/bench_memory_plan.py compiles the full-size steps with the default one.
"""
import json

import jax
import pytest

from searcher_jax import continuous_rollout
from searcher_jax.model.config import ModelConfig
from searcher_jax.rl import memory_plan
from searcher_jax.rl.config import RLConfig
from searcher_jax.sampling import sampler

GIB = 1 << 30


@pytest.fixture(scope="module")
def plan(reference_dir):
    hf_config = json.loads((reference_dir / "hf_configs" / "Qwen2.5-7B" / "config.json").read_text())
    model = ModelConfig.from_hf(hf_config, dtype="bfloat16", scan_layers=True, remat=True,
                                num_layers=1)
    rl = RLConfig(estimator="reinforce_baseline", samples_per_prompt=4, kl_coef=1e-4,
                  mini_batch_size=8, micro_batch_size=4, logprob_chunk=256)
    spec = memory_plan.PlanSpec(model=model, rl=rl, topology="v5e:2x2",
                                mesh_shape={"fsdp": 2, "tensor": 2}, train_rows=16, train_len=512,
                                sample_rows=8, sample_len=1024, compile_effort=-1.0)
    return spec, memory_plan.memory_plan(spec)


def test_plan_counts_every_buffer(plan):
    spec, result = plan
    assert result["device_kind"] == "TPU v5 lite" and result["num_devices"] == 4
    assert result["attention"] == "splash"   # "auto" resolved for the TPU, not this host
    assert result["errors"] == {}
    assert result["hbm_bytes"] == 16 * GIB
    resident, programs = result["resident"], result["programs"]
    cfg = spec.model
    # fp32 params over 4 chips: every large matrix splits 4 ways (fsdp 2 x tensor 2).
    assert cfg.num_params * 4 / 4 <= resident["params"] < cfg.num_params * 4 / 4 * 1.01
    assert resident["optimizer_state"] == pytest.approx(2 * resident["params"], rel=1e-3)
    # bf16 reference in the training layout; bf16 sampling copy split over tensor only.
    assert resident["reference_params"] == pytest.approx(resident["params"] / 2, rel=1e-3)
    assert resident["sampling_params"] == pytest.approx(resident["params"], rel=1e-2)
    # KV cache [L, B, K, S, D] bf16, rows over fsdp 2 and kv heads over tensor 2.
    kv = 2 * cfg.num_layers * spec.sample_rows * cfg.num_kv_heads * spec.sample_len * cfg.head_dim * 2
    assert resident["kv_cache"] == kv // 4
    # XLA's own count of the train step's inputs is the state and batch we counted, plus
    # the TPU's tile padding of small arrays (biases, norms, scalars: kilobytes).
    train = programs["train_step"]
    state = resident["params"] + resident["optimizer_state"]
    assert 0 <= train["arguments"] - (state + resident["rollout_batch"]) < 64 << 10
    assert 0 <= train["aliased"] - state < 64 << 10  # the state is donated
    # Temporaries hold at least one fp32 gradient of the params.
    assert train["temporaries"] >= resident["params"]
    # The sampler's programs take the sampling copy, the SamplingState (its KV cache plus
    # [B, T] tokens and log-probs: 64 KiB here) and the stop table, whose 25 automaton rows
    # the TPU pads to its tiles (16 rows for the two int16 tables, 32 for the int8 one); the
    # state is donated and written in place.
    vocab = cfg.vocab_size
    assert resident["stop_table"] == 25 * vocab * (2 + 1 + 2)
    tile_padding = (32 - 25) * vocab * 2 * 2 + (32 - 25) * vocab
    sampler_inputs = (resident["sampling_params"] + resident["kv_cache"]
                      + resident["stop_table"] + tile_padding)
    # extend reads neither the output head (its logits wait for decode) nor the stop table,
    # and jit drops unused arguments.
    lm_head = vocab * cfg.hidden_size * 2 // 2   # bf16, split over tensor 2
    extend_inputs = sampler_inputs - resident["stop_table"] - tile_padding - lm_head
    for name, inputs in (("decode_segment", sampler_inputs),
                         ("decode_segment_window", sampler_inputs), ("extend", extend_inputs)):
        stats = programs[name]
        assert 0 <= stats["arguments"] - inputs < 256 << 10, name
        assert resident["kv_cache"] <= stats["aliased"] < resident["kv_cache"] + (256 << 10)
    # Attending a window below the whole cache, decode works on a copy of that window.
    window = memory_plan.largest_window(
        sampler.SamplerConfig(max_len=spec.sample_len, segment_len=spec.segment_len))
    assert window == 768   # 1024's buckets: 128, 192, 256, 384, 512, 768, 1024
    assert programs["decode_segment_window"]["temporaries"] >= resident["kv_cache"] * 3 // 4
    # The continuous schedule's: an eighth of the rows gathered for extend_rows, and compact
    # holding the whole state and its half-size copy at once.
    assert programs["extend_rows"]["arguments"] >= resident["kv_cache"]
    assert memory_plan._footprint(programs["compact"]) >= resident["kv_cache"] * 3 // 2  # pylint: disable=protected-access
    assert result["phases"]["sampling"] == (
        resident["params"] + resident["optimizer_state"] + resident["reference_params"]
        + max(memory_plan._footprint(programs[name])   # pylint: disable=protected-access
              for name in ("decode_segment", "decode_segment_window", "extend", "extend_rows",
                           "compact")))
    assert programs["reference_logprobs"]["arguments"] >= resident["reference_params"]
    assert result["peak_bytes"] == max(result["phases"].values())
    assert result["fits"] == (result["peak_bytes"] <= 16 * GIB)
    assert "DOES NOT FIT" in memory_plan.format_plan(result) or "fits in 16 GiB" in \
        memory_plan.format_plan(result)


def test_shard_bytes_counts_one_devices_share():
    devices = memory_plan.topology_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(devices, ("x",))
    arrays = [jax.ShapeDtypeStruct((12, 3), "float32"), jax.ShapeDtypeStruct((8,), "bfloat16"),
              jax.ShapeDtypeStruct((5,), "float32")]
    shardings = [jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")),
                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")),
                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())]
    # 12 x 3 fp32 over 4 chips: 3 rows each; 8 bf16 over 4: 2 each; the replicated 5 whole.
    assert memory_plan.shard_bytes(arrays, shardings) == 3 * 3 * 4 + 2 * 2 + 5 * 4
    with pytest.raises(ValueError, match="3 arrays but 2 shardings"):
        memory_plan.shard_bytes(arrays, shardings[:2])


@pytest.mark.parametrize("slots,shards,expected", [(512, 8, 256), (40, 4, 20), (24, 4, 12),
                                                   (24, 8, None), (260, 4, None), (64, 16, 32)])
def test_largest_compaction_is_the_rollouts_largest(slots, shards, expected):
    """The compaction the plan compiles is the largest the continuous rollout makes of
    `slots` over `shards` row shards (None: it never compacts, as Llama's 260 rows over 4)."""
    assert memory_plan.largest_compaction(slots, shards) == expected
    sizes = {continuous_rollout._compacted_size(held, slots, slots, shards)  # pylint: disable=protected-access
             for held in range(1, slots + 1)} - {slots}
    assert max(sizes, default=None) == expected
