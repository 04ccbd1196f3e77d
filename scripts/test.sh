#!/usr/bin/env bash
# The whole test suite, in two phases (two Ray instances on one machine break each other):
#   1. in-process tests sharing one local Ray instance and one moto S3 server;
#   2. tests that start their own Ray cluster or job processes (marker `subprocess`).
# Extra arguments go to both pytest runs (`-k quantize`): a phase they select no test of is
# passed over, and the script fails only where they select none at all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
VENV=${VENV:-.venv}  # as scripts/setup.sh made it
"$VENV/bin/ruff" check colorcore jobs tests bench scripts
selected=0
for phase in "not subprocess" subprocess; do
  status=0
  # --durations: the slowest tests, to keep the suite within its 15 minutes on 2 cores
  "$VENV/bin/pytest" -m "$phase" --durations=12 "$@" || status=$?
  if [ "$status" -eq 5 ]; then continue; fi  # pytest's "no tests collected"
  [ "$status" -eq 0 ] || exit "$status"
  selected=1
done
[ "$selected" -eq 1 ] || { echo "scripts/test.sh: no test selected" >&2; exit 5; }
