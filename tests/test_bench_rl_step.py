"""launch/benchmark.py --suite=rl_step, as a smoke test: one small RL step of the demo's
world, split into its parts (the numbers are for the README, not asserted)."""
import argparse
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "launch"))
import bench_rl_step  # noqa: E402  pylint: disable=wrong-import-position


def test_the_rl_step_suite_times_every_part(world_model_dir, capsys):
    # A 256-token buffer, not the README's 512: the test's time is mostly compiles, and a
    # shorter buffer has fewer attend buckets to compile (29 s -> 19 s here); rows still search.
    result = bench_rl_step.run(argparse.Namespace(world_dir=str(world_model_dir), prompts=2,
                                                  samples=4, max_len=256))
    out = capsys.readouterr().out
    for part in ("decode", "retrieval", "extend", "host", "log-probs", "update", "padding"):
        assert f"  {part}" in out, out
    parts = result["parts_s"]
    assert set(parts) == {"decode", "retrieval", "extend", "host", "log-probs", "update"}
    assert all(seconds > 0 for name, seconds in parts.items() if name != "host"), parts
    assert sum(parts.values()) == pytest.approx(result["total_s"])
    assert result["rows"] == 8 and result["batch_shape"][0] == 8
    assert result["queries"] > 0 and result["sampled_tokens"] > 0
    # Prompts and documents are inserted; every row's prompt at least.
    assert result["inserted_tokens"] >= 8
    assert 0.0 <= result["padding_share"] < 1.0
