"""The demo's whole run, reduced: both stages through Orbax, the four-policy comparison and
every file a user is promised, from the README's own command (launch/tpu_pod.py with
configs/demo.py, the default)."""
import json
import os
import subprocess
import sys

from searcher_jax import run_report
from tests.conftest import REPO_ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_reduced_demo_runs_both_stages_and_writes_every_file(world_model_dir, tmp_path):
    workdir = tmp_path / "demo"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "tpu_pod.py"),
         # The workdir relative to the working directory, as a user gives it.
         f"--config.world.dir={world_model_dir}", "--config.train.workdir=demo",
         # Sized to learn something in about a minute and a half on 2 cores: stage 1's
         # cover-EM reward takes this base model from about one search to two on bridge
         # questions within three steps (greedy F1 0.31 -> 0.50 on these 16 questions here).
         # One mini-batch per step, so the hand-off metrics below are the first mini-batch's.
         "--config.stages.stage1_steps=3", "--config.train.steps=1",
         "--config.train.prompts_per_step=8", "--config.rl.samples_per_prompt=8",
         "--config.rl.mini_batch_size=64", "--config.rl.micro_batch_size=16",
         # KL on, so stage 2 loads stage 1's final policy as its reference and measures it.
         "--config.rl.kl_coef=0.001",
         "--config.train.eval_questions=16", "--config.train.eval_batch_size=16",
         "--config.train.eval_every=0",
         "--config.sampler.max_len=640", "--config.sampler.segment_len=96",
         "--config.rollout.max_retrievals=2", "--config.eval_rollout.max_retrievals=2"],
        capture_output=True, text=True, env=env, timeout=900, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "done:" in result.stdout and "trained (RL)" in result.stdout
    assert "Traceback" not in result.stderr

    for stage, steps in (("stage1", 3), ("stage2", 1)):
        assert (workdir / stage / "checkpoints" / str(steps) / "state").is_dir()
        assert (workdir / stage / "hf" / "model.safetensors").is_file()   # each stage exported
        assert list((workdir / stage / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("training.png", "policies.png"):
        data = (workdir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    results = json.loads((workdir / "results.json").read_text())
    policies = list(results["table"])
    assert policies == ["naive (no search)", "standard RAG", "base, searching", "trained (RL)"]
    markdown = (workdir / "results.md").read_text()
    assert all(name in markdown for name in policies)
    assert "trained: stage2/checkpoints/1\n" in markdown   # from the workdir: still true if moved
    for name in policies:
        assert len(results["predictions"][name]) == 16
        assert set(results["table"][name]) >= {"all"}
        assert 0.0 <= results["table"][name]["all"]["gold_retrieved"] <= 1.0
    assert results["table"]["naive (no search)"]["all"]["queries_per_question"] == 0.0
    assert results["table"]["standard RAG"]["all"]["queries_per_question"] == 1.0

    # The greedy held-out F1 rose from the first evaluation (the base model, before stage 1)
    # to the last (after stage 2): RL taught something, not only the format.
    evals = [r for stage in ("stage1", "stage2")
             for r in run_report.read_metrics(workdir / stage / "metrics.jsonl")
             if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 1
    assert evals[-1]["f1"] > evals[0]["f1"], [e["f1"] for e in evals]
    table = results["table"]
    assert (table["trained (RL)"]["bridge"]["queries_per_question"]
            > table["base, searching"]["bridge"]["queries_per_question"])

    # Stage 1 used its own reward; stage 2 started from its final policy,
    # which is also stage 2's reference: the first step has KL 0 and nothing clipped.
    stage1 = json.loads((workdir / "stage1" / "config.json").read_text())
    assert stage1["reward"]["recipe"] == "cem_retrieval_format"
    stage2 = json.loads((workdir / "stage2" / "config.json").read_text())
    assert stage2["model"]["init_from"] == "demo/stage1"
    first = [r for r in run_report.read_metrics(workdir / "stage2" / "metrics.jsonl")
             if r["kind"] == "train"][0]
    assert first["step"] == 1
    assert first["ref_kl_mean"] == 0.0
    assert first["clip_frac"] == 0.0
