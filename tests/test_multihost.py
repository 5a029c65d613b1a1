"""A two-process run (2 CPU processes x 2 devices, jax.distributed over gloo) against the
same run in one process with 4 devices: the same rollouts, rewards, losses and weights,
whether every process searches or process 0 searches and broadcasts the passages. The
every-process run uses the continuous rollout schedule (8 rows a step through 4 slots, which
process 0's view of the returned searches schedules on both) against the one-process run's
barrier rounds, so its rollouts equal the barrier's over two processes too. The
process-0 run is also preempted: a SIGTERM to one process stops both on the same step, and
the rerun that resumes it ends where the uninterrupted runs end."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from searcher_jax.model import hf_io
from tests.conftest import REPO_ROOT

# Not results: wall times, and the slot utilisation of the schedule that produced the rollout.
TIMING = ("rollout_s", "train_s", "slot_utilisation")
STEPS = 3


def _args(world_dir, workdir, steps=STEPS):
    return [str(REPO_ROOT / "launch" / "tpu_pod.py"), f"--config.world.dir={world_dir}",
            f"--config.train.workdir={workdir}", f"--config.train.steps={steps}",
            "--config.train.prompts_per_step=2", "--config.rl.samples_per_prompt=4",
            "--config.rl.mini_batch_size=8", "--config.rl.micro_batch_size=8",
            "--config.train.eval_questions=4", "--config.train.eval_batch_size=4",
            # A short buffer: fewer programs to compile; rows still search (0.75 to 0.875
            # queries a row), and some are truncated, on both schedules alike.
            "--config.sampler.max_len=256", "--config.sampler.segment_len=64",
            "--config.rollout.max_retrievals=1", "--config.eval_rollout.max_retrievals=1",
            "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.stages.enabled=false",   # one run, not the demo's two stages
            "--verbosity=0"]   # the INFO lines the tests read (warnings only by default)


def _env(devices: int):
    # The collective timeouts of conftest.py too: XLA's default 40 s can end a slow step on
    # 2 busy cores.
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                         "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120"}


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _start_two_processes(args) -> list[subprocess.Popen]:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    return [subprocess.Popen(
        [sys.executable, *args, "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)]


def _logs_of_clean_exits(processes) -> list[str]:
    logs = []
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        logs.append(stderr)
    return logs


def _two_processes(args):
    return _logs_of_clean_exits(_start_two_processes(args))


# Every process searching the same queries, and process 0 searching then broadcasting.
SEARCH_ON = ("every_process", "process_0")


def _preempted_then_resumed(args) -> tuple[int, list[str]]:
    """Runs two processes, sends SIGTERM to process 1 once step 1 is logged, checks that both
    stopped after the same step and saved it, then reruns to the end. Returns the step they
    stopped after and the rerun's logs."""
    workdir = pathlib.Path(next(a for a in args if a.startswith("--config.train.workdir="))
                           .split("=", 1)[1])
    processes = _start_two_processes(args)
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert all(p.poll() is None for p in processes), processes[0].stderr.read()[-3000:]
        assert time.time() < deadline, "no train step logged in 300 s"
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    logs = _logs_of_clean_exits(processes)
    stops = [re.findall(r"stopped by signal (.+) after step (\d+);", log) for log in logs]
    assert [len(found) for found in stops] == [1, 1], logs[0][-3000:]
    (process_0, step_0), (process_1, step_1) = stops[0][0], stops[1][0]
    # A notice that reached one host only: both agree at the top of the next step, save that
    # step and exit 0 (no host left waiting in a collective).
    assert (process_0, process_1) == ("on another process", "SIGTERM")
    stopped = int(step_0)
    assert step_0 == step_1 and 1 <= stopped < STEPS
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [stopped]
    assert not (workdir / "hf").exists()
    return stopped, _two_processes(args)


@pytest.fixture(scope="module")
def runs(world_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    single = subprocess.run([sys.executable, *_args(world_model_dir, root / "single"),
                             "--config.rollout.schedule=barrier"],
                            env=_env(4), capture_output=True, text=True, timeout=600, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    logs = {"every_process": _two_processes(
        [*_args(world_model_dir, root / "every_process"),
         "--config.retriever.search_on=every_process", "--config.rollout.schedule=continuous",
         "--config.rollout.sampler_rows=4", "--config.rollout.decode_steps=16"])}
    stopped, logs["process_0"] = _preempted_then_resumed(
        [*_args(world_model_dir, root / "process_0"), "--config.retriever.search_on=process_0"])
    for log in logs["process_0"]:
        assert f"at step {stopped} (data position" in log, log[-3000:]
    for search_on in SEARCH_ON:
        broadcasting = ["process 0 of 2 searches and broadcasts" in log
                        for log in logs[search_on]]
        assert broadcasting == [search_on == "process_0"] * 2, search_on
    return root, stopped


@pytest.mark.parametrize("search_on", SEARCH_ON)
def test_two_processes_log_what_one_process_logs(runs, search_on):
    """Every step logged once, the preempted run's included (none lost, none repeated), with
    the one-process run's values."""
    root, _ = runs
    one, two = _metrics(root / "single"), _metrics(root / search_on)
    expected = [("eval", 0), *[("train", step) for step in range(1, STEPS + 1)], ("eval", STEPS)]
    assert [(r["kind"], r["step"]) for r in one] == expected
    assert [(r["kind"], r["step"]) for r in two] == expected
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a.keys() - set(TIMING):
            if isinstance(a[key], str):
                assert b[key] == a[key], (a["step"], key)
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.mark.parametrize("search_on", SEARCH_ON)
def test_two_processes_train_the_same_weights(runs, search_on):
    root, stopped = runs
    single, multi = root / "single", root / search_on
    one, two = hf_io.load_pretrained(single / "hf"), hf_io.load_pretrained(multi / "hf")
    for name in ("embed", "final_norm"):
        np.testing.assert_allclose(np.asarray(getattr(two, name)[...]),
                                   np.asarray(getattr(one, name)[...]), atol=1e-6)
    saved = {STEPS, stopped} if search_on == "process_0" else {STEPS}
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir()) == sorted(saved)
    assert (multi / "hf" / "model.safetensors").is_file()
