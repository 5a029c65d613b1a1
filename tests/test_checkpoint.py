"""Checkpoints: exact round trips onto any mesh, save_every / max_to_keep, clear errors."""
import dataclasses
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from searcher_jax.checkpoint import (
    CheckpointConfig,
    CheckpointDamagedError,
    Checkpointer,
    abstract_train_state,
    restore_params,
)
from searcher_jax.model import sharding
from searcher_jax.model.config import ModelConfig
from searcher_jax.model.decoder import Decoder
from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.train_step import TrainState

RL = RLConfig(samples_per_prompt=4, mini_batch_size=8, micro_batch_size=8, total_steps=10)
MODEL = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
                    num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8)
# A failed orbax restore leaves its other reads to finish on a closed asyncio loop ("Event loop
# is closed", reported as unraisable): noise of the error path, not a failure.
ORBAX_ABORT_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
META = {"rollout_step": 4, "data_position": 128, "rng_seed": 0,
        "config": {"rl": dataclasses.asdict(RL), "model": dataclasses.asdict(MODEL)}}


def _abstract(config: ModelConfig, mesh) -> TrainState:
    """The TrainState of `config` as ShapeDtypeStructs on `mesh`; nothing is computed."""
    params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))[1]
    return abstract_train_state(params, RL, mesh)


def _state(abstract: TrainState, seed: int) -> TrainState:
    """Random values for every leaf (params, Adam moments, counts, step, skipped), placed on
    `abstract`'s shardings: a round trip must bring back each one exactly."""
    rng = np.random.default_rng(seed)

    def leaf(x):
        value = (rng.integers(1, 100, x.shape) if jnp.issubdtype(x.dtype, jnp.integer)
                 else rng.standard_normal(x.shape))
        return jax.device_put(value.astype(x.dtype), x.sharding)

    return jax.tree.map(leaf, abstract)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def abstract(mesh):
    return _abstract(MODEL, mesh)


@pytest.fixture(scope="module")
def state(abstract):
    return _state(abstract, 0)


def _assert_same(restored: TrainState, expected: TrainState):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_round_trip_onto_any_mesh(tmp_path, state, abstract, mesh):
    assert jax.tree.leaves(state.opt_state[1].nu)  # Adam's moments are in the state.
    donated = jax.tree.map(jnp.copy, state)
    with Checkpointer(CheckpointConfig(str(tmp_path), save_every=4)) as checkpointer:
        assert checkpointer.save(4, donated, META)
        for leaf in jax.tree.leaves(donated):  # As a donating train step would, before the write ends.
            leaf.delete()
        restored, meta = checkpointer.restore(None, abstract)
        assert meta == META
        _assert_same(restored, state)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
            assert got.sharding == want.sharding
        assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(restored))

        # Sharded save, one-device restore.
        one_device = sharding.make_mesh({}, devices=jax.devices()[:1])
        restored, _ = checkpointer.restore(4, abstract_train_state(abstract.params, RL, one_device))
        _assert_same(restored, state)
        assert {leaf.sharding.mesh for leaf in jax.tree.leaves(restored)} == {one_device}


def test_save_every_max_to_keep_and_latest(tmp_path, state, abstract):
    checkpointer = Checkpointer(CheckpointConfig(str(tmp_path), save_every=2, max_to_keep=2))
    assert checkpointer.latest_step() is None
    saved = [checkpointer.save(step, state, {"rollout_step": step}) for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert checkpointer.save(7, state, {"rollout_step": 7}, force=True)  # The run's last step.
    assert not checkpointer.save(7, state, {}, force=True)  # Already on disk: left alone.
    checkpointer.wait()
    assert checkpointer.all_steps() == [6, 7] and checkpointer.latest_step() == 7
    checkpointer.close()

    reopened = Checkpointer(CheckpointConfig(str(tmp_path), save_every=2))
    assert reopened.latest_step() == 7
    assert reopened.restore(None, abstract)[1] == {"rollout_step": 7}
    with pytest.raises(TypeError):  # Not JSON: refused before anything is written.
        reopened.save(8, state, {"bad": object()})
    reopened.close()


def test_earlier_step_survives_later_save(tmp_path, state, abstract):
    later = _state(abstract, 1)
    with Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer:
        checkpointer.save(1, state, {"rollout_step": 1})
        checkpointer.save(2, later, {"rollout_step": 2})
        checkpointer.wait()
        _assert_same(checkpointer.restore(1, abstract)[0], state)
        _assert_same(checkpointer.restore(2, abstract)[0], later)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # No temporary folders left.


def test_missing_checkpoint(tmp_path, abstract):
    with Checkpointer(CheckpointConfig(str(tmp_path / "run"), save_every=1)) as checkpointer:
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "run"))):
            checkpointer.restore(None, abstract)
        with pytest.raises(FileNotFoundError, match="step 5"):
            checkpointer.restore(5, abstract)


@ORBAX_ABORT_NOISE
@pytest.mark.parametrize("change, leaf", [
    ({"hidden_size": 32}, r"params/embed/value: saved float32\[64, 16\], expected float32\[64, 32\]"),
    ({"num_layers": 3}, r"params/layers/2/.*not in the checkpoint"),
])
def test_mismatched_model_config(tmp_path, state, mesh, change, leaf):
    other = _abstract(dataclasses.replace(MODEL, **change), mesh)
    with Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer:
        checkpointer.save(3, state, META)
        checkpointer.wait()
        with pytest.raises(ValueError, match="model or optimizer config differs") as error:
            checkpointer.restore(3, other)
    message = str(error.value)
    assert str(tmp_path / "3") in message and "orbax:" in message
    assert re.search(leaf, message.splitlines()[1])  # Parameters are listed first.


@ORBAX_ABORT_NOISE
@pytest.mark.parametrize("damage", ["truncate_state_files", "delete_state"])
def test_damaged_checkpoint(tmp_path, state, abstract, damage):
    with Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer:
        checkpointer.save(1, state, META)
    state_dir = tmp_path / "1" / "state"
    if damage == "delete_state":
        shutil.rmtree(state_dir)
    else:
        for path in state_dir.rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with (Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer,
          pytest.raises(CheckpointDamagedError, match=re.escape(f"checkpoint {tmp_path / '1'} is damaged"))):
        checkpointer.restore(None, abstract)


def test_restore_params_reads_the_latest_params_onto_any_mesh(tmp_path, state, abstract, mesh):
    """A stage's hand-off: the params of the previous run's latest step, whatever its optimizer
    state (here another optimizer's tree, which a full restore would refuse)."""
    later = _state(abstract, 1)
    checkpoints = tmp_path / "stage1" / "checkpoints"
    with Checkpointer(CheckpointConfig(str(checkpoints), save_every=1)) as checkpointer:
        checkpointer.save(1, state, META)
        checkpointer.save(2, dataclasses.replace(later, opt_state={"other": later.step}), META)
    one_device = sharding.make_mesh({}, devices=jax.devices()[:1])
    for directory, target_mesh in ((tmp_path / "stage1", mesh), (checkpoints, one_device)):
        target = abstract_train_state(abstract.params, RL, target_mesh).params
        params, step_dir = restore_params(str(directory), target)
        assert step_dir == checkpoints / "2"
        assert type(params) is type(later.params)
        _assert_same(params, later.params)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
            assert got.sharding == want.sharding


@pytest.mark.parametrize("change, leaf", [
    ({"hidden_size": 32},
     r"params/embed/value: saved float32\[64, 16\], expected float32\[64, 32\]"),
    ({"num_layers": 3}, r"params/layers/2/.*not in the checkpoint"),
    # Fewer layers than saved: a partial restore alone would silently leave layer 1 unread.
    ({"num_layers": 1}, r"params/layers/1/.*saved float32\[.*\], not in the state"),
])
def test_restore_params_of_another_model_names_the_leaves(tmp_path, state, mesh, change, leaf):
    with Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer:
        checkpointer.save(3, state, META)
    other = _abstract(dataclasses.replace(MODEL, **change), mesh).params
    with pytest.raises(ValueError, match="params of another model") as error:
        restore_params(str(tmp_path), other)
    message = str(error.value)
    assert str(tmp_path / "3") in message and "opt_state" not in message
    assert re.search(leaf, message)


def test_restore_params_without_a_checkpoint(tmp_path, abstract):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        restore_params(str(missing), abstract.params)
    assert not missing.exists()  # Nothing is created at a mistyped path.
    checkpoints = tmp_path / "empty" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {re.escape(str(checkpoints))}"):
        restore_params(str(tmp_path / "empty"), abstract.params)


def test_config_is_checked():
    with pytest.raises(ValueError, match="save_every"):
        CheckpointConfig("/tmp/unused", save_every=0)
