"""Question files in, a TFDS dataset of array_record files out (searcher_jax/data/question_records.py).

  python launch/build_questions.py --out /data/questions train=stage_2.jsonl hotpotqa=hotpotqa_500.jsonl

Prints the dataset directory and each split's size; a run then reads
`--config.data.train_file=/data/questions/question_records/1.0.0:train`.
"""
import argparse
import contextlib
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="TFDS data_dir to write (local or gs://)")
    parser.add_argument("splits", nargs="+", metavar="SPLIT=FILE", help="a split name and its question file")
    args = parser.parse_args(argv)
    from searcher_jax.data import question_records
    try:
        split_files = dict(_split(item) for item in args.splits)
        with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress: stdout is the summary
            directory = question_records.write_records(split_files, args.out)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"build_questions: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"dataset": str(directory), "splits": question_records.split_sizes(directory),
                      "use": {split: f"{directory}:{split}" for split in split_files}}, indent=1))
    return 0


def _split(item: str) -> tuple[str, str]:
    split, sep, path = item.partition("=")
    if not sep or not split or not path:
        raise ValueError(f"{item!r}: expected SPLIT=FILE")
    return split, path


if __name__ == "__main__":
    sys.exit(main())
