#!/usr/bin/env bash
# README command 2 (and CI): install (once), lint, type-check and run the tests. The tests start
# their own Kafka broker; a missing component fails them, it never skips them.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
