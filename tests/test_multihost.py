"""A two-process run (2 CPU processes x 2 devices, jax.distributed over gloo) against the
same run in one process with 4 devices: the same rollouts, rewards, losses and weights,
whether every process searches or process 0 searches and broadcasts the passages."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from searcher_jax.model import hf_io
from tests.conftest import REPO_ROOT

TIMING = ("rollout_s", "train_s")


def _args(world_dir, workdir):
    return [str(REPO_ROOT / "launch" / "tpu_pod.py"), f"--config.world.dir={world_dir}",
            f"--config.train.workdir={workdir}", "--config.train.steps=2",
            "--config.train.prompts_per_step=2", "--config.rl.samples_per_prompt=4",
            "--config.rl.mini_batch_size=8", "--config.rl.micro_batch_size=8",
            "--config.train.eval_questions=4", "--config.train.eval_batch_size=4",
            "--config.sampler.max_len=512", "--config.sampler.segment_len=64",
            "--config.rollout.max_retrievals=1", "--config.eval_rollout.max_retrievals=1",
            "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _env(devices: int):
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _two_processes(args):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, *args, "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)]
    logs = []
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        logs.append(stderr)
    return logs


# Every process searching the same queries, and process 0 searching then broadcasting.
SEARCH_ON = ("every_process", "process_0")


@pytest.fixture(scope="module")
def runs(world_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    single = subprocess.run([sys.executable, *_args(world_model_dir, root / "single")],
                            env=_env(4), capture_output=True, text=True, timeout=600, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    for search_on in SEARCH_ON:
        logs = _two_processes([*_args(world_model_dir, root / search_on),
                               f"--config.retriever.search_on={search_on}"])
        broadcasting = ["process 0 of 2 searches and broadcasts" in log for log in logs]
        assert broadcasting == [search_on == "process_0"] * 2, search_on
    return root


@pytest.mark.parametrize("search_on", SEARCH_ON)
def test_two_processes_log_what_one_process_logs(runs, search_on):
    single, multi = runs / "single", runs / search_on
    one, two = _metrics(single), _metrics(multi)
    assert [(r["kind"], r["step"]) for r in two] == [("eval", 0), ("train", 1), ("train", 2),
                                                      ("eval", 2)]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if key not in TIMING:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.mark.parametrize("search_on", SEARCH_ON)
def test_two_processes_train_the_same_weights(runs, search_on):
    single, multi = runs / "single", runs / search_on
    one, two = hf_io.load_pretrained(single / "hf"), hf_io.load_pretrained(multi / "hf")
    for name in ("embed", "final_norm"):
        np.testing.assert_allclose(np.asarray(getattr(two, name)[...]),
                                   np.asarray(getattr(one, name)[...]), atol=1e-6)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2"]
