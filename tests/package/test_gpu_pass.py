"""The GPU pass script (tools/gpu_pass.sh): its dry run on the CPU, and the driver's own mechanics.

The dry run executes every stage at tiny sizes (the real build into a side folder, the gpu-marked
tests, the sanitizer cases without the sanitizer, the target benchmarks, a time-boxed training run
that stops at its deadline and packs its resumable state), so the script cannot rot before its
GPU day. The driver tests check what must hold on that day whatever breaks: a stage that hangs is
killed at its timeout with its children, a stage whose driver code crashes does not lose the
others, and the output folder never holds more files, or other names, than the device tool returns.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests._scripts import load_script

REPO = Path(__file__).resolve().parents[2]
gp = load_script("tools/gpu_pass.py")

RETURNABLE = re.compile(r"^[A-Za-z0-9._-]+$")  # names the device tool brings back


def _check_returnable(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, [p.name for p in files]
    for p in files:
        assert RETURNABLE.match(p.name), p.name
        assert p.stat().st_size <= 16 * 2 ** 20, (p.name, p.stat().st_size)
    return files


def test_dry_run_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run(["bash", str(REPO / "tools" / "gpu_pass.sh"), "--dry-run", "--out", str(out),
                        "--work", str(work), "--budget", "600", "--wheels", str(tmp_path / "no_wheels")],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "gpu_pass_summary.json").read_text())
    st = {k: v["status"] for k, v in summary["stages"].items()}
    assert list(st) == list(gp.STAGES)
    assert st == {"env": "passed", "wheels": "skipped", "build": "passed", "tests": "passed",
                  "sanitizer": "skipped", "bench": "passed", "train": "passed"}, summary
    stages = summary["stages"]
    assert stages["env"]["probe"]["torch"] and stages["env"]["probe"]["cuda_available"] is False
    assert stages["build"]["probe"]["extension"] is True
    assert stages["tests"]["junit"]["tests"] > 50  # every gpu-marked test collected (skipped here)
    assert "rc 0" in stages["sanitizer"]["note"]
    ids = {t["id"] for t in stages["bench"]["targets"]}
    assert {"solver_us", "solver_identical", "solver_vs_tla", "fusion_speedup", "nv3d_speedup", "nv3d_peak_l1",
            "nv3d_flat", "randp_time_fp32", "randp_mem_bf16"} <= ids
    assert set(stages["bench"]["sections"].values()) == {"done"}
    # the training stage stopped at its deadline: a partial model, exported, and its resumable state
    train = stages["train"]
    assert train["model"]["partial"] is True and train["model"]["steps"] >= 1
    assert (out / "demo_neuroverse3d.safetensors").is_file()
    assert train["resume_parts"] and all((out / p).is_file() for p in train["resume_parts"])
    with tarfile.open(out / "gpu_pass_logs.tar.gz") as tf:
        names = set(tf.getnames())
    for stage in gp.STAGES:
        assert f"gpu_pass/{stage}.json" in names
    assert {"gpu_pass/junit_gpu.xml", "gpu_pass/bench.json", "gpu_pass/logs/build.log",
            "gpu_pass/train_summary.json"} <= names
    md = (out / "gpu_pass_summary.md").read_text()
    assert "| 7 | train | passed |" in md and "(dry run)" in md
    _check_returnable(out)
    # the resumable state unpacks to the trainer's checkpoint folder (what --resume-dir takes)
    resume = tmp_path / "resume"
    resume.mkdir()
    (resume / "state.tar").write_bytes(b"".join((out / p).read_bytes() for p in train["resume_parts"]))
    with tarfile.open(resume / "state.tar") as tf:
        assert any(n.startswith("runs/") and "/checkpoints/step_" in n for n in tf.getnames())


def test_stage_names_and_numbers():
    assert gp.parse_stages(None) == list(gp.STAGES)
    assert gp.parse_stages("bench,1,tests") == ["env", "tests", "bench"]  # always in priority order
    # on a fresh machine a later stage needs the wheels and the build: they come along by default
    assert gp.parse_stages("train", prerequisites=True) == ["env", "wheels", "build", "train"]
    assert gp.parse_stages("env,wheels", prerequisites=True) == ["env", "wheels"]
    with pytest.raises(SystemExit, match="unknown stage 'gpu'"):
        gp.parse_stages("gpu")
    with pytest.raises(SystemExit, match="unknown stage '9'"):
        gp.parse_stages("9")


def _ctx(tmp_path: Path, budget: float = 60) -> "gp.Ctx":
    (tmp_path / "work" / "logs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    return gp.Ctx(out=tmp_path / "out", work=tmp_path / "work", dry_run=True,
                  deadline=time.monotonic() + budget, python=sys.executable, env={"PATH": "/usr/bin:/bin"},
                  wheels=tmp_path / "none", resume_dir=tmp_path / "none")


def test_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(gp, "KILL_GRACE_S", 1)
    ctx = _ctx(tmp_path)
    pidfile = tmp_path / "child.pid"
    # the child starts a grandchild that would outlive a plain kill of the child
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    t0 = time.monotonic()
    r = gp.run_cmd(ctx, "env", ["bash", "-c", script], timeout=2)
    assert r["timed_out"] and time.monotonic() - t0 < 15
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert "killed after 2 s" in ctx.log("env").read_text()


def test_a_crashing_stage_loses_nothing(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("driver bug")

    monkeypatch.setitem(gp.STAGE_FUNCS, "env", boom)
    out = tmp_path / "out"
    rc = gp.main(["--dry-run", "--stages", "env,wheels", "--out", str(out), "--work", str(tmp_path / "w"),
                  "--wheels", str(tmp_path / "none")])
    assert rc == 1
    s = json.loads((out / "gpu_pass_summary.json").read_text())["stages"]
    assert s["env"]["status"] == "error" and "driver bug" in s["env"]["note"]
    assert s["wheels"]["status"] == "skipped"
    _check_returnable(out)


def test_out_of_budget_stages_are_skipped(tmp_path):
    out = tmp_path / "out"
    rc = gp.main(["--dry-run", "--stages", "bench,train", "--out", str(out), "--work", str(tmp_path / "w"),
                  "--budget", "5"])
    s = json.loads((out / "gpu_pass_summary.json").read_text())["stages"]
    assert rc == 0 and {v["status"] for v in s.values()} == {"skipped"}
    assert all(v["note"] == "out of budget" for v in s.values())
    assert list(s) == ["env", "wheels", "build", "bench", "train"]  # prerequisites came along


def test_gpu_run_that_ran_nothing_is_not_a_pass(tmp_path, monkeypatch):
    """On a GPU (not a dry run), a tests stage whose gpu tests all skipped for a reason other than
    "needs two GPUs" fails: it measured nothing."""
    ctx = _ctx(tmp_path)
    ctx.dry_run = False
    junit = ctx.work / "junit_gpu.xml"

    def fake_run(ctx_, stage, cmd, timeout, env=None, cwd=None):
        if "pytest" in cmd:
            junit.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2">'
                             '<testcase classname="t" name="a"><skipped message="needs a CUDA device"/></testcase>'
                             '<testcase classname="t" name="b"><skipped message="needs two GPUs"/></testcase>'
                             '</testsuite></testsuites>')
        return {"rc": 0, "seconds": 1.0, "timed_out": False, "cmd": " ".join(cmd)}

    monkeypatch.setattr(gp, "run_cmd", fake_run)
    res = gp.stage_tests(ctx)
    assert res["status"] == "failed" and "needs a CUDA device" in res["note"]
    assert res["junit"]["skip_reasons"] == {"needs a CUDA device": 1, "needs two GPUs": 1}


def test_junit_summary(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.b" name="err"><error message="boom">tb</error></testcase>'
        '<testcase classname="tests.b" name="skip"><skipped message="no gpu"/></testcase>'
        '</testsuite></testsuites>')
    j = gp._junit_summary(xml)
    assert (j["tests"], j["passed"], j["failures"], j["errors"], j["skipped"]) == (4, 1, 1, 1, 1)
    assert j["not_passed"] == ["tests.a::bad [failure] assert 1 == 2", "tests.b::err [error] boom"]
    assert gp._junit_summary(tmp_path / "missing.xml") == {}


def test_resume_state_split_and_capped(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    ck = tmp_path / "cache" / "runs" / "demo_64_x" / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    (ck / "model.bin").write_bytes(bytes(range(256)) * 400)  # 100 kB
    monkeypatch.setattr(gp, "PART_BYTES", 40_000)
    parts = gp._pack_resume(ctx, tmp_path / "cache")
    assert parts == ["train_resume.tar.part0", "train_resume.tar.part1", "train_resume.tar.part2"]
    blob = b"".join((ctx.out / p).read_bytes() for p in parts)
    (tmp_path / "joined.tar").write_bytes(blob)
    with tarfile.open(tmp_path / "joined.tar") as tf:
        assert "runs/demo_64_x/checkpoints/step_00000010/model.bin" in tf.getnames()
    monkeypatch.setattr(gp, "PART_BYTES", 20_000)  # 6 parts > MAX_RESUME_PARTS: none kept
    assert gp._pack_resume(ctx, tmp_path / "cache")[0].startswith("state too large")
    assert not list(ctx.out.glob("train_resume.tar.part*"))
    assert gp._pack_resume(ctx, tmp_path / "no_cache") == []
