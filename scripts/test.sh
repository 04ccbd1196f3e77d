#!/usr/bin/env bash
# The whole test suite, in three runs (two Ray instances on one machine break each other):
#   - tests without Ray, in the background beside the next runs: the Ray tests leave a fifth
#     to a quarter of the cores idle, waiting on processes that start and stop;
#   - tests sharing one local Ray instance (marker `ray`, set by tests/conftest.py);
#   - then tests that start their own Ray cluster or job processes (marker `subprocess`).
# Extra arguments go to every run (`-k quantize`): a run they select no test of is passed
# over, and the script fails only where they select none at all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
VENV=${VENV:-.venv}  # as scripts/setup.sh made it
"$VENV/bin/ruff" check colorcore jobs tests bench scripts

# --durations: the slowest tests, to keep the suite within its 15 minutes on 2 cores
run() { "$VENV/bin/pytest" -m "$1" --durations=12 "${@:2}"; }

log=$(mktemp)
# At the idle priority (SCHED_IDLE; nice 19 where chrt fails): they run on the cores the
# Ray tests leave idle and yield them at once. Ray starts its workers at nice 15: at nice 10
# these tests came before them, and the Ray tests took 25-50% longer.
idle() { chrt --idle -p 0 "$BASHPID" > /dev/null 2>&1 || renice -n 19 -p "$BASHPID" > /dev/null; }
({ idle || echo "scripts/test.sh: at the normal priority" >&2; }; run "not ray and not subprocess" "$@") \
  > "$log" 2>&1 &
beside=$!
trap 'kill "$beside" 2> /dev/null || true; rm -f "$log"' EXIT  # (it has ended, unless interrupted)
statuses=()
for phase in "ray and not subprocess" subprocess; do
  status=0
  run "$phase" "$@" || status=$?
  statuses+=("$status")
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || break
done
status=0
wait "$beside" || status=$?
echo "=== tests without Ray (run beside the Ray tests) ==="
cat "$log"
statuses+=("$status")

selected=0
for status in "${statuses[@]}"; do
  if [ "$status" -eq 5 ]; then continue; fi  # pytest's "no tests collected"
  [ "$status" -eq 0 ] || exit "$status"
  selected=1
done
[ "$selected" -eq 1 ] || { echo "scripts/test.sh: no test selected" >&2; exit 5; }
