"""Checkpoints of the RL run: the TrainState and a small JSON dict, one folder per rollout step.

    <directory>/<step>/state/  params, Adam moments, step, skipped (OCDBT/zarr, one file set
                               for all leaves, each array written shard by shard)
    <directory>/<step>/meta/   e.g. {"rollout_step": 12, "data_position": 384, "rng_seed": 0,
                               "config": {...}}

Orbax writes a step into a temporary folder (`<step>.orbax-checkpoint-tmp`) and renames it
(or, on GCS, writes a commit marker) only when complete, so a crash mid-save never damages an
earlier step. Saves are asynchronous: `save` returns once the arrays are copied to host memory
(so the train step may donate them), the files are written in the background; `wait()` blocks
until done. Paths go through etils.epath, so `directory` may be local or gs://.

What can go wrong on the way, and what the user gets:
- killed mid-save: the temporary folder stays behind, never listed as a step; `restore_latest`
  resumes from the last complete step and warns that the unfinished save is there.
- a complete step damaged later (array files truncated or deleted, its meta gone):
  `restore_latest` falls back to the newest step that reads back whole, renames the damaged
  ones aside to `<step>.damaged` (never deleted) and warns with the step and the fault.
- the disk or quota fills while writing: `CheckpointDiskFullError` names the directory and
  the step; the earlier steps are untouched.

A stage hands its final policy to the next one through this directory (DESIGN.md point 8):
`restore_params` reads only the params of a run's latest step, the next run's initial policy
and reference (SPEC section 4).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
from typing import Any, Self

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from searcher_jax.rl.config import RLConfig
from searcher_jax.rl.train_step import (
    TrainState,
    init_train_state,
    train_state_shardings,
    with_shardings,
)

_MAX_LISTED = 5  # Differing leaves named in a mismatch error.
_MAX_MESSAGE = 1500  # Characters of orbax's own message kept (tensorstore specs run to pages).
_UNFINISHED = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step folder still being written.
_DAMAGED = ".damaged"  # Suffix of a damaged step renamed aside (orbax lists only integer names).
# Writes that fail for want of room: no space, over quota, or over the process's file-size limit.
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "a file exceeds the size limit"}
# Tensorstore's errors are ValueErrors that carry the OS error number in their text only.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str  # Local path or gs:// URL; one run per directory.
    save_every: int  # Rollout steps between checkpoints (step % save_every == 0 is saved).
    max_to_keep: int = 3  # Newest steps kept; older ones are deleted after each save.

    def __post_init__(self):
        if self.save_every < 1 or self.max_to_keep < 1:
            raise ValueError(f"CheckpointConfig needs save_every >= 1 and max_to_keep >= 1, got "
                             f"save_every={self.save_every}, max_to_keep={self.max_to_keep}")


class CheckpointDamagedError(RuntimeError):
    """A step folder exists but cannot be read back (files missing or truncated)."""


class CheckpointDiskFullError(OSError):
    """A save failed for want of room (errno ENOSPC, EDQUOT or EFBIG); the earlier steps are
    untouched. `errno` is the OS error number."""


def abstract_train_state(params, config: RLConfig, mesh: Mesh) -> TrainState:
    """The TrainState for `params` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs placed on
    `mesh` by train_state_shardings: the target `Checkpointer.restore` fills in."""
    abstract = jax.eval_shape(lambda p: init_train_state(p, config), params)
    return with_shardings(abstract, train_state_shardings(abstract, mesh))


class Checkpointer:
    """Saves and restores (TrainState, meta dict) pairs under `config.directory`."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        # Orbax's tensorstore layer wants absolute paths; a relative local one (runs/demo)
        # is taken from the working directory.
        self.directory = epath.Path(config.directory if "://" in config.directory
                                    else os.path.abspath(config.directory))
        options = ocp.CheckpointManagerOptions(
            create=True,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=config.max_to_keep))
        # Handlers named up front: a fresh manager can then read an existing step's metadata
        # (to explain a failed restore) before anything has been saved or restored through it.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self._writing: int | None = None  # The step of the save in flight, named by its errors.

    def save(self, step: int, train_state: TrainState, meta: dict, force: bool = False) -> bool:
        """Starts saving `step` when it is a multiple of save_every (or `force`); True if started.

        A step already on disk is left alone (False): e.g. a final forced save right after the
        periodic one. `meta` must be JSON-serialisable; it is copied now, so the caller may
        change it while the files are written.
        """
        if not force and step % self.config.save_every:
            return False
        if step in self._manager.all_steps():  # Lists a step as soon as its save starts.
            return False
        meta = json.loads(json.dumps(meta))  # Fails here, with the offending value, if not JSON.
        # Orbax first waits for the previous save (raising its error, if it failed), then
        # copies the arrays to host and returns.
        with self._naming_full_disk():
            started = self._manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_state), meta=ocp.args.JsonSave(meta)))
        self._writing = step
        return started

    def wait(self) -> None:
        """Blocks until the last save is fully written (and old steps are pruned).

        Raises:
          CheckpointDiskFullError: that save ran out of room (also raised by the next `save`
            or `close`, whichever comes first).
        """
        with self._naming_full_disk():
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _naming_full_disk(self):
        """Re-raises a write that failed for want of room as CheckpointDiskFullError, naming
        the directory and the step; other errors pass unchanged."""
        try:
            yield
        except Exception as error:
            code = _os_error_code(error)
            if code not in _FULL:
                raise
            step, self._writing = self._writing, None
            kept = [s for s in self.all_steps() if s != step]
            raise CheckpointDiskFullError(
                code, f"saving checkpoint step {step} to {self.directory} failed: {_FULL[code]} "
                f"({os.strerror(code)}). The earlier steps are intact (latest complete: "
                f"{kept[-1] if kept else 'none'}); the partial {step}{_UNFINISHED} folder may be "
                f"deleted. Free space (or raise the quota) and rerun to resume.") from error

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int | None, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """(TrainState, meta) of `step` (None: the latest), each array on the sharding of its
        ShapeDtypeStruct in `abstract_state` (any mesh: the saved layout does not matter).

        Raises:
          FileNotFoundError: no such step (or no checkpoint at all) in the directory.
          ValueError: the saved tree or shapes differ from `abstract_state`'s (another model
            or optimizer config).
          CheckpointDamagedError: the step folder exists but cannot be read.
        """
        step = self._existing_step(step)
        path = self.directory / str(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as error:
            orbax_message = f"{type(error).__name__}: {str(error)[:_MAX_MESSAGE]}"
            differences = self._differences(step, abstract_state)
            if differences:
                listed = "".join(f"\n  {line}" for line in differences)
                raise ValueError(
                    f"checkpoint {path} does not match the state to restore into: the model or "
                    f"optimizer config differs from the one it was saved with:{listed}\n"
                    f"orbax: {orbax_message}") from error
            raise CheckpointDamagedError(f"checkpoint {path} is damaged or incomplete "
                                         f"(restore another step, or delete it): {orbax_message}"
                                         ) from error
        return restored.state, dict(restored.meta)

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int]:
        """(TrainState, meta, step) of the newest step that reads back whole: how a run resumes.

        Each step is tried newest first. When a newer one is damaged (CheckpointDamagedError:
        array files truncated or deleted, its meta gone), the run falls back to an older one,
        and each damaged step is renamed aside to `<step>.damaged` in the same directory,
        never deleted, with a warning that names the step, the fault and the new name: left
        in place, it would stay the "latest" step, and the rerun's save of that step number
        would be skipped as already on disk. Leftover `<step>.orbax-checkpoint-tmp` folders
        (a save killed midway) are never steps; a warning names them, they stay in place.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          ValueError: the newest step holds another model's or optimizer's state (a config
            error, not damage: no fallback, nothing renamed).
          CheckpointDamagedError: no step reads back; names the directory and each step's
            fault, and nothing is renamed.
        """
        steps = self._existing_steps()
        for unfinished in sorted(self.directory.glob(f"*{_UNFINISHED}*")):
            logging.warning("checkpoint: %s is an unfinished save (the process stopped while "
                            "writing it); it is not a step and is left in place (delete it to "
                            "free its space)", unfinished)
        faults = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointDamagedError as error:
                faults.append((step, str(error)))
                continue
            for damaged, fault in faults:
                aside = self._rename_aside(damaged)
                logging.warning("checkpoint step %d in %s is damaged and was renamed aside to "
                                "%s (kept, not deleted); resuming from step %d instead. The "
                                "fault: %s", damaged, self.directory, aside, step, fault)
            return state, meta, step
        listed = "".join(f"\n  step {step}: {fault}" for step, fault in faults)
        raise CheckpointDamagedError(f"no checkpoint in {self.directory} reads back whole "
                                     f"(nothing was moved or deleted):{listed}")

    def _rename_aside(self, step: int) -> epath.Path:
        """Renames step folder `step` to `<step>.damaged` (`.damaged-2`, ... if taken) on
        process 0 (the folder is shared; the others wait for it); returns the new path."""
        aside = self.directory / f"{step}{_DAMAGED}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.directory / f"{step}{_DAMAGED}-{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            # Every process must stop listing the step before any saves again: a process that
            # still saw it would skip the save of that step the others make together.
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            multihost_utils.sync_global_devices(f"checkpoint step {step} renamed aside")
        self._manager.reload()  # Forget the renamed step.
        return aside

    def restore_params(self, step: int | None, abstract_params) -> Any:
        """Only the params of `step` (None: the latest), each on the sharding of its
        ShapeDtypeStruct in `abstract_params` (an nnx.State like TrainState.params); the Adam
        moments, step counts and meta stay on disk, unread.

        Raises:
          FileNotFoundError: no such step (or no checkpoint at all) in the directory.
          ValueError: the saved params differ from `abstract_params` in a leaf, a shape or a
            dtype (another model size or architecture, or stacked versus per-layer weights:
            model.scan_layers); checked on the saved metadata before any array is read, since
            a partial restore would skip saved leaves it is not asked for.
          CheckpointDamagedError: the step folder exists but cannot be read.
        """
        step = self._existing_step(step)
        path = self.directory / str(step)
        differences = self._differences(step, {"params": abstract_params})
        if differences:
            listed = "".join(f"\n  {line}" for line in differences)
            raise ValueError(f"checkpoint {path} holds the params of another model (size, "
                             f"architecture or model.scan_layers) than the one to restore "
                             f"into:{listed}")
        target = {"params": abstract_params}
        try:
            # The state item on its own, through PyTreeCheckpointHandler (the format
            # StandardCheckpointHandler wrote): it can leave the optimizer leaves unread.
            with ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(path / "state", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))
        except Exception as error:
            raise CheckpointDamagedError(
                f"checkpoint {path} is damaged or incomplete (restore another step, or delete "
                f"it): {type(error).__name__}: {str(error)[:_MAX_MESSAGE]}") from error
        return restored["params"]

    def _existing_step(self, step: int | None) -> int:
        """`step` (None: the latest) once saves in flight are written; FileNotFoundError if it
        is not in the directory."""
        steps = self._existing_steps() if step is None else self._steps_written()
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(steps there: {steps})")
        return step

    def _steps_written(self) -> list[int]:
        self.wait()
        return self.all_steps()

    def _existing_steps(self) -> list[int]:
        """The steps on disk once saves in flight are written; FileNotFoundError if none."""
        steps = self._steps_written()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory} (steps there: [])")
        return steps

    def _differences(self, step: int, abstract_state) -> list[str]:
        """Leaves missing, extra or of another shape/dtype in `step` versus `abstract_state` (a
        TrainState, or a dict of some of its fields: then only those fields are compared);
        empty when they agree or the saved metadata itself cannot be read."""
        try:
            saved = ocp.tree.to_flat_dict(self._manager.item_metadata(step)["state"].tree)
        except Exception:  # noqa: BLE001 - unreadable metadata: the folder is damaged.
            return []
        # Both flatten to string key tuples, e.g. ("opt_state", "1", "mu", "embed", "value").
        wanted = ocp.tree.to_flat_dict(abstract_state)
        fields = {key[0] for key in wanted}
        saved = {key: value for key, value in saved.items() if key[0] in fields}
        found = []  # In the state's leaf order: params first, then the Adam moments mirroring them.
        for key in [*wanted, *(key for key in saved if key not in wanted)]:
            name = "/".join(key)
            if key not in saved:
                found.append(f"{name}: expected {_describe(wanted[key])}, not in the checkpoint")
            elif key not in wanted:
                found.append(f"{name}: saved {_describe(saved[key])}, not in the state")
            elif _describe(saved[key]) != _describe(wanted[key]):
                found.append(f"{name}: saved {_describe(saved[key])}, expected "
                             f"{_describe(wanted[key])}")
        if len(found) > _MAX_LISTED:
            found = found[:_MAX_LISTED] + [f"... and {len(found) - _MAX_LISTED} more"]
        return found

    def close(self) -> None:
        """Waits for the last save, then releases orbax's threads (also when that save failed:
        its error is raised after)."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def latest_checkpoint(directory: str) -> epath.Path:
    """The latest step folder of a run: `directory` is its workdir (its `checkpoints/` is read)
    or that checkpoints directory itself.

    Raises:
      FileNotFoundError: `directory` does not exist, or holds no checkpoint (names the path).
        Nothing is created there (a Checkpointer creates a missing directory).
    """
    path = epath.Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (give a run's workdir or its "
                                f"checkpoints directory)")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    with Checkpointer(CheckpointConfig(str(path), save_every=1)) as checkpointer:
        step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {path} (a run's checkpoints directory holds "
                                f"one folder per saved step)")
    return checkpointer.directory / str(step)


def restore_params(directory: str, abstract_params) -> tuple[Any, epath.Path]:
    """(params, the step folder read) of a run's latest checkpoint: how a stage starts from the
    one before it (SPEC section 4: stage 2 starts from the stage-1 checkpoint; DESIGN.md point 8:
    the hand-off is the Orbax checkpoint directory, the HF export is for serving).

    `directory`: as for `latest_checkpoint`. Only the params are read (the optimizer state,
    step and data position belong to the finished run); `abstract_params` (an nnx.State of
    ShapeDtypeStructs, like TrainState.params) gives their tree, shapes, dtypes and the
    shardings to place them on (any mesh).

    Raises:
      FileNotFoundError: `directory` does not exist, or holds no checkpoint (names the path).
      ValueError: the saved params are another model's (names the differing leaves and shapes).
      CheckpointDamagedError: the latest step cannot be read.
    """
    step_dir = latest_checkpoint(directory)
    with Checkpointer(CheckpointConfig(str(step_dir.parent), save_every=1)) as checkpointer:
        return checkpointer.restore_params(int(step_dir.name), abstract_params), step_dir


def _os_error_code(error: BaseException) -> int | None:
    """The OS error number of `error` or of an error it was raised from: an OSError's errno,
    or the os_error_code tensorstore writes into its messages."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        found = _OS_ERROR_CODE.search(str(error))
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def _describe(leaf) -> str:
    """'float32[64, 16]' for an array, ShapeDtypeStruct or orbax ArrayMetadata."""
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    return f"{jax.numpy.dtype(dtype).name}{list(shape)}" if shape is not None else type(leaf).__name__
