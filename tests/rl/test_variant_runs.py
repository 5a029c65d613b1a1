"""Two-step runs of the demo config (the trainer, the world's tiny model) with each new choice:
every metric finite, the dynamic-sampling counts in the step's metrics, the data position
advanced by every prompt drawn."""
import json

import numpy as np
import pytest

from searcher_jax import trainer
from tests.test_trainer import read_metrics, tiny_run

RUNS = {
    # DAPO whole: clip-higher and token mean, refilled batches, the overlong ramp over the last
    # 128 tokens of a 256-token buffer; and truncated importance sampling.
    "dapo_refill_overlong_tis": dict(estimator="grpo", policy_loss="dapo",
                                     dynamic_sampling="refill", dynamic_sampling_draws=2,
                                     overlong_buffer=128, tis_cap=2.0),
    "dr_grpo_gspo_drop": dict(estimator="dr_grpo", policy_loss="gspo", dynamic_sampling="drop"),
    "cispo": dict(estimator="grpo", policy_loss="cispo"),
    "gspo_token": dict(estimator="grpo", policy_loss="gspo_token"),
}


@pytest.mark.parametrize("name", RUNS)
def test_two_steps_of_the_demo_config_finish_with_finite_metrics(world_model_dir, tmp_path, name):
    config = tiny_run(world_model_dir, tmp_path, steps=2)
    config.rl.update(**RUNS[name])
    config.train.update(export_hf=False, eval_questions=0, save_every=2)
    result = trainer.train(config)
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2)]
    for record in records:
        assert all(np.isfinite(v) for v in record.values() if isinstance(v, float)), record
        assert record["skipped_steps"] == 0 and record["grad_norm"] >= 0
        assert 0 <= record["tied_prompts"] <= 2 * record["sampling_draws"]
        assert record["unfilled_prompts"] <= min(record["dropped_prompts"], 2)
        for metric in ("sampler_logp_abs_diff_mean", "sampler_logp_abs_diff_max"):
            assert 0 <= record[metric] < 0.05  # the fp32 sampler against the fp32 trainer
    rl = RUNS[name]
    if rl.get("dynamic_sampling") == "drop":
        assert all(r["dropped_prompts"] == r["tied_prompts"] == r["unfilled_prompts"]
                   for r in records)
    if rl.get("dynamic_sampling") == "refill":
        # A tie in the first draw draws again (at most twice); no tie, no second draw.
        assert all(r["sampling_draws"] == (1 if r["tied_prompts"] == 0 else 2) for r in records)
        # Every draw is 2 prompts of the data order; the checkpoint's position counts them all.
        drawn = 2 * sum(r["sampling_draws"] for r in records)
        meta = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
        assert meta["data_position"] == drawn
        assert all(r["overlong_penalty"] <= 0 for r in records)
        assert all(0 < r["tis_weight_mean"] <= 2 for r in records)
    assert result["stopped"] is False
