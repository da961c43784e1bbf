#!/usr/bin/env bash
# The GPU pass: everything vicl_fast needs to learn from a GPU, in ONE call of at most ~9 minutes.
#
#   bash tools/gpu_pass.sh                      # on the GPU machine: every stage, output in $OUT
#   bash tools/gpu_pass.sh --stages tests,bench # a subset (names or numbers 1-7)
#   bash tools/gpu_pass.sh --dry-run --out DIR  # every stage on the CPU at tiny sizes (make test runs it)
#
# Stages, in priority order, each under its own timeout, each leaving its log and a JSON summary
# before the next starts: 1 env, 2 wheels, 3 build, 4 tests, 5 sanitizer, 6 bench, 7 train.
# Output (at most 8 files, as the device tool returns): gpu_pass_summary.json / .md,
# gpu_pass_logs.tar.gz (every log, JUnit XML, benchmark JSON), and from the training stage the
# exported bf16 checkpoint and the resumable training state. README "GPU pass" says how to run it.
# All the logic is in tools/gpu_pass.py (standard library only).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tools/gpu_pass.py "$@"
