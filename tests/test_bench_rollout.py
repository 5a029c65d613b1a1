"""launch/benchmark.py --suite=rollout, as a smoke test: both schedules on a few of the demo's
prompts through 4 slots (8 parked rows: a multiple of the mesh's 8 row shards), against the loopback server adding 50 ms a call (the numbers are
for the README, not asserted)."""
import argparse
import sys

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "launch"))
import bench_rollout  # noqa: E402  pylint: disable=wrong-import-position


def test_the_rollout_suite_runs_both_schedules_side_by_side(world_model_dir, capsys):
    result = bench_rollout.run(argparse.Namespace(
        world_dir=str(world_model_dir), prompts=2, samples=4, slots=4, decode_steps=16,
        delays_ms="50", max_len=512, runs=1, parked_rows=8,
        batch_invariant=False))
    out = capsys.readouterr().out
    assert "+  50 ms a call" in out, out
    assert result["trajectories"] == 8 and result["queries"] > 0
    assert [row["delay_ms"] for row in result["delays"]] == [50]
    for row in result["delays"]:
        assert row["same_tokens"], row  # the schedules give the same trajectories
        assert row["max_logprob_difference"] < 1e-5, row
        for name in ("barrier", "continuous"):
            assert row[name]["seconds"] > 0 and 0 < row[name]["slot_utilisation"] <= 1
            assert row[name]["decode_calls"] >= 1 and row[name]["extend_calls"] >= 1
        assert row["speedup"] == row["barrier"]["seconds"] / row["continuous"]["seconds"]
