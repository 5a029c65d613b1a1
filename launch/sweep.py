"""Run an ablation grid: one training run per combination of overrides, then a table.

    python launch/sweep.py --config=configs/demo.py --out=runs/sweep \
        --sweep=rl.estimator=reinforce_baseline,grpo --sweep=rl.learning_rate=1e-4,3e-4 \
        -- --config.train.steps=10

Each combination runs `launch/tpu_pod.py` in its own workdir (<out>/<name>), one after
another; arguments after `--` go to every run. A finished run leaves <workdir>/sweep_done.json
and is skipped when the sweep is run again; an interrupted one resumes from its checkpoint.
Prints a table of each run's last train and eval metrics and writes <out>/summary.json.
"""
import argparse
import itertools
import json
import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = (("train", "reward"), ("train", "format_ok"), ("train", "queries_per_row"),
           ("eval", "f1"), ("eval", "cem"), ("eval", "queries_per_question"))


def parse_axis(text: str) -> tuple[str, list[str]]:
    """'rl.estimator=a,b' -> ('rl.estimator', ['a', 'b'])."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--sweep {text!r}: expected section.field=value1,value2,...")
    return key, values.split(",")


def run_name(overrides: dict[str, str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._+-]", "-", f"{k.split('.')[-1]}-{v}")
                    for k, v in overrides.items())


def last_metrics(workdir: pathlib.Path) -> dict[str, dict]:
    last = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        last[record["kind"]] = record
    return last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.py"))
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--sweep", action="append", required=True, type=parse_axis,
                        help="section.field=value1,value2 (repeat for a grid)")
    args, passthrough = parser.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    keys = [key for key, _ in args.sweep]
    rows = []
    for values in itertools.product(*(values for _, values in args.sweep)):
        overrides = dict(zip(keys, values))
        workdir = args.out / run_name(overrides)
        if not (workdir / "sweep_done.json").is_file():
            command = [sys.executable, str(REPO_ROOT / "launch" / "tpu_pod.py"),
                       f"--config={args.config}", *passthrough,
                       *(f"--config.{k}={v}" for k, v in overrides.items()),
                       f"--config.train.workdir={workdir}"]
            print("running", " ".join(command[1:]), flush=True)
            if subprocess.run(command, check=False).returncode != 0:
                print(f"run {workdir.name} failed; the sweep stops (rerun to resume)")
                return 1
            (workdir / "sweep_done.json").write_text(json.dumps(overrides))
        last = last_metrics(workdir)
        rows.append({"name": workdir.name, **overrides,
                     **{f"{kind}_{name}": last.get(kind, {}).get(name) for kind, name in COLUMNS}})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    header = ["name", *(f"{kind}_{name}" for kind, name in COLUMNS)]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        cells = [row["name"]] + ["-" if row[h] is None else f"{row[h]:.3f}" for h in header[1:]]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
