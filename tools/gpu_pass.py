"""The GPU pass: one call on a lent GPU machine that leaves everything it learned in one folder.

Run through ``tools/gpu_pass.sh`` (see its header and README, "GPU pass"). Standard library only:
the driver must work before anything is installed or built, and a crash in a stage must never
take the driver (and the other stages' results) with it.

Stages, in priority order (``--stages`` takes names or numbers):

1. ``env``: nvidia-smi, torch / CUDA / triton / nvcc versions, SM count, tools present.
2. ``wheels``: install the carried wheels of ``.whl/`` (what the GPU image lacks) into a private
   folder put on ``PYTHONPATH`` for the later stages; an optional wheel (xformers) is kept only
   if it imports.
3. ``build``: ``setup.py build_ext --inplace`` with ``TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1
   MAX_JOBS=16``, timed; then the CUDA kernels must be registered.
4. ``tests``: every ``gpu``-marked test, per-test timeout (pytest-timeout where installed),
   JUnit XML.
5. ``sanitizer``: compute-sanitizer memcheck / racecheck / synccheck over a small solver case and a
   small RandP-kernel case (``tools/gpu_sanitize_case.py``); skipped with a note where the
   runtime refuses it.
6. ``bench``: ``benchmarks/gpu_targets.py``: the issue's targets, short (ceilings, solver,
   Triton fusion block, Neuroverse3D 128^3, RandP vs Painter at batch 16).
7. ``train``: the demo model (``train/configs/demo_gpu.yaml``) until the budget ends; the bf16
   export and the resumable training state come back.

Each stage runs in child processes under its own timeout (the process group is killed at the
limit) and writes ``<work>/<stage>.json`` and ``<work>/logs/<stage>.log``; after every stage the
output folder is refreshed: ``gpu_pass_summary.json``, ``gpu_pass_summary.md`` and
``gpu_pass_logs.tar.gz`` (the device tool returns at most 8 files, so everything else is packed).

``--dry-run`` runs every stage on the CPU at tiny sizes (``make test`` runs it), so the script
cannot rot before its GPU day.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "wheels", "build", "tests", "sanitizer", "bench", "train")
# Longest a stage may run (seconds); each also gets no more than what is left of --budget.
CAPS = {"env": 45, "wheels": 60, "build": 300, "tests": 160, "sanitizer": 100, "bench": 300, "train": 3600}
# Seconds kept for the benchmark while the stages before it run: the targets are what a GPU pass is
# for, so tests and sanitizer take what is left above this (a second call can re-run them).
BENCH_RESERVE_S = 200
PACK_RESERVE_S = 20  # kept back from every stage: the kill grace and writing the output folder
KILL_GRACE_S = 12  # SIGINT, then this long before SIGTERM/SIGKILL (pytest writes its JUnit on SIGINT)
REFRESH_S = 30  # the output folder is refreshed this often while a stage runs (a kill loses little)
BUILD_DIR = Path(tempfile.gettempdir()) / "vicl_fast_gpu_pass_build"  # kept between calls on one machine
SITE_DIR = Path(tempfile.gettempdir()) / "vicl_fast_gpu_pass_site"
PART_BYTES = 15 * 2 ** 20  # the device tool returns files of at most 16 MiB
MAX_RESUME_PARTS = 4  # ... and at most 8 files: summary .json/.md, logs .tar.gz, the export, these
# Modules the wheels stage must make importable (module name -> wheel), and optional ones.
NEEDED_MODULES = {"nibabel": "nibabel", "monai": "monai", "lap": "lapx",
                  "torch_linear_assignment": "torch-linear-assignment"}
OPTIONAL_WHEELS = ("xformers",)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass
class Ctx:
    out: Path
    work: Path
    dry_run: bool
    deadline: float  # time.monotonic() when the whole pass must be done
    python: str
    env: dict[str, str]
    wheels: Path
    resume_dir: Path
    results: dict[str, dict] = field(default_factory=dict)
    started: str = ""
    stages: list[str] = field(default_factory=list)
    _last_refresh: float = 0.0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, stage: str) -> Path:
        return self.work / "logs" / f"{stage}.log"


# ----------------------------------------------------------------------------- processes

def run_cmd(ctx: Ctx, stage: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> dict:
    """Run ``cmd`` with output appended to the stage's log; kill its process group at ``timeout``.

    Returns ``{"cmd", "rc", "seconds", "timed_out"}`` (rc None when it could not start). At the
    timeout the group gets SIGINT first (pytest then writes its JUnit report, a benchmark its last
    save), SIGTERM/SIGKILL ``KILL_GRACE_S`` later; whatever the command left running in its group
    after a normal exit (data-loader workers, compilers) is killed too. The output folder is
    refreshed every ``REFRESH_S`` seconds meanwhile.
    """
    log = ctx.log(stage)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, cwd=cwd, env=env or ctx.env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return {"cmd": " ".join(cmd), "rc": None, "seconds": 0.0, "timed_out": False, "error": str(e)}
        timed_out = False
        end = t0 + max(1.0, timeout)
        while True:
            try:
                rc = p.wait(timeout=max(0.1, min(REFRESH_S, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end:
                    timed_out = True
                    _kill_group(p)
                    rc = p.wait()
                    f.write(f"\n!! killed after {timeout:.0f} s (stage timeout)\n")
                    break
                refresh(ctx)
        _kill_group(p, grace=0)  # leftovers of a normal exit
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 2), "timed_out": timed_out}


def _kill_group(p: subprocess.Popen, grace: float | None = None) -> None:
    """SIGINT, then SIGTERM, waiting for the leader each time; then SIGKILL whatever is left of
    the group. ``grace=0``: only the final SIGKILL (cleanup after a normal exit)."""
    grace = KILL_GRACE_S if grace is None else grace
    if grace:
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def refresh(ctx: Ctx) -> None:
    """Rewrite the output folder from what the stages have written so far (rate-limited)."""
    if time.monotonic() - ctx._last_refresh < REFRESH_S / 2:
        return
    try:
        write_outputs(ctx)
    except Exception as e:  # noqa: BLE001 - a refresh must never break a stage
        print(f"gpu_pass: output refresh failed: {e}", flush=True)


def py(ctx: Ctx, stage: str, code: str, timeout: float = 60) -> tuple[dict, dict | None]:
    """Run Python ``code`` that prints one JSON object on its last stdout line; returns (run, obj)."""
    res_file = ctx.work / f".{stage}_probe.json"
    res_file.unlink(missing_ok=True)
    wrapped = (f"import json, sys\n{code}\n"
               f"open({str(res_file)!r}, 'w').write(json.dumps(RESULT, default=str))\n")
    r = run_cmd(ctx, stage, [ctx.python, "-c", wrapped], timeout)
    obj = json.loads(res_file.read_text()) if res_file.is_file() else None
    return r, obj


def which(name: str) -> str | None:
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def budget(ctx: Ctx, stage: str) -> float:
    """Seconds a stage may run: its cap, what is left of the pass, and, for the stages before the
    benchmark (when it is to run), what is left above the benchmark's reserve."""
    left = ctx.left() - PACK_RESERVE_S
    if "bench" in ctx.stages and "bench" not in ctx.results and STAGES.index(stage) < STAGES.index("bench") \
            and stage in ("tests", "sanitizer"):
        left -= BENCH_RESERVE_S
    return max(0.0, min(CAPS[stage], left))


class Clock:
    """A stage's own end: every command inside gets at most what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        rest = max(0.0, self.end - time.monotonic())
        return rest if cap is None else min(cap, rest)


# ----------------------------------------------------------------------------- stages

ENV_PROBE = r"""
import platform
RESULT = {"python": platform.python_version()}
try:
    import torch
    RESULT.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                  cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        RESULT.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                      gpu_mem_gib=round(p.total_memory / 2 ** 30, 1),
                      l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
                      device_count=torch.cuda.device_count())
except Exception as e:
    RESULT["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("triton", "numpy", "scipy", "pytest", "pytest_timeout", "pytest_benchmark", "safetensors"):
    try:
        m = __import__(mod)
        RESULT[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        RESULT[mod] = None
print(RESULT)
"""


def stage_env(ctx: Ctx) -> dict:
    clock = Clock(budget(ctx, "env"))
    tools = {n: which(n) for n in ("nvidia-smi", "nvcc", "compute-sanitizer", "ncu", "ninja")}
    r, probe = py(ctx, "env", ENV_PROBE, clock.left(30))
    for cmd in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                                 "clocks.mem,temperature.gpu,power.draw", "--format=csv"],
                ["nvcc", "--version"], ["compute-sanitizer", "--version"], ["uname", "-a"], ["nproc"],
                ["free", "-g"], ["df", "-h", str(REPO)]):
        if cmd[0] in tools and not tools[cmd[0]]:
            continue
        if clock.left() < 2:
            break
        run_cmd(ctx, "env", [tools.get(cmd[0]) or cmd[0], *cmd[1:]], clock.left(10))
    res: dict = {"tools": tools, "probe": probe or {}, "dry_run": ctx.dry_run}
    if probe is None or "torch_error" in (probe or {}):
        return {**res, "status": "failed", "note": "torch does not import (see logs/env.log)"}
    if not probe.get("cuda_available"):
        status = "passed" if ctx.dry_run else "failed"
        return {**res, "status": status, "note": "no CUDA device visible" + (" (dry run)" if ctx.dry_run else "")}
    return {**res, "status": "passed",
            "note": f"{probe.get('gpu')} sm_{probe.get('capability', '').replace('.', '')} "
                    f"{probe.get('sm_count')} SMs; torch {probe.get('torch')} CUDA {probe.get('torch_cuda')}"}


def _wheel_files(ctx: Ctx) -> list[Path]:
    return sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []


def _wheel_name(p: Path) -> str:
    return p.name.split("-")[0].lower().replace("_", "-")


def stage_wheels(ctx: Ctx) -> dict:
    t = budget(ctx, "wheels")
    wheels = _wheel_files(ctx)
    if not wheels:
        return {"status": "skipped", "note": f"no wheels in {ctx.wheels} (make them with tools/gpu_wheels.sh)"}
    names = [_wheel_name(w) for w in wheels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return {"status": "failed", "note": f"two versions of {', '.join(dupes)} in {ctx.wheels}: keep one"}
    needed = [w for w in wheels if _wheel_name(w) not in OPTIONAL_WHEELS]
    optional = [w for w in wheels if _wheel_name(w) in OPTIONAL_WHEELS]
    res: dict = {"wheels": [w.name for w in wheels]}
    if ctx.dry_run:  # check that pip would accept them on the GPU machine (cp312, manylinux x86-64)
        cmd = [ctx.python, "-m", "pip", "install", "--dry-run", "-q", "--no-index", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               "--target", str(ctx.work / "site_dry")]
        for plat in WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        r = run_cmd(ctx, "wheels", cmd + [str(w) for w in wheels], t)
        ok = r["rc"] == 0
        return {**res, "status": "passed" if ok else "failed",
                "note": f"{len(wheels)} wheels {'fit' if ok else 'do NOT fit'} cp312 manylinux x86-64 (dry run)"}
    clock = Clock(t)
    site = SITE_DIR / "needed"
    base = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade"]
    r = run_cmd(ctx, "wheels", base + ["--target", str(site)] + [str(w) for w in needed], clock.left())
    if r["rc"] != 0:
        return {**res, "status": "failed", "note": "pip could not install the wheels (logs/wheels.log)"}
    _prepend_path(ctx.env, "PYTHONPATH", str(site))
    for w in optional:  # xformers: its binary must match this torch; kept only if its attention RUNS
        opt = SITE_DIR / _wheel_name(w)
        run_cmd(ctx, "wheels", base + ["--target", str(opt), str(w)], clock.left(60))
        env = dict(ctx.env)
        _prepend_path(env, "PYTHONPATH", str(opt))
        chk = run_cmd(ctx, "wheels", [ctx.python, "-c", XFORMERS_PROBE], clock.left(60), env=env)
        res.setdefault("optional", {})[w.name] = chk["rc"] == 0
        if chk["rc"] == 0:
            _prepend_path(ctx.env, "PYTHONPATH", str(opt))
    _, imports = py(ctx, "wheels", IMPORTS_PROBE, clock.left(60))
    imports = imports or {m: False for m in NEEDED_MODULES}
    res["imports"] = imports
    missing = [m for m, ok in imports.items() if not ok]
    return {**res, "status": "passed" if not missing else "failed",
            "note": "all needed modules import" if not missing else f"missing: {', '.join(missing)}"}


XFORMERS_PROBE = r"""
import torch, xformers.ops as xops
for dt in (torch.float32, torch.bfloat16):
    q = torch.randn(2, 64, 4, 32, device="cuda", dtype=dt)
    out = xops.memory_efficient_attention(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
    assert (out.float() - ref.float()).abs().max() < 2e-2, dt
"""

IMPORTS_PROBE = "RESULT = {}\nfor m in %r:\n    try:\n        __import__(m)\n        RESULT[m] = True\n" \
                "    except Exception as e:\n        print(m, type(e).__name__, e)\n        RESULT[m] = False\n" \
                % (tuple(NEEDED_MODULES),)


def _prepend_path(env: dict[str, str], key: str, value: str) -> None:
    env[key] = value + (os.pathsep + env[key] if env.get(key) else "")


BUILD_PROBE = r"""
import torch, vicl_fast
from vicl_fast import _ext
RESULT = {"report": vicl_fast.backends_report(), "extension": _ext.extension_loaded(),
          "lsa_cpu": _ext.has_kernel("linear_sum_assignment", "CPU"),
          "cuda_ops": {op: _ext.has_kernel(op, "CUDA") for op in
                       ("linear_sum_assignment", "cosine_cost", "gather_rows_add", "scatter_rows_add")}}
RESULT["lsa_cuda"] = all(RESULT["cuda_ops"].values())
print(RESULT["report"])
"""


def stage_build(ctx: Ctx) -> dict:
    t = budget(ctx, "build")
    env = dict(ctx.env)
    cmd = [ctx.python, "setup.py", "build_ext"]
    if ctx.dry_run:  # the real compile, into a side folder (ninja keeps it incremental between runs)
        env.setdefault("MAX_JOBS", "2")
        side = REPO / ".make" / "gpu_pass_build"
        cmd += ["--build-temp", str(side / "temp"), "--build-lib", str(side / "lib")]
    else:  # in place: the later stages import vicl_fast from the checkout
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env["FORCE_CUDA"] = "1"
        env.setdefault("MAX_JOBS", "16")
        cmd += ["--inplace", "--build-temp", str(BUILD_DIR)]  # a second call on this machine: no-op
    r = run_cmd(ctx, "build", cmd, t, env=env)
    res: dict = {"build_seconds": r["seconds"], "rc": r["rc"], "timed_out": r["timed_out"],
                 "env": {k: env.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "FORCE_CUDA", "MAX_JOBS")}}
    if r["rc"] != 0:
        return {**res, "status": "timeout" if r["timed_out"] else "failed",
                "note": f"build failed after {r['seconds']:.0f} s (logs/build.log)"}
    _, probe = py(ctx, "build", BUILD_PROBE, max(10, min(120, ctx.left() - PACK_RESERVE_S)))
    res["probe"] = probe
    if not probe or not probe.get("extension"):
        return {**res, "status": "failed", "note": "built, but vicl_fast._C does not load (logs/build.log)"}
    if not ctx.dry_run and not probe.get("lsa_cuda"):
        missing = [op for op, ok in (probe.get("cuda_ops") or {}).items() if not ok]
        return {**res, "status": "failed", "note": f"CUDA ops not registered: {', '.join(missing)}"}
    return {**res, "status": "passed", "note": f"built in {r['seconds']:.0f} s"
            + ("; CUDA kernels registered" if probe.get("lsa_cuda") else "; CPU kernels (dry run)")}


# Skip reasons a real GPU run may show; any other skip of a gpu test means it measured nothing.
ALLOWED_GPU_SKIPS = ("two GPUs", "slow")


def _junit_summary(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable JUnit XML: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bad.append(f"{case.get('classname')}::{case.get('name')} [{kind}] {msg[0][:200] if msg else ''}")
    skips: dict[str, int] = {}
    for case in root.iter("testcase"):
        el = case.find("skipped")
        if el is not None:
            why = (el.get("message") or "").strip()[:160]
            skips[why] = skips.get(why, 0) + 1
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return {**tot, "not_passed": bad[:40], "skip_reasons": skips}


def stage_tests(ctx: Ctx) -> dict:
    junit = ctx.work / "junit_gpu.xml"
    cmd = [ctx.python, "-m", "pytest", "tests", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "junit_family=xunit2", "-o", "faulthandler_timeout=60",
           "--continue-on-collection-errors"]
    has_timeout = run_cmd(ctx, "tests", [ctx.python, "-c", "import pytest_timeout"], 30)["rc"] == 0
    if has_timeout:
        cmd += ["--timeout=90"]
    env = dict(ctx.env, VICL_FAST_TRITON_AUTOTUNE="0")  # one compile per shape; the bench stage autotunes
    r = run_cmd(ctx, "tests", cmd, max(1.0, budget(ctx, "tests") - KILL_GRACE_S), env=env)
    res = {"junit": _junit_summary(junit), "rc": r["rc"], "per_test_timeout": has_timeout}
    j = res["junit"]
    counts = (f"{j.get('passed', 0)} passed, {j.get('failures', 0)} failed, {j.get('errors', 0)} errors, "
              f"{j.get('skipped', 0)} skipped") if j else "no JUnit report"
    if r["timed_out"]:
        return {**res, "status": "timeout", "note": f"stage timeout after {r['seconds']:.0f} s; {counts}"}
    ok = r["rc"] == 0 or (ctx.dry_run and r["rc"] == 5)
    if ok and not ctx.dry_run:  # on a GPU, a pass that ran nothing, or skipped for a wrong reason, is no pass
        odd = {w: n for w, n in (j.get("skip_reasons") or {}).items()
               if not any(a in w for a in ALLOWED_GPU_SKIPS)}
        if not j.get("passed") or odd:
            return {**res, "status": "failed", "note": f"{counts}; unexpected skips: {odd}" if odd
                    else f"{counts}: nothing ran"}
    return {**res, "status": "passed" if ok else "failed", "note": counts}


def stage_sanitizer(ctx: Ctx) -> dict:
    t = budget(ctx, "sanitizer")
    case = [ctx.python, "tools/gpu_sanitize_case.py", "all"]
    cs = which("compute-sanitizer")
    cuda = (ctx.results.get("env", {}).get("probe") or {}).get("cuda_available")
    if ctx.dry_run or not cs or not cuda:
        why = "dry run" if ctx.dry_run else ("compute-sanitizer not found" if not cs else "no CUDA device")
        r = run_cmd(ctx, "sanitizer", case + ["--device", "cpu"], t)
        return {"status": "skipped" if r["rc"] == 0 else "failed",
                "note": f"{why}: cases ran without the sanitizer (rc {r['rc']})"}
    tools = {}
    clock = Clock(t)
    # No caching allocator under the sanitizer: each tensor its own allocation, so an access just
    # past a tensor is out of bounds for memcheck instead of landing inside a 2 MiB segment.
    env = dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    for tool in ("memcheck", "racecheck", "synccheck"):  # memcheck first: the one that matters most
        if clock.left() < 20:
            tools[tool] = {"status": "skipped", "note": "out of time"}
            continue
        log = ctx.log("sanitizer")
        before = log.stat().st_size if log.exists() else 0
        extra = ["--report-api-errors", "no"] if tool == "memcheck" else []  # torch's benign API errors
        r = run_cmd(ctx, "sanitizer", [cs, "--tool", tool, *extra, "--error-exitcode", "99", "--print-limit",
                                       "20", *case, "--device", "cuda"], clock.left(60), env=env)
        with open(log, "rb") as f:
            f.seek(before)
            text = f.read().decode(errors="replace")
        summary = [ln.strip() for ln in text.splitlines() if "SUMMARY" in ln]
        if r["timed_out"]:
            st = "timeout"
        elif r["rc"] == 99:
            st = "failed"  # the sanitizer found errors
        elif r["rc"] != 0 and ("not supported" in text.lower() or "unable to" in text.lower()):
            st = "refused"
        else:
            st = "passed" if r["rc"] == 0 else "failed"
        tools[tool] = {"status": st, "rc": r["rc"], "seconds": r["seconds"], "summary": summary[-2:]}
    states = {v["status"] for v in tools.values()}
    status = "failed" if "failed" in states else "timeout" if "timeout" in states else \
        "skipped" if states <= {"refused", "skipped"} else "passed"
    return {"status": status, "tools": tools,
            "note": "; ".join(f"{k} {v['status']}" for k, v in tools.items())}


def stage_bench(ctx: Ctx) -> dict:
    t = budget(ctx, "bench")
    js, md = ctx.work / "bench.json", ctx.work / "bench.md"
    cmd = [ctx.python, "benchmarks/gpu_targets.py", "--json", str(js), "--md", str(md),
           "--deadline-seconds", f"{max(10, t - 10):.0f}"]
    cmd += ["--device", "cpu", "--tiny"] if ctx.dry_run else ["--device", "cuda"]
    r = run_cmd(ctx, "bench", cmd, t)
    try:
        data = json.loads(js.read_text()) if js.is_file() else {}
    except ValueError:
        data = {}
    targets = data.get("targets", [])
    met = sum(1 for x in targets if x.get("met") is True)
    unmet = [x["id"] for x in targets if x.get("met") is False]
    unknown = [x["id"] for x in targets if x.get("met") is None]
    res = {"targets": targets, "rc": r["rc"], "sections": {k: v.get("status") for k, v in
                                                           data.get("sections", {}).items()}}
    status = "timeout" if r["timed_out"] else ("passed" if r["rc"] == 0 else "failed")
    if status == "passed" and not ctx.dry_run and (unknown or not targets):
        status = "partial"  # ran, but some target has no figure (out of time, or a missing solver)
    return {**res, "status": status,
            "note": f"targets met {met}/{len(targets)}" + (f"; not met: {', '.join(unmet)}" if unmet else "")
            + (f"; unmeasured: {', '.join(unknown)}" if unknown else "")}


def stage_train(ctx: Ctx) -> dict:
    left = ctx.left() - PACK_RESERVE_S - 20  # 20 s for packing the resumable state
    eval_margin = 30 if ctx.dry_run else 75  # predictions + metrics on colin27 + export after training
    minutes = (min(CAPS["train"], left) - eval_margin) / 60
    if ctx.dry_run:  # a few seconds: stops at the deadline, so the partial + resume path runs too
        minutes = min(minutes, 0.05)
    if minutes < (0.02 if ctx.dry_run else 1.0):
        return {"status": "skipped", "note": f"only {max(left, 0):.0f} s left: no training"}
    export = ctx.out / "demo_neuroverse3d.safetensors"
    cache, demo_out = ctx.work / "cache", ctx.work / "demo_out"
    cmd = [ctx.python, "-m", "vicl_fast.main_job", "--out", str(demo_out), "--cache-dir", str(cache),
           "--export", str(export), "--max-train-minutes", f"{minutes:.2f}"]
    resumed = False
    if ctx.dry_run:
        cmd += ["--quick", "--device", "cpu", "--retrain"]
    else:
        cmd += ["--recipe", "train/configs/demo_gpu.yaml", "--device", "cuda"]
        if (ctx.resume_dir / "runs").is_dir():  # a previous GPU pass's state, carried back
            shutil.copytree(ctx.resume_dir / "runs", cache / "runs", dirs_exist_ok=True)
            resumed = True
        else:
            cmd += ["--retrain"]
    r = run_cmd(ctx, "train", cmd, max(30, min(CAPS["train"], left)))
    summary = demo_out / "summary.json"
    res: dict = {"rc": r["rc"], "seconds": r["seconds"], "resumed": resumed, "minutes_budget": round(minutes, 2)}
    if summary.is_file():
        s = json.loads(summary.read_text())
        res["model"] = {k: s.get("model", {}).get(k) for k in ("steps", "train_seconds", "partial", "device",
                                                               "val_on_held_out_icbm152_copies")}
        res["tasks"] = [{"task": x["task"], "model": x["model"], "copy_prompt": x["copy_prompt"]}
                        for x in s.get("tasks", [])]
        shutil.copy(summary, ctx.work / "train_summary.json")
        if (demo_out / "summary.md").is_file():
            shutil.copy(demo_out / "summary.md", ctx.work / "train_summary.md")
    for csv in (cache / "runs").glob("*/*.csv") if (cache / "runs").is_dir() else []:
        shutil.copy(csv, ctx.work / f"train_{csv.name}")
    res["resume_parts"] = _pack_resume(ctx, cache)
    ok = r["rc"] == 0 and export.is_file()
    steps = (res.get("model") or {}).get("steps")
    return {**res, "status": "timeout" if r["timed_out"] else ("passed" if ok else "failed"),
            "note": (f"{steps} steps in {r['seconds']:.0f} s; exported {export.name}" if ok
                     else f"training failed (rc {r['rc']}, logs/train.log)")}


def _pack_resume(ctx: Ctx, cache: Path) -> list[str]:
    """The training run's checkpoints (to continue on the next GPU), split into <= 15 MiB parts."""
    runs = cache / "runs"
    if not runs.is_dir() or not any(runs.glob("*/checkpoints")):
        return []
    tar = ctx.work / "train_resume.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(runs, arcname="runs")
    parts = []
    with open(tar, "rb") as f:
        i = 0
        while chunk := f.read(PART_BYTES):
            part = ctx.out / f"train_resume.tar.part{i}"
            part.write_bytes(chunk)
            parts.append(part.name)
            i += 1
    tar.unlink()
    if len(parts) > MAX_RESUME_PARTS:  # the tool returns 8 files: 3 summaries/logs + 1 export + these
        for p in parts:
            (ctx.out / p).unlink()
        return [f"state too large to return ({len(parts)} parts)"]
    return parts


STAGE_FUNCS: dict[str, Callable[[Ctx], dict]] = {
    "env": stage_env, "wheels": stage_wheels, "build": stage_build, "tests": stage_tests,
    "sanitizer": stage_sanitizer, "bench": stage_bench, "train": stage_train}


# ----------------------------------------------------------------------------- output

LOGS_MAX_BYTES = 15 * 2 ** 20


def write_outputs(ctx: Ctx) -> None:
    ctx._last_refresh = time.monotonic()
    summary = {"started": ctx.started, "dry_run": ctx.dry_run, "repo_commit": _git_commit(),
               "stages": ctx.results}
    (ctx.work / "gpu_pass_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _atomic_write(ctx.out / "gpu_pass_summary.json", json.dumps(summary, indent=2, default=str))
    _atomic_write(ctx.out / "gpu_pass_summary.md", _markdown(ctx))
    files = [p for p in sorted(ctx.work.rglob("*")) if p.is_file() and not _skip_in_logs(p.relative_to(ctx.work))]
    # Over the size the tool returns: drop the largest logs first (the summaries are always kept).
    while files and sum(p.stat().st_size for p in files) > 4 * LOGS_MAX_BYTES:
        files.remove(max(files, key=lambda p: p.stat().st_size))
    tmp = ctx.out / ".gpu_pass_logs.tar.gz.tmp"
    for _ in range(4):
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
            for p in files:
                tf.add(p, arcname=f"gpu_pass/{p.relative_to(ctx.work)}", recursive=False)
        if tmp.stat().st_size <= LOGS_MAX_BYTES or not files:
            break
        files.remove(max(files, key=lambda p: p.stat().st_size))
    tmp.replace(ctx.out / "gpu_pass_logs.tar.gz")


def _skip_in_logs(rel: Path) -> bool:
    top = rel.parts[0]
    return top in ("cache", "demo_out") or top.startswith((".", "site")) or rel.suffix in (".so", ".o")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _markdown(ctx: Ctx) -> str:
    env = (ctx.results.get("env") or {}).get("probe") or {}
    lines = [f"# GPU pass {ctx.started}{' (dry run)' if ctx.dry_run else ''}", "",
             f"Device: {env.get('gpu', 'no GPU')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton')}, Python {env.get('python')}; commit {_git_commit()}.", "",
             "| # | stage | status | seconds | note |", "|---|---|---|---|---|"]
    for i, name in enumerate(STAGES, 1):
        r = ctx.results.get(name)
        if r:
            lines.append(f"| {i} | {name} | {r.get('status')} | {r.get('seconds', '')} | {_cell(r.get('note', ''))} |")
    targets = (ctx.results.get("bench") or {}).get("targets") or []
    if targets:
        lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for x in targets:
            met = {True: "yes", False: "NO", None: "-"}[x.get("met")]
            lines.append(f"| {x['id']}: {_cell(x.get('what', ''))} | {_cell(x.get('target', ''))} | "
                         f"{_cell(x.get('measured', ''))} | {met} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_stages(spec: str | None, prerequisites: bool = False) -> list[str]:
    """Stage names in priority order from "names or numbers, comma-separated". With
    ``prerequisites``, a stage that needs the package (tests, sanitizer, bench, train) brings env,
    wheels and build along: a fresh machine has neither the wheels nor the build, and on a warm one
    they are quick (the build folder is kept between calls)."""
    if not spec:
        return list(STAGES)
    out = []
    for tok in spec.replace(" ", "").split(","):
        if not tok:
            continue
        name = STAGES[int(tok) - 1] if tok.isdigit() and 1 <= int(tok) <= len(STAGES) else tok
        if name not in STAGES:
            raise SystemExit(f"gpu_pass: unknown stage {tok!r}; stages are {', '.join(STAGES)} (or 1-7)")
        out.append(name)
    if prerequisites and set(out) & {"tests", "sanitizer", "bench", "train"}:
        out += ["env", "wheels", "build"]
    return [s for s in STAGES if s in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_pass.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: $OUT, else ./gpu_pass_out)")
    ap.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (or 1-7); default all")
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole pass (default 540)")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of carried wheels (default .whl/)")
    ap.add_argument("--resume-dir", default=str(REPO / "gpu_pass_resume"),
                    help="unpacked train_resume.tar of an earlier pass (continues its training)")
    ap.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--no-prerequisites", action="store_true",
                    help="run exactly --stages (default: env, wheels and build come along with later stages)")
    a = ap.parse_args(argv)
    stages = parse_stages(a.stages, prerequisites=not a.no_prerequisites)
    out = Path(a.out or os.environ.get("OUT") or REPO / "gpu_pass_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="gpu_pass_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    _prepend_path(env, "PYTHONPATH", str(REPO))  # the in-place build is imported from the checkout
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the interpreter's own bin first: ninja (parallel builds) and the venv's tools are found there
    _prepend_path(env, "PATH", str(Path(os.environ.get("PYTHON", sys.executable)).parent))
    if a.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, even on a GPU machine
    ctx = Ctx(out=out, work=work, dry_run=a.dry_run, deadline=time.monotonic() + a.budget,
              python=os.environ.get("PYTHON", sys.executable), env=env, wheels=Path(a.wheels),
              resume_dir=Path(a.resume_dir), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), stages=stages)
    print(f"gpu_pass: stages {', '.join(stages)}; budget {a.budget:.0f} s; output {out}; work {work}"
          + (" (dry run)" if a.dry_run else ""), flush=True)
    failed = False
    for name in stages:
        if ctx.left() < PACK_RESERVE_S + 5:
            ctx.results[name] = {"status": "skipped", "note": "out of budget", "seconds": 0}
            continue
        t0 = time.monotonic()
        try:
            res = STAGE_FUNCS[name](ctx)
        except Exception as e:  # a bug in one stage's driver code never loses the others
            res = {"status": "error", "note": f"driver error: {type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        ctx.results[name] = res
        (work / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
        write_outputs(ctx)
        failed |= res["status"] in ("failed", "error", "timeout", "partial")
        print(f"gpu_pass: [{STAGES.index(name) + 1}/{len(STAGES)}] {name:9s} {res['status']:8s} "
              f"{res['seconds']:6.1f} s  {res.get('note', '')}", flush=True)
    write_outputs(ctx)
    print(_markdown(ctx), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
