#!/usr/bin/env bash
# The whole test suite, in two phases (two Ray instances on one machine break each other):
#   1. in-process tests sharing one local Ray instance and one moto S3 server;
#   2. tests that start their own Ray cluster or job processes (marker `subprocess`).
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
.venv/bin/ruff check colorcore jobs tests bench
.venv/bin/pytest -m "not subprocess" "$@"
.venv/bin/pytest -m subprocess "$@"
