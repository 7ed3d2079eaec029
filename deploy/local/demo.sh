#!/usr/bin/env bash
# README command 1: install (once) and run the whole pipeline on the embedded defaults
# (local Kafka + chDB), then print the top talkers read back from ClickHouse.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/setup.sh
exec .venv/bin/flowtally demo "$@"
