"""What the benchmark suites share: best-of-N wall time, and a main that prints the result JSON."""
import argparse
import json
import sys
import time
from typing import Callable


def best_seconds(fn: Callable[[], object], repeats: int, warmups: int = 0) -> float:
    """The fastest of `repeats` timed calls of fn, after `warmups` untimed ones (compiles, caches)."""
    for _ in range(warmups):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def json_main(description: str, add_args: Callable[[argparse.ArgumentParser], None],
              run: Callable[[argparse.Namespace], dict], argv=None) -> int:
    """Parses argv (default: the command line) with add_args' flags, runs, prints the result."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    print(json.dumps(run(parser.parse_args(sys.argv[1:] if argv is None else argv)), indent=1))
    return 0
