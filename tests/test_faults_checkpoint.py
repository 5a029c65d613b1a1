"""Checkpoint faults (issue 20, item 2): a damaged or partial latest step, a save killed midway,
a disk that fills while saving. What the user gets: the run resumes from the newest step that
reads back whole, with a warning naming what was wrong, and nothing saved is lost or deleted.
(A SIGKILL during a real run's save: tests/test_trainer.py.)"""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest

from searcher_jax.checkpoint import CheckpointConfig, CheckpointDamagedError, Checkpointer
from searcher_jax.model import sharding
from tests.conftest import REPO_ROOT
from tests.test_checkpoint import ORBAX_ABORT_NOISE, _abstract, _assert_same, _state, MODEL

UNFINISHED = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def abstract():
    return _abstract(MODEL, sharding.make_mesh({}, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def states(abstract):
    """Three different TrainStates: those of steps 1, 2, 3."""
    return {step: _state(abstract, step) for step in (1, 2, 3)}


def _save(directory, states, steps=(1, 2, 3)):
    with Checkpointer(CheckpointConfig(str(directory), save_every=1)) as checkpointer:
        for step in steps:
            assert checkpointer.save(step, states[step], {"step": step})


def _files(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _damage(step_dir, how: str):
    arrays = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert arrays, "the state's array files moved: update the test"
    if how == "truncate_arrays":
        for path in arrays:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete_arrays":
        for path in arrays:
            path.unlink()
    else:  # delete_meta: the JSON with the step and data position
        (step_dir / "meta" / "metadata").unlink()


@ORBAX_ABORT_NOISE
@pytest.mark.parametrize("how", ["truncate_arrays", "delete_arrays", "delete_meta"])
def test_a_damaged_latest_step_falls_back_with_a_warning_and_is_kept_aside(
        tmp_path, abstract, states, how, caplog):
    _save(tmp_path, states)
    _damage(tmp_path / "3", how)
    damaged = _files(tmp_path / "3")
    with (Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer,
          caplog.at_level(logging.WARNING)):
        state, meta, step = checkpointer.restore_latest(abstract)
        assert (step, meta) == (2, {"step": 2})
        _assert_same(state, states[2])
        warning = " ".join(r.getMessage() for r in caplog.records
                           if r.levelno == logging.WARNING and "damaged" in r.getMessage())
        assert re.search(rf"checkpoint step 3 in {re.escape(str(tmp_path))} is damaged", warning)
        assert f"renamed aside to {tmp_path / '3.damaged'}" in warning
        assert "resuming from step 2" in warning
        fault = "metadata not found" if how == "delete_meta" else "Error"
        assert fault in warning
        # Nothing deleted: the damaged step is byte for byte where the warning says.
        assert _files(tmp_path / "3.damaged") == damaged
        assert checkpointer.all_steps() == [1, 2]
        # The resumed run saves step 3 again (not skipped as "already on disk").
        assert checkpointer.save(3, states[3], {"step": 3})
        state, meta, step = checkpointer.restore_latest(abstract)
        assert step == 3
        _assert_same(state, states[3])


@ORBAX_ABORT_NOISE
def test_no_step_reads_back_names_the_directory_and_moves_nothing(tmp_path, abstract, states):
    _save(tmp_path, states, steps=(1, 2))
    _damage(tmp_path / "1", "delete_arrays")
    _damage(tmp_path / "2", "truncate_arrays")
    with (Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer,
          pytest.raises(CheckpointDamagedError) as error):
        checkpointer.restore_latest(abstract)
    message = str(error.value)
    assert f"no checkpoint in {tmp_path} reads back whole" in message
    assert "nothing was moved or deleted" in message
    assert re.search(r"step 2: checkpoint .*/2 is damaged", message)
    assert re.search(r"step 1: checkpoint .*/1 is damaged", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@ORBAX_ABORT_NOISE
def test_an_unfinished_save_is_not_a_step_and_is_left_in_place(tmp_path, abstract, states,
                                                                caplog):
    """What a save killed midway leaves: step 3's folder under orbax's temporary name."""
    _save(tmp_path, states)
    (tmp_path / "3").rename(tmp_path / f"3{UNFINISHED}")
    with (Checkpointer(CheckpointConfig(str(tmp_path), save_every=1)) as checkpointer,
          caplog.at_level(logging.WARNING)):
        state, meta, step = checkpointer.restore_latest(abstract)
        assert (step, meta) == (2, {"step": 2})
        _assert_same(state, states[2])
        assert f"{tmp_path / ('3' + UNFINISHED)} is an unfinished save" in caplog.text
        assert (tmp_path / f"3{UNFINISHED}").is_dir()
        # The rerun's save of step 3 completes over the leftover.
        assert checkpointer.save(3, states[3], {"step": 3})
        checkpointer.wait()
        assert checkpointer.all_steps() == [1, 2, 3]
        _assert_same(checkpointer.restore_latest(abstract)[0], states[3])


# Saves step 1, then step 2 into a directory with room for one step only; prints JSON.
_DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys
    import jax, jax.numpy as jnp, numpy as np
    from searcher_jax.checkpoint import CheckpointConfig, CheckpointDiskFullError, Checkpointer
    directory, how = sys.argv[1], sys.argv[2]
    state = {"w": jnp.arange(100_000, dtype=jnp.float32)}  # 400 kB
    out = {"how": how}
    checkpointer = Checkpointer(CheckpointConfig(directory, save_every=1))
    checkpointer.save(1, state, {"step": 1})
    checkpointer.wait()
    if how == "file_size_limit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    try:
        checkpointer.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
        checkpointer.close()
    except CheckpointDiskFullError as error:
        out.update(errno=error.errno, message=str(error))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    with Checkpointer(CheckpointConfig(directory, save_every=1)) as reopened:
        restored, meta, step = reopened.restore_latest(abstract)
    out.update(step=step, meta=meta, intact=bool(np.array_equal(restored["w"], state["w"])))
    print("RESULT " + json.dumps(out))
""")


def _disk_full_command(directory) -> tuple[list[str], str]:
    """A small tmpfs when this user may mount one (a private mount namespace, no root needed
    where unprivileged user namespaces are allowed), else a file-size limit (RLIMIT_FSIZE):
    the same write error path, EFBIG instead of ENOSPC."""
    script = [sys.executable, "-c", _DISK_FULL]
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, check=False) \
        if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        mount = (f"mkdir -p {directory} && mount -t tmpfs -o size=600k tmpfs {directory} && "
                 f"exec \"$@\"")
        return ["unshare", "-r", "-m", "sh", "-c", mount, "sh", *script, str(directory),
                "tmpfs"], "tmpfs"
    return [*script, str(directory), "file_size_limit"], "file_size_limit"


def test_a_full_disk_while_saving_is_a_clear_error_and_the_previous_step_is_intact(tmp_path):
    directory = tmp_path / "checkpoints"
    command, how = _disk_full_command(directory)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                                 "PYTHONPATH": str(REPO_ROOT)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["how"] == how
    assert out["errno"] == (28 if how == "tmpfs" else 27)  # ENOSPC / EFBIG
    message = out["message"]
    assert f"saving checkpoint step 2 to {directory} failed" in message
    assert ("the disk is full" if how == "tmpfs" else "a file exceeds the size limit") in message
    assert "latest complete: 1" in message
    assert (out["step"], out["meta"], out["intact"]) == (1, {"step": 1}, True)

