"""Benchmark tables from evaluation records (SPEC section 6): ours, or the authors' traces.

One code path computes every number of a table from record rows, whether a run has just
written them (benchmarks.py) or `launch/evaluate.py --from_traces` reads them back later, so a
run's table always recomputes from its records. A row is one question, in the released traces'
field names:

    question, answer (a string or a list of golds), pred_ans   required
    gpt4o_output ("True"/"False": the authors' judge)          or judge (true/false/null: ours)
    stop_reason_final ("finished": answered)                   or end_reason ("answer": ours)
    gen_text_store (its document blocks count the retrievals)  or retrievals / queries (ours)
    set, method                                                ours; else the file's stem, "trace"

EM, CEM (the paper's ACC_R) and F1 are recomputed from pred_ans and the golds
(rl/metrics.py), never read from the row; ACC_L is the share of judged rows (those with a
true or false verdict) the judge called correct: rows whose verdict is malformed, failed or
absent are left out of its denominator, not counted wrong, and every table says so: the
per-set table's judged / malformed / failed columns, and in the paper-style table a cell's
"(judged n/N)" whenever n is short of its N questions.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from searcher_jax import evaluation, judge, run_report
from searcher_jax.data.prompts import BEGIN_DOCUMENTS
from searcher_jax.rl import metrics

RECORDS_DIR = "records"
RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
TRACE_METHOD = "trace"
# (heading, summary key, decimals) of each set's table; the judge's columns only when some
# row was judged.
COLUMNS = (("questions", "questions", 0), ("EM", "em", 3), ("CEM (ACC_R)", "cem", 3),
           ("F1", "f1", 3), ("ACC_L (judge)", "judge", 3), ("judged", "judged", 0),
           ("judge malformed", "judge_malformed", 0), ("judge failed", "judge_failed", 0),
           ("retrievals/question", "queries_per_question", 2), ("answered", "answered", 3))
JUDGE_KEYS = ("judge", "judged", "judge_malformed", "judge_failed")


def read_records(path) -> list[dict]:
    """The rows of a .jsonl record file (ours or the authors' eval_results).

    Raises ValueError naming the file, the line and the field for a line that is not JSON, not
    an object, or lacks a string question, a string (or non-empty string list) answer or a
    string pred_ans; FileNotFoundError for a missing file.
    """
    path = epath.Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in ("question", "pred_ans"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{where}: field {field!r} must be a string, got "
                                 f"{row.get(field)!r}")
        answer = row.get("answer")
        golds = [answer] if isinstance(answer, str) else answer
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"{where}: field 'answer' must be a string or a non-empty list of "
                             f"strings, got {answer!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def golds_of(row: Mapping) -> list[str]:
    return [row["answer"]] if isinstance(row["answer"], str) else list(row["answer"])


def judge_state(row: Mapping) -> str:
    """"true", "false", "malformed", "failed" or "absent" (never judged)."""
    if "judge" in row:
        if isinstance(row["judge"], bool):
            return str(row["judge"]).lower()
        return "failed" if row.get("judge_error") else "malformed"
    if "gpt4o_output" in row:
        verdict = judge.parse_verdict(str(row["gpt4o_output"]))
        return "malformed" if verdict is None else str(verdict).lower()
    return "absent"


def retrievals_of(row: Mapping) -> int:
    """Searches whose documents the row got: ours record them; an authors' trace counts its
    document blocks (each query's answer is one)."""
    if "retrievals" in row:
        return int(row["retrievals"])
    if isinstance(row.get("queries"), list):
        return len(row["queries"])
    return str(row.get("gen_text_store", "")).count(BEGIN_DOCUMENTS)


def answered(row: Mapping) -> bool:
    """Whether the trajectory ended with an answer (ours: end_reason "answer"; the authors':
    stop_reason_final "finished")."""
    if "end_reason" in row:
        return row["end_reason"] == "answer"
    if "stop_reason_final" in row:
        return row["stop_reason_final"] == "finished"
    return row["pred_ans"] != evaluation.NO_ANSWER


def summarize_rows(rows: Sequence[Mapping]) -> dict[str, float]:
    """Means over a set's rows: em, cem, f1, judge (over judged rows; absent when none),
    queries_per_question, answered; counts: questions, judged, judge_malformed, judge_failed.

    Raises ValueError for no rows.
    """
    if not rows:
        raise ValueError("summarize_rows: no rows")
    preds = [(row["pred_ans"], golds_of(row)) for row in rows]
    states = [judge_state(row) for row in rows]
    verdicts = [s == "true" for s in states if s in ("true", "false")]
    summary = {
        "questions": float(len(rows)),
        "em": float(np.mean([metrics.exact_match(p, g) for p, g in preds])),
        "cem": float(np.mean([metrics.cover_exact_match(p, g) for p, g in preds])),
        "f1": float(np.mean([metrics.f1_score(p, g) for p, g in preds])),
        "judged": float(len(verdicts)),
        "judge_malformed": float(states.count("malformed")),
        "judge_failed": float(states.count("failed")),
        "queries_per_question": float(np.mean([retrievals_of(row) for row in rows])),
        "answered": float(np.mean([answered(row) for row in rows])),
    }
    if verdicts:
        summary["judge"] = float(np.mean(verdicts))
    return summary


def record_files(paths: Sequence[str]) -> list[epath.Path]:
    """The record files named by files and directories: a directory gives its `records/*.jsonl`
    (a run of ours) or else its own `*.jsonl` (the authors' eval_results), sorted; a judge
    cache is never a record file. Raises FileNotFoundError for a path that does not exist or
    a directory with no .jsonl file."""
    files = []
    for name in paths:
        path = epath.Path(name)
        if not path.exists():
            raise FileNotFoundError(f"--from_traces: {path} does not exist")
        if not path.is_dir():
            files.append(path)
            continue
        directory = path / RECORDS_DIR if (path / RECORDS_DIR).is_dir() else path
        found = sorted(p for p in directory.glob("*.jsonl") if p.name != judge.CACHE_FILE)
        if not found:
            raise FileNotFoundError(f"--from_traces: no .jsonl record file in {directory}")
        files += found
    return files


def group_rows(files: Sequence) -> dict[tuple[str, str], list[dict]]:
    """(set, method) -> rows, in file order: a row's own set and method fields, or its file's
    stem and "trace"."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in files:
        for row in read_records(path):
            key = (str(row.get("set") or epath.Path(path).stem),
                   str(row.get("method") or TRACE_METHOD))
            groups.setdefault(key, []).append(row)
    return groups


def table_of(groups: Mapping[tuple[str, str], Sequence[Mapping]]
             ) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {set: summary}} (run_report's {policy: {group: summary}} layout)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (set_name, method), rows in groups.items():
        table.setdefault(method, {})[set_name] = summarize_rows(rows)
    return table


def paper_markdown(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The paper's layout: a row per method, a column per set, cells "ACC_R / ACC_L".

    ACC_L is over the judged rows only (malformed, failed and unjudged verdicts are left out
    of its denominator, not counted wrong); a cell where fewer than all of the set's questions
    were judged says so: "0.654 / 0.750 (judged 498/500)"."""
    sets = list(dict.fromkeys(s for by_set in table.values() for s in by_set))
    lines = ["| method | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets)]
    for method, by_set in table.items():
        cells = []
        for s in sets:
            summary = by_set.get(s)
            if summary is None:
                cells.append(run_report.MISSING)
                continue
            acc_l = summary.get("judge")
            cell = f"{summary['cem']:.3f} / " + (run_report.MISSING if acc_l is None
                                                 else f"{acc_l:.3f}")
            judged, questions = int(summary.get("judged", 0)), int(summary["questions"])
            if acc_l is not None and judged < questions:
                cell += f" (judged {judged}/{questions})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(table, title: str, notes: Sequence[str]) -> str:
    """The whole results.md: title, notes (the setup), the paper-style table, a table per set."""
    notes = [*notes, "## ACC_R / ACC_L", paper_markdown(table)]
    judged = any(summary.get("judged") or summary.get("judge_malformed")
                 or summary.get("judge_failed")
                 for by_set in table.values() for summary in by_set.values())
    columns = [c for c in COLUMNS if judged or c[1] not in JUDGE_KEYS]
    return run_report.results_markdown(table, title, notes, columns=columns,
                                       row_heading="method", skip_missing=True)


def retrieval_stats_line(stats: Mapping[str, int]) -> str:
    """One header line of a retriever's counts (the web backend's queries, pages, failures,
    timeouts): what the searches met, beside the numbers they gave."""
    return ("retrieval counts (failures and timeouts give a query fewer documents, never stop "
            "the run): " + ", ".join(f"{name} {int(count)}" for name, count in stats.items()))


def write_results(out_dir, table, title: str, setup: Sequence[str],
                  records: Sequence[str] = (), retrieval_stats: Mapping[str, int] | None = None,
                  **extra) -> str:
    """results.md and results.json ({"title", "setup", "records", "table", **extra}, and
    "retrieval_stats" when given) in out_dir; returns the markdown. setup: the header's lines
    (what decided the numbers); records: the record files the table was computed from (listed
    under the setup); retrieval_stats: the retriever's counts (web.WebRetriever.stats), a
    header line of results.md, kept apart from the setup (a table recomputed from the records
    does not carry them)."""
    notes = list(setup) + (["records: " + ", ".join(map(str, records))] if records else [])
    if retrieval_stats:
        notes.append(retrieval_stats_line(retrieval_stats))
        extra = {**extra, "retrieval_stats": dict(retrieval_stats)}
    markdown = results_markdown(table, title, notes)
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_MD).write_text(markdown)
    (out / RESULTS_JSON).write_text(json.dumps(
        {"title": title, "setup": list(setup), "records": list(map(str, records)),
         "table": table, **extra}, indent=1))
    return markdown


def recorded_setup(paths: Sequence[str]) -> list[str]:
    """The setup lines of the runs whose directories are named (their results.json), so a
    table recomputed from a run's records carries the run's header; each line once."""
    notes = []
    for name in paths:
        results = epath.Path(name) / RESULTS_JSON
        if epath.Path(name).is_dir() and results.exists():
            notes += [str(line) for line in json.loads(results.read_text()).get("setup", [])]
    return list(dict.fromkeys(notes))
