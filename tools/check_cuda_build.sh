#!/usr/bin/env bash
# Compile-only check of vicl_fast's CUDA kernels (csrc/**/*.cu) for Hopper
# (sm_90) with the flags setup.py uses (-O3 --fmad=false, C++17), printing
# each kernel's registers, spills, stack frame and shared memory
# (ptxas -v). Works on a machine without a GPU and with a CPU build of torch
# (headers only; nothing is linked or run).
#
#   tools/check_cuda_build.sh                 # every .cu file, sm_90
#   ARCH=80 tools/check_cuda_build.sh csrc/lsa/lsa_cuda.cu
#
# Exit status: non-zero if a file fails to compile or a kernel spills.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${ARCH:-90}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PY="${PYTHON:-python}"
OUT="${OUT_DIR:-$(mktemp -d)}"
mapfile -t INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PYINC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
ABI="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
FLAGS=(-c -gencode="arch=compute_${ARCH},code=sm_${ARCH}" -O3 -std=c++17 --expt-relaxed-constexpr
       --fmad=false -lineinfo -Xptxas -v -Xcompiler -fPIC -DVICL_FAST_WITH_CUDA=1
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "-D_GLIBCXX_USE_CXX11_ABI=${ABI}"
       -diag-suppress 3306)
for d in "${INC[@]}"; do FLAGS+=(-I"$d"); done
FLAGS+=(-I"$PYINC")
# A CPU wheel of torch ships c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; a CUDA wheel has it.
if [ ! -f "${INC[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE); fi

FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then mapfile -t FILES < <(find csrc -name '*.cu' | sort); fi
status=0
for f in "${FILES[@]}"; do
  log="$OUT/$(basename "$f").log"
  echo "== $f (sm_${ARCH})"
  if ! "$NVCC" "${FLAGS[@]}" "$f" -o "$OUT/$(basename "$f").o" >"$log" 2>&1; then
    grep -E "error" "$log" | head -20 || true
    echo "FAILED: $f (log: $log)"; status=1; continue
  fi
  # One line per kernel: name, registers, spills, stack, shared memory.
  "$PY" - "$log" <<'PYEOF' || status=1
import re, subprocess, sys
lines = open(sys.argv[1]).read().splitlines()
rows, cur, bad = [], None, False
for ln in lines:
    m = re.search(r"Compiling entry function '(\S+)'", ln)
    if m:
        cur = {"name": m.group(1)}; rows.append(cur); continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", ln)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", ln)
        cur["smem"] = int(s.group(1)) if s else 0
names = [r["name"] for r in rows]
dem = []
for tool in ("cu++filt", "c++filt"):
    try:
        dem = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    except OSError:
        continue
    if len(dem) == len(names):
        break
if len(dem) != len(names):
    dem = names
print(f"  {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'static smem':>11}  kernel")
for r, d in zip(rows, dem or names):
    d = re.sub(r"\(.*\)$", "", d).replace("vicl_fast::", "")
    print(f"  {r.get('regs', -1):4d} {r.get('spill_st', 0):5d}/{r.get('spill_ld', 0):<5d} {r.get('stack', 0):5d} "
          f"{r.get('smem', 0):11d}  {d}")
    bad |= r.get("spill_st", 0) > 0 or r.get("spill_ld", 0) > 0
if bad:
    print("  WARNING: a kernel spills registers to local memory")
    sys.exit(1)
PYEOF
done
grep -h "warning" "$OUT"/*.log 2>/dev/null | grep -v "AutogradState.h" | sort -u | head -20 || true
echo "logs and objects in $OUT"
exit $status
