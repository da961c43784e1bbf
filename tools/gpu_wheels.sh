#!/usr/bin/env bash
# Download, HERE (a machine with PyPI), the wheels the GPU machine lacks into .whl/ (git-ignored),
# for the GPU pass to carry: the GPU image (Python 3.12, torch 2.11 + CUDA 13, triton 3.6) has
# torch, numpy, scipy, pytest(-benchmark, -timeout), hypothesis, scikit-image, safetensors, einops,
# pyyaml, tqdm, pillow, but not these. One version of each (two stop the install there).
#
#   bash tools/gpu_wheels.sh        # then: device run with carry [".whl"], see README "GPU pass"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# name==version: pinned so that every GPU pass runs the same code; --no-deps, so each needed
# dependency that the image lacks must be listed too (none today: see the header).
WHEELS=(
  nibabel==5.4.2                  # NIfTI I/O (pipeline, CLI, main job)
  monai==1.6.1                    # SwinUNETR backbone (randp_swinunetr)
  lapx==0.11.1                    # lapjv / lapjvr, solver comparison
  torch-linear-assignment==0.1.0  # batched GPU assignment, solver comparison (pure Python + Triton)
  xformers==0.0.35                # optional: kept by the GPU pass only if it imports with that torch
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q "${args[@]}" "$w"
done
ls -l .whl
du -sh .whl  # travels with the working tree: 64 MiB in all
