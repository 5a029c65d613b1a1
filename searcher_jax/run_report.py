"""What a run shows a person afterwards: its curves, a comparison of policies, a results table.

Pure functions over the records a run leaves in `<workdir>/metrics.jsonl` (trainer.MetricsWriter:
`{"kind": "train" | "eval", "step": int, ...}`) and over evaluation summaries
(evaluation.summarize). The plots are PNGs drawn on matplotlib Figures without pyplot, so no
display, no global backend and no figure registry are involved: a CPU laptop and a pod host draw
the same file, and a test can call them any number of times.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

# What the plots draw, by record kind, in the keys the trainer writes: trainer.score (the
# reward and its parts), Trajectories.metrics (queries, lengths) and evaluation.summarize.
# train: the reward, its format term and CEM (F1, the default recipe's answer term, has its
# own panel).
REWARD_KEYS = ("reward", "format_ok", "cem")
RETRIEVAL_KEYS = {"train": "queries_per_row", "eval": "queries_per_question"}
LENGTH_KEY = "response_tokens"  # train: tokens a row generated after its prompt (with documents)

# results_markdown's columns: (heading, metric, decimals).
COLUMNS = (("EM", "em", 3), ("CEM", "cem", 3), ("F1", "f1", 3),
           ("retrievals/question", "queries_per_question", 2), ("answered", "answered", 3),
           ("gold passages retrieved", "gold_retrieved", 3))
MISSING = "–"


def read_metrics(path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of the metrics.jsonl in a workdir), in file order.

    Raises ValueError naming the file and line when a line is not a JSON object, rather than
    plotting a run with a hole in it.
    """
    path = epath.Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise ValueError(f"{path}:{number}: a record needs 'kind' and 'step', got {line!r}")
        records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class StageSpan:
    """One stage placed on the shared time axis: its records carry `global_step`."""
    name: str
    offset: int  # the steps of every stage before this one
    steps: int  # this stage's own steps (its last recorded step)
    records: tuple[dict[str, Any], ...]


def latest_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (kind, step), the last written, in step order.

    A run preempted after its last checkpoint redoes the steps since, and appends them again;
    the later record is the one the run's checkpoints continue from. At one step the train
    record comes first: an evaluation at step N evaluates the policy after step N's update.
    """
    latest = {(r["kind"], r["step"]): dict(r) for r in records}
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"] == "eval"))


def on_one_axis(stages: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> list[StageSpan]:
    """Stages in order on one step axis: stage k starts where the stages before it ended.

    A stage's length is its last recorded step (its final evaluation is at its total steps);
    its records get `global_step = offset + step`, the inputs are not modified.
    """
    spans, offset = [], 0
    for name, records in stages:
        records = latest_records(records)
        steps = max((int(r["step"]) for r in records), default=0)
        spans.append(StageSpan(name, offset, steps, tuple(
            {**r, "global_step": offset + int(r["step"])} for r in records)))
        offset += steps
    return spans


def plot_training(stages: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path) -> None:
    """One PNG of a training run (or of its stages in order) over steps.

    Panels: the reward and its parts; F1 (train rollouts as a line, evaluations as markers);
    retrievals per question; response length. A dashed line marks each stage hand-off. A
    metric a run did not record is left out.

    Raises ValueError when no stage has a record.
    """
    spans = on_one_axis(stages)
    if not any(span.records for span in spans):
        raise ValueError("plot_training: no stage has any record (is metrics.jsonl empty?)")
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel
    figure = _figure(figsize=(9, 11))
    axes = figure.subplots(4, 1, sharex=True)
    reward_ax, f1_ax, retrieval_ax, length_ax = axes

    def draw(ax, kind, key, label, **style) -> bool:
        """One stage at a time, so no line joins the end of a stage to the next's start."""
        drawn = False
        for span in spans:
            points = [(r["global_step"], _number(r.get(key))) for r in span.records
                      if r["kind"] == kind]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), label=None if drawn else label, **style)
                drawn = True
        return drawn

    eval_style = {"color": "C3", "marker": "o", "linestyle": ":", "linewidth": 1}
    for span in spans:  # the spread of the rows' rewards around their mean
        rows = [r for r in span.records if r["kind"] == "train"
                and _number(r.get("reward")) is not None
                and _number(r.get("reward_std")) is not None]
        if rows:
            reward_ax.fill_between([r["global_step"] for r in rows],
                                   [float(r["reward"]) - float(r["reward_std"]) for r in rows],
                                   [float(r["reward"]) + float(r["reward_std"]) for r in rows],
                                   alpha=0.15, color="C0", linewidth=0)
    drawn = [False] * 4
    for i, key in enumerate(REWARD_KEYS):
        drawn[0] |= draw(reward_ax, "train", key, f"train {key}", color=f"C{i}")
    drawn[1] |= draw(f1_ax, "train", "f1", "train rollouts (sampled)", color="C0")
    drawn[1] |= draw(f1_ax, "eval", "f1", "eval (greedy)", **eval_style)
    drawn[2] |= draw(retrieval_ax, "train", RETRIEVAL_KEYS["train"], "train rollouts",
                     color="C0")
    drawn[2] |= draw(retrieval_ax, "eval", RETRIEVAL_KEYS["eval"], "eval", **eval_style)
    drawn[3] |= draw(length_ax, "train", LENGTH_KEY, "train rollouts", color="C0")

    labels = ("reward", "F1", "retrievals / question", "response tokens / row")
    for ax, label, has_data in zip(axes, labels, drawn):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if has_data:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center",
                    va="center", color="gray")
    f1_ax.set_ylim(-0.02, 1.02)  # a margin, so markers at 0 and 1 show whole
    for ax in (retrieval_ax, length_ax):  # counts from 0: a change reads at its size
        ax.set_ylim(bottom=0)
    for span in spans:
        if span.offset > 0:
            for ax in axes:
                ax.axvline(span.offset, color="gray", linestyle="--", linewidth=1)
        # The stage's name at its start, above the top panel.
        reward_ax.annotate(span.name, xy=(span.offset, 1), xycoords=("data", "axes fraction"),
                           xytext=(3, 3), textcoords="offset points", fontsize=9,
                           va="bottom", color="dimgray")
    # Every stage starts at its offset, step 0 (its first evaluation), so the axis does too.
    end = max(1, spans[-1].offset + spans[-1].steps)
    length_ax.set_xlim(-0.02 * end, 1.02 * end)
    length_ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    length_ax.set_xlabel("rollout step" + (" (stages in order)" if len(spans) > 1 else ""))
    figure.tight_layout()
    _save(figure, path)


def plot_policies(table: Mapping[str, Mapping[str, Mapping[str, float]]], path) -> None:
    """A grouped bar chart of policies: F1 by question group, and retrievals per question.

    table: {policy: {group: {metric: value}}}, groups such as "all", "single", "bridge",
    "comparison"; policies and groups are drawn in the order given (a group first seen under a
    later policy comes after the earlier ones). A missing value leaves its bar out.
    """
    policies, groups = _policies_and_groups(table, "plot_policies")
    figure = _figure(figsize=(max(6.0, 1.5 + len(groups) * (0.6 + 0.35 * len(policies))), 7))
    f1_ax, retrieval_ax = figure.subplots(2, 1, sharex=True)
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        for ax, metric, fmt in ((f1_ax, "f1", "{:.2f}"),
                                (retrieval_ax, "queries_per_question", "{:.1f}")):
            points = [(g, _number(table[policy].get(group, {}).get(metric)))
                      for g, group in enumerate(groups)]
            points = [(g, v) for g, v in points if v is not None]
            if not points:
                continue
            xs = [g - 0.4 + width * (i + 0.5) for g, _ in points]
            bars = ax.bar(xs, [v for _, v in points], width, label=policy, color=f"C{i}")
            ax.bar_label(bars, labels=[fmt.format(v) for _, v in points], fontsize=7, padding=1)
    f1_ax.set_ylim(0, 1.05)
    f1_ax.set_ylabel("F1")
    retrieval_ax.set_ylabel("retrievals per question")
    retrieval_ax.set_xticks(range(len(groups)), groups)
    retrieval_ax.set_xlabel("questions")
    retrieval_ax.set_ylim(bottom=0)
    for ax in (f1_ax, retrieval_ax):
        ax.grid(axis="y", alpha=0.3)
    f1_ax.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    _save(figure, path)


def results_markdown(table: Mapping[str, Mapping[str, Mapping[str, float]]], title: str,
                     notes: Sequence[str] = (),
                     columns: Sequence[tuple[str, str, int]] = COLUMNS,
                     row_heading: str = "policy", skip_missing: bool = False) -> str:
    """A markdown document: the title, the notes, then one table per group ("all" first).

    Rows are policies (in the order given), one column per (heading, metric, decimals) of
    `columns`: by default EM, CEM, F1, retrievals per question, the share answered and the
    share of gold passages retrieved; a missing value is "–". skip_missing: leave out a
    policy's row in a group it has no values for (a benchmark table: the methods run on a set).
    """
    policies, groups = _policies_and_groups(table, "results_markdown")
    if "all" in groups:
        groups = ["all"] + [g for g in groups if g != "all"]
    lines = [f"# {title}", ""]
    for note in notes:  # a paragraph each: markdown joins consecutive lines into one
        lines += [note, ""]
    for group in groups:
        lines += [f"## {group}", "",
                  f"| {row_heading} | " + " | ".join(heading for heading, _, _ in columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for policy in policies:
            if skip_missing and group not in table[policy]:
                continue
            values = table[policy].get(group, {})
            cells = [_cell(values.get(metric), decimals) for _, metric, decimals in columns]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _policies_and_groups(table, caller: str) -> tuple[list[str], list[str]]:
    policies = list(table)
    groups = list(dict.fromkeys(group for policy in policies for group in table[policy]))
    if not policies or not groups:
        raise ValueError(f"{caller}: the table has no policy or no question group")
    return policies, groups


def _number(value) -> float | None:
    """value as a float, or None for a missing or non-finite one (a gap, not a zero)."""
    try:
        value = float(value)
    except (TypeError, ValueError):  # None, or a string
        return None
    return value if math.isfinite(value) else None


def _cell(value, decimals: int) -> str:
    value = _number(value)
    return MISSING if value is None else f"{value:.{decimals}f}"


def _figure(figsize):
    # A bare Figure renders with Agg on savefig; pyplot would pick a GUI backend if it found one.
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    return Figure(figsize=figsize, dpi=110)


def _save(figure, path) -> None:
    """PNG bytes written in one go (path may be gs://), parents created."""
    path = epath.Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
