#!/usr/bin/env bash
# Install vicl_fast and what it needs on a fresh machine, without ever letting
# pip replace the installed torch (a CUDA torch stays CUDA, a CPU machine never
# downloads CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .make
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo ">> torch not found: installing torch==2.13.0 (the CPU build on disk on CPU machines)"
  "$PY" -m pip install torch==2.13.0
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
echo "torch==${TORCH_VERSION}" > .make/constraints.txt
echo ">> using torch ${TORCH_VERSION}"
"$PY" -m pip install -q -c .make/constraints.txt -r requirements.txt
# Optional extras: triton (its CPU interpreter runs the Triton kernels' tests).
"$PY" -m pip install -q -c .make/constraints.txt triton || echo ">> triton not installable here: Triton tests will be skipped"
echo ">> building vicl_fast (C++ kernels; CUDA kernels too when torch is a CUDA build)"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q -c .make/constraints.txt --no-build-isolation --no-deps -e .
"$PY" -c "import vicl_fast; print(vicl_fast.backends_report())"
