#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools; re-runs only when pyproject.toml or the constraints change.
# torch is installed first, pinned: an unpinned torch resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.colorcore-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/constraints.txt -nt "$stamp" ]; then
  echo "installing into $VENV (first time: about 5 minutes)"
  pip_install() {  # pip's own exit status stops the script; its install-location warnings are left out
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
  }
  pip_install "torch==2.13.0"
  pip_install -c scripts/constraints.txt -e ".[test]"
  "$VENV/bin/python" -c "import torch, ray, s3fs, moto, skimage" # fails loudly if an install step failed
  touch "$stamp"
fi
