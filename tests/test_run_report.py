"""What a run leaves and shows: metrics.jsonl read back, TensorBoard events, the progress
lines, the training curves on one axis across stages, the policy comparison and its table."""
import json
import struct

import pytest

from searcher_jax import run_report
from searcher_jax.trainer import MetricsWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stage(steps: int, f1: float) -> list[dict]:
    """Records as a run writes them: an eval at 0, a train record per step, an eval at the end."""
    records = [{"kind": "eval", "step": 0, "f1": f1, "em": 0.0, "cem": 0.1,
                "queries_per_question": 1.0, "answered": 0.5, "format_ok": 0.5, "questions": 4}]
    for step in range(1, steps + 1):
        records.append({"kind": "train", "step": step, "reward": -1 + step / steps,
                        "reward_std": 0.3, "format_ok": step / steps, "f1": f1 + 0.01 * step,
                        "cem": 0.02 * step, "queries_per_row": 1.5, "response_tokens": 90 + step})
    records.append({"kind": "eval", "step": steps, "f1": f1 + 0.1, "queries_per_question": 2.0})
    return records


TABLE = {
    "base": {"all": {"em": 0.1, "cem": 0.15, "f1": 0.2, "queries_per_question": 0.0,
                     "answered": 0.5, "gold_retrieved": 0.0},
             "single": {"f1": 0.25}},
    "stage 2": {"single": {"f1": 0.75, "queries_per_question": 1.25},
                "all": {"em": 0.5, "cem": 0.625, "f1": 0.6874, "queries_per_question": 2.126,
                        "answered": 0.95, "gold_retrieved": 0.8126},
                "bridge": {"f1": 0.5}},
}


def _png(path, min_kb: int = 10) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_kb * 1024
    return data


def test_metrics_writer_records_read_back_and_tensorboard_scalars(tmp_path, capsys):
    writer = MetricsWriter(tmp_path, progress=True)
    writer.start_progress(total=3, initial=1, name="demo")  # resumed after step 1
    writer.write("eval", 1, {"f1": 0.5, "queries_per_question": 2.0})
    writer.step_done({"reward": 0.25, "f1": 0.5, "queries_per_row": 1.5, "loss": 0.1})
    writer.write("train", 2, {"reward": 0.25, "queries_per_row": 1.5})
    writer.close()

    assert run_report.read_metrics(tmp_path) == run_report.read_metrics(
        tmp_path / "metrics.jsonl") == [
        {"kind": "eval", "step": 1, "f1": 0.5, "queries_per_question": 2.0},
        {"kind": "train", "step": 2, "reward": 0.25, "queries_per_row": 1.5}]
    out = capsys.readouterr().out
    assert "eval step 1: f1 0.5, queries_per_question 2" in out  # one line per evaluation
    assert "2/3" in out and "reward=0.250" in out and "queries=1.500" in out  # the bar
    assert "train step 2" not in out  # train records are the bar's, not lines
    scalars = _event_scalars(tmp_path / "tensorboard")
    assert scalars == {("eval/f1", 1): 0.5, ("eval/queries_per_question", 1): 2.0,
                       ("train/reward", 2): 0.25, ("train/queries_per_row", 2): 1.5}


def _event_scalars(logdir) -> dict:
    """{(tag, step): value} of the TensorBoard event files in logdir (TFRecord framing)."""
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    scalars = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = pytest.approx(value.simple_value)
    return scalars


def test_read_metrics_names_the_line_it_cannot_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "reward": 0.5}\n\n{"kind": "tr\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        run_report.read_metrics(path)
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: a record needs 'kind' and 'step'"):
        run_report.read_metrics(path)


def test_stages_follow_each_other_on_one_axis():
    first, second = _stage(4, 0.1), _stage(6, 0.3)
    spans = run_report.on_one_axis([("stage 1", first), ("stage 2", second), ("empty", [])])
    assert [(s.name, s.offset, s.steps) for s in spans] == [
        ("stage 1", 0, 4), ("stage 2", 4, 6), ("empty", 10, 0)]
    assert [r["global_step"] for r in spans[1].records if r["kind"] == "eval"] == [4, 10]
    assert [r["global_step"] for r in spans[1].records if r["kind"] == "train"] == list(
        range(5, 11))
    assert [r["step"] for r in spans[1].records] == [0, 1, 2, 3, 4, 5, 6, 6]  # own steps kept
    assert "global_step" not in second[0]  # the inputs are left as they were


def test_a_resumed_runs_repeated_steps_count_once_the_last_written():
    """A run preempted after its checkpoint at 1 redid step 2 and appended it again."""
    records = [{"kind": "eval", "step": 0, "f1": 0.1}, {"kind": "train", "step": 1, "reward": 0},
               {"kind": "train", "step": 2, "reward": -1}, {"kind": "train", "step": 2,
                                                            "reward": 1},
               {"kind": "train", "step": 3, "reward": 2}, {"kind": "eval", "step": 3, "f1": 0.2}]
    (span,) = run_report.on_one_axis([("run", records)])
    assert [(r["kind"], r["step"]) for r in span.records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert span.records[2]["reward"] == 1 and span.steps == 3


def test_plot_training_writes_a_png_of_the_stages(tmp_path):
    path = tmp_path / "plots" / "training.png"
    run_report.plot_training([("stage 1", _stage(8, 0.1)), ("stage 2", _stage(12, 0.3))], path)
    _png(path, min_kb=30)
    # A run that recorded only rewards (no F1, queries or lengths) still plots.
    run_report.plot_training([("run", [{"kind": "train", "step": 1, "reward": 0.5},
                                       {"kind": "train", "step": 2, "reward": 0.7}])],
                             tmp_path / "sparse.png")
    _png(tmp_path / "sparse.png")


def test_plot_training_without_records_says_so(tmp_path):
    for stages in ([], [("stage 1", []), ("stage 2", [])]):
        with pytest.raises(ValueError, match="no stage has any record"):
            run_report.plot_training(stages, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_policies_writes_a_png(tmp_path):
    run_report.plot_policies(TABLE, tmp_path / "policies.png")
    _png(tmp_path / "policies.png")
    with pytest.raises(ValueError, match="no policy"):
        run_report.plot_policies({}, tmp_path / "empty.png")


def _tables(markdown: str) -> dict[str, dict[str, list[str]]]:
    """{group: {policy: cells}} of results_markdown's output."""
    tables, group = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            group = line[3:]
            tables[group] = {}
        elif line.startswith("| ") and not line.startswith(("| policy", "| ---")):
            name, *cells = [cell.strip() for cell in line.strip("|").split("|")]
            tables[group][name] = cells
    return tables


def test_results_markdown_has_a_table_per_group_all_first():
    markdown = run_report.results_markdown(TABLE, "Demo results",
                                           notes=("synthetic world", "greedy, 9 retrievals"))
    assert markdown.startswith("# Demo results\n\nsynthetic world\n\ngreedy, 9 retrievals\n\n## all")
    tables = _tables(markdown)
    assert list(tables) == ["all", "single", "bridge"]
    assert all(list(rows) == ["base", "stage 2"] for rows in tables.values())
    header = next(line for line in markdown.splitlines() if line.startswith("| policy"))
    assert header == ("| policy | EM | CEM | F1 | retrievals/question | answered | "
                      "gold passages retrieved |")
    assert tables["all"]["base"] == ["0.100", "0.150", "0.200", "0.00", "0.500", "0.000"]
    assert tables["all"]["stage 2"] == ["0.500", "0.625", "0.687", "2.13", "0.950", "0.813"]
    assert tables["single"]["stage 2"] == ["–", "–", "0.750", "1.25", "–", "–"]
    assert tables["bridge"]["base"] == ["–"] * 6  # a policy not evaluated on the group
    with pytest.raises(ValueError, match="no policy"):
        run_report.results_markdown({}, "empty")


def test_read_metrics_feeds_plot_training(tmp_path):
    """The whole path a demo takes: a workdir's metrics.jsonl to a PNG."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _stage(5, 0.2)))
    run_report.plot_training([("demo", run_report.read_metrics(tmp_path))],
                             tmp_path / "training.png")
    _png(tmp_path / "training.png", min_kb=20)
