#!/usr/bin/env bash
# Installs shardserve with its test extras and runs the whole test suite (CPU).
# The README's test command and .ci/run both call this script.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[dev]" || exit 1
python3 -m pytest tests -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here, not a pass" >&2
  exit 1
fi
exit "$rc"
