#!/usr/bin/env bash
# The README's GPU figures and GPU tests in one call on a CUDA machine, each benchmark beside
# its plain baseline from shared/bench, run in the same call:
#
#   bash bench/gpu_suite.sh ANCHORS [PART ...]
#
# ANCHORS is a folder holding shared/bench's gpu_anchor.py and gpu_colorize_anchor.py (copy
# the whole folder into the checkout, e.g. as shared_bench/, when the machine gets only the
# checkout). PARTS (default: all, in this order; on an H200, 2026-11-30, "colorize tests
# train" took 6 minutes, plus half a minute of machine start):
#   colorize   bench/colorize_gpu.py compiled, each batch's steps timed apart (--stages),
#              batches in 4 pipelined pieces and whole, encoded by nvJPEG and by the job's
#              default CPU threads (in pieces also with every other piece on the threads
#              whole), then gpu_colorize_anchor.py
#   tests      the tests marked gpu (nvJPEG codec and loader, CUDA vs CPU colour maths and
#              encoding, compiled Lab steps, the compiled loss backward and BatchNorm averages,
#              the evaluation's VGG-16 classifier)
#   train      bench/loader.py (nvJPEG, CPU threads 1, 2, 4, ... up to every core, CPU
#              processes), bench/train_step.py compiled bf16, synthetic and from JPEG shards
#              (decoded by nvJPEG, by the CPU threads, by CPU processes), then the anchor's
#              compiled bf16 step
#   targets    bench/targets.py: targets and loss of a batch of 256, with the compiled
#              run's kernels listed (--profile)
# Needs python3 with torch, torchvision, pillow, opencv-python-headless, scikit-image, pyarrow,
# pyyaml, imagecodecs and pytest; not Ray.
# JSON results go to $OUT (default: a temporary folder) when the scripts write any.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ ! -f "$1/gpu_anchor.py" ]; then  # before any GPU time is spent
  echo "usage: bash bench/gpu_suite.sh ANCHORS [PART ...] (ANCHORS: a copy of shared/bench)"
  exit 2
fi
anchors=$(cd "$1" && pwd)
shift
parts=${*:-colorize tests train targets}
export PYTHONPATH=. OUT=${OUT:-$(mktemp -d)}
status=0
run() {  # one step: its time and exit status are printed, a failure does not stop the rest
  local start=$SECONDS
  echo "=== $*"
  "$@" || { echo "=== FAILED ($?): $*"; status=1; }
  echo "=== $((SECONDS - start)) s"
}
for part in $parts; do
  case $part in tests | targets | train | colorize) ;; *)
    echo "unknown part $part (tests, targets, train, colorize)"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for part in $parts; do
  case $part in
    tests)
      run python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu \
        tests/test_quantize.py tests/test_color.py tests/test_colorize.py tests/test_loader.py \
        tests/test_loss.py tests/test_model.py
      # apart: its imports (the evaluation job's) failing there leaves the others' results
      run python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu tests/test_evaluate.py ;;
    targets) run python3 bench/targets.py --profile ;;
    train)
      run python3 bench/loader.py
      run python3 bench/train_step.py --modes bf16_cl_compile --shards
      run python3 -c "import json, sys; sys.path.insert(0, '$anchors'); import gpu_anchor as a; \
print(json.dumps(a.train_bench(256, 176, 'bf16_cl_compile')))" ;;
    colorize)
      run python3 bench/colorize_gpu.py --modes compiled --stages
      # with cuDNN's autotuning, as the job runs (the anchor leaves it off)
      run python3 -c "import runpy, torch; torch.backends.cudnn.benchmark = True; \
runpy.run_path('$anchors/gpu_colorize_anchor.py', run_name='__main__')" ;;
  esac
done
exit $status
