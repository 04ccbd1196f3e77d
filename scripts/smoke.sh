#!/usr/bin/env bash
# The main job on this machine: sets up .venv if needed, then trains the smoke preset on the
# synthetic sample data (created under runs/ on first use). Extra arguments go to jobs.train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "${VENV:-.venv}/bin/python" -m jobs.train --preset smoke "$@"
