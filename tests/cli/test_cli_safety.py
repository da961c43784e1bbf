"""``vicl-fast predict`` robustness (issue 14, "command line and inference"): no silent wrong results,
no partial outputs, early output/memory checks, clean messages, honest progress.

Same tiny inputs and model as ``test_cli.py`` (the ``env`` fixture of this folder's conftest.py);
the CLI runs in-process.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nibabel as nib

from tests.cli._inputs import GRID, _ctx_args
from vicl_fast.cli import main
from vicl_fast.models.neuroverse3d import Neuroverse3D


def _args(env, out, *extra, target=None, task_ctx=None):
    return [
        "predict",
        "--target",
        str(target or env / "targets/t0.nii.gz"),
        *(task_ctx if task_ctx is not None else _ctx_args(env)),
        "--model",
        str(env / "tiny.safetensors"),
        "--out",
        str(out),
        *extra,
    ]


def _one_line_error(err: str) -> str:
    err = err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("vicl-fast: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _spy_model_calls(monkeypatch) -> list:
    calls: list = []
    orig = Neuroverse3D.predict

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(Neuroverse3D, "predict", spy)
    return calls


# ----------------------------------------------------------------------- silent wrong results
@pytest.mark.parametrize("which", ["zero target", "constant target", "zero context", "constant context"])
def test_constant_inputs_refused(env, tmp_path, capsys, which):
    ref = nib.load(str(env / "ctx/c0_image.nii.gz"))
    value = 0.0 if which.startswith("zero") else 37.5
    const = tmp_path / "in" / "const.nii.gz"
    const.parent.mkdir()
    nib.save(nib.Nifti1Image(np.full(ref.shape, value, np.float32), ref.affine), str(const))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if "target" in which:
        argv = _args(env, out_dir / "o.nii.gz", *GRID, target=const)
    else:
        ctx = ["--context", str(const), str(env / "ctx/c0_label.nii.gz"), *_ctx_args(env)[3:]]
        argv = _args(env, out_dir / "o.nii.gz", *GRID, task_ctx=ctx)
    rc = main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 4, line
    assert "constant" in line and str(const) in line
    assert list(out_dir.iterdir()) == []


def test_small_dynamic_range_and_label_maps_accepted(env, tmp_path, capsys):
    """Constant means max == min (or a std below 1e-4 of the range): a scan offset to 1000 with a
    range of 0.01 is a legitimate image."""
    t = nib.load(str(env / "targets/t0.nii.gz"))
    d = np.asarray(t.dataobj, np.float64)
    small = 1000.0 + (d - d.min()) / (d.max() - d.min()) * 0.01
    p = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(small.astype(np.float64), t.affine), str(p))
    rc = main(_args(env, tmp_path / "o.nii.gz", *GRID, target=p))
    assert rc == 0, capsys.readouterr().err


def test_empty_or_full_segmentation_warns(env, tmp_path, capsys):
    from vicl_fast.cli import predict

    rc = main(_args(env, tmp_path / "e.nii.gz", *GRID, "--threshold", "1e9"))
    err = capsys.readouterr().err
    assert rc == 0
    warn = [ln for ln in err.splitlines() if ln.startswith("vicl-fast: warning:")]
    assert len(warn) == 1 and "empty" in warn[0], err
    summary = predict(_args(env, tmp_path / "f.nii.gz", *GRID, "--threshold=-1e9")[1:])
    assert len(summary["warnings"]) == 1 and "covers" in summary["warnings"][0]
    assert summary["outputs"] == [str(tmp_path / "f.nii.gz")]
    assert summary["warnings"][0] in capsys.readouterr().err  # also on stderr
    ok = predict(_args(env, tmp_path / "g.nii.gz", *GRID)[1:])
    assert "warnings" in ok and "seconds" in ok and ok["device"] == "cpu"


# ----------------------------------------------------------------------------- partial output
def _failing_preview(exc):
    def save_preview(path, *a, **k):
        Path(path).write_bytes(b"half a png")  # a writer that dies half-way
        raise exc

    return save_preview


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (OSError(28, "No space left"), 8)])
def test_failing_preview_leaves_nothing(env, tmp_path, capsys, monkeypatch, exc, code):
    import vicl_fast.preview

    monkeypatch.setattr(vicl_fast.preview, "save_preview", _failing_preview(exc))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(_args(env, out_dir / "o.nii.gz", *GRID, "--preview"))
    err = capsys.readouterr().err
    assert rc == code, err
    assert list(out_dir.iterdir()) == []  # no NIfTI, no PNG, no hidden staging folder


def test_batch_failure_on_second_target_leaves_nothing(env, tmp_path, capsys, monkeypatch):
    import vicl_fast.preview

    real = vicl_fast.preview.save_preview
    seen = []

    def second_fails(path, *a, **k):
        seen.append(path)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(vicl_fast.preview, "save_preview", second_fails)
    out = tmp_path / "preds"  # created only when everything succeeded
    rc = main(["predict", "--target", str(env / "targets"), "--contexts", str(env / "ctx"),
               "--model", str(env / "tiny.safetensors"), "--out", str(out), "--preview", *GRID])
    assert rc == 130 and len(seen) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output_noticed_before_compute(env, tmp_path, capsys, monkeypatch):
    calls = _spy_model_calls(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:  # root ignores the mode: emulate what the kernel says to a user
        for name in ("mkdtemp", "mkstemp"):
            real = getattr(tempfile, name)

            def refuse(*a, _real=real, **k):
                if Path(k.get("dir") or ".").resolve() == ro.resolve():
                    raise PermissionError(13, "Permission denied")
                return _real(*a, **k)

            monkeypatch.setattr(tempfile, name, refuse)
    try:
        rc = main(_args(env, ro / "o.nii.gz", *GRID))
        line = _one_line_error(capsys.readouterr().err)
        assert rc == 8 and str(ro) in line and "not writable" in line
        assert calls == []  # refused before the model ran
        pv = tmp_path / "pv"
        pv.mkdir()
        rc = main(_args(env, pv / "o.nii.gz", *GRID, "--preview", str(ro / "p.png")))
        assert rc == 8 and calls == [] and list(pv.iterdir()) == []
    finally:
        os.chmod(ro, 0o755)


# ----------------------------------------------------------------------------- out of memory
def test_memory_estimate_refuses_before_compute(env, tmp_path, capsys, monkeypatch):
    import vicl_fast.apsp

    calls = _spy_model_calls(monkeypatch)
    monkeypatch.setattr(vicl_fast.apsp, "free_memory_bytes", lambda device: 64 << 10)  # 64 KiB
    rc = main(_args(env, tmp_path / "o.nii.gz", *GRID))
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 10, line
    assert "out of memory" in line and "32x32x32" in line and re.search(r"\d+(\.\d+)? [KMG]i?B", line)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_mini_context_auto_from_estimate(env, tmp_path, capsys, monkeypatch):
    """Memory for one context per mini-context (not two): auto picks 1, an explicit 2 is refused."""
    import vicl_fast.apsp
    from vicl_fast.cli import predict

    mb = 1 << 20
    monkeypatch.setattr(vicl_fast.apsp, "estimate_memory", lambda *a, **k: (100 * mb, 100 * mb))
    monkeypatch.setattr(vicl_fast.apsp, "free_memory_bytes", lambda device: 250 * mb)
    sizes = []
    orig = Neuroverse3D.encode_contexts

    def spy(self, ci, *a, **k):
        sizes.append(ci.shape[1])
        return orig(self, ci, *a, **k)

    monkeypatch.setattr(Neuroverse3D, "encode_contexts", spy)
    summary = predict(_args(env, tmp_path / "o.nii.gz", *GRID)[1:])
    assert summary["mini_context"] == 1 and sizes == [1, 1]
    rc = main(_args(env, tmp_path / "p.nii.gz", *GRID, "--mini-context", "2"))
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 10 and "--mini-context 1" in line and not (tmp_path / "p.nii.gz").exists()


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                     "you tried to allocate 17179869184 bytes."),
    ],
    ids=["MemoryError", "torch.OutOfMemoryError", "cpu-allocator"],
)
def test_out_of_memory_in_model_exits_10(env, tmp_path, capsys, monkeypatch, exc):
    def boom(self, *a, **k):
        raise exc

    monkeypatch.setattr(Neuroverse3D, "predict", boom)
    rc = main(_args(env, tmp_path / "o.nii.gz", *GRID, "--preview"))
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 10, line
    assert "out of memory" in line and "--mini-context 1" in line and "allocate" not in line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- messages
class _Opaque:
    """A pickled Python object inside a checkpoint."""


def test_trust_checkpoint_refusal_is_one_clean_sentence(env, tmp_path, capsys):
    from vicl_fast.cli import load_model
    from vicl_fast.models.official import to_official_state_dict

    model = load_model(env / "tiny.safetensors")
    bad = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": to_official_state_dict(model, lightning_prefix=True),
                "hyper_parameters": _Opaque()}, bad)
    rc = main(["predict", "--target", str(env / "targets/t0.nii.gz"), *_ctx_args(env), "--model", str(bad),
               "--out", str(tmp_path / "o.nii.gz"), *GRID])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 7 and "--trust-checkpoint" in line and str(bad) in line
    assert "\x1b" not in line and len(line) < 300 and line.count(". ") <= 1, line


@pytest.mark.parametrize("shape,needle", [((20, 24), "2D image"), ((20, 24, 1), "single slice")])
def test_2d_input_message(env, tmp_path, capsys, shape, needle):
    p = tmp_path / "in" / "slice.nii.gz"
    p.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4)), str(p))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(_args(env, out_dir / "o.nii.gz", *GRID, target=p))
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 4 and needle in line and "4D" not in line and "3D volume" in line, line
    assert list(out_dir.iterdir()) == []


def test_train_check_refuses_unknown_model(tmp_path, capsys):
    import yaml

    from tests.training._toy import _nv_raw, _write_dataset
    from vicl_fast.training import main as train_main

    raw = _nv_raw(_write_dataset(tmp_path / "toy", n=3), tmp_path / "o")
    raw["model"]["name"] = "neuroverse3d_tinyy"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc = train_main(["--config", str(cfg), "--check"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown model 'neuroverse3d_tinyy'" in err and "neuroverse3d_tiny" in err
    assert len(err.strip().splitlines()) == 1


def test_best_checkpoint_is_an_independent_copy(tmp_path):
    from vicl_fast.models import create_model
    from vicl_fast.training.checkpointing import (
        load_training_checkpoint,
        save_training_checkpoint,
        update_best,
    )

    model = create_model("neuroverse3d_tiny")
    ck = save_training_checkpoint(tmp_path, 3, model, model_name="neuroverse3d_tiny", model_kwargs={},
                                  states={"x": torch.ones(2)})
    best = update_best(tmp_path, ck)
    for f in ck.iterdir():
        assert os.stat(f).st_ino != os.stat(best / f.name).st_ino and os.stat(f).st_nlink == 1
    with open(ck / "model.safetensors", "r+b") as fh:  # damage the step checkpoint in place
        fh.seek(os.path.getsize(ck / "model.safetensors") // 2)
        fh.write(b"\xff\xff\xff\xff")
    load_training_checkpoint(best)  # still intact


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(env, tmp_path, umask):
    """predict's NIfTI and PNG, write_demo_nifti, training checkpoints and best/, and exports."""
    from vicl_fast.checkpoint import save_checkpoint
    from vicl_fast.data.demo_data import load_demo_subjects, write_demo_nifti
    from vicl_fast.models import create_model
    from vicl_fast.training.checkpointing import save_training_checkpoint, update_best

    want = 0o666 & ~umask
    old = os.umask(umask)
    try:
        out = tmp_path / "o.nii.gz"
        assert main(_args(env, out, *GRID, "--preview")) == 0
        pairs = write_demo_nifti(tmp_path / "demo", subjects=load_demo_subjects(names=["colin27"], size=32))
        ck = save_training_checkpoint(tmp_path / "ck", 1, create_model("neuroverse3d_tiny"),
                                      model_name="neuroverse3d_tiny", model_kwargs={}, states={})
        best = update_best(tmp_path / "ck", ck)
        save_checkpoint(create_model("neuroverse3d_tiny"), tmp_path / "export.safetensors")
    finally:
        os.umask(old)
    files = [out, tmp_path / "o.png", *[p for pair in pairs for p in pair], *ck.iterdir(), *best.iterdir(),
             tmp_path / "export.safetensors"]
    modes = {str(f): oct(os.stat(f).st_mode & 0o777) for f in files}
    assert set(modes.values()) == {oct(want)}, modes


# ----------------------------------------------------------------------------------- progress
class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_not_a_terminal_device_and_timing(env, tmp_path, capsys):
    rc = main(_args(env, tmp_path / "o.nii.gz", "--grid", "32", "--spacing", "2.5", "--device", "auto"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "\r" not in err and "%|" not in err  # no bar in a log file
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert re.search(rf"^vicl-fast: device {dev}\S* \(auto", err, re.M), err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"vicl-fast: done: 1 output in \d+\.\d+ s on {dev}", last), last


def test_progress_bar_moves_within_a_binary_pass(env, tmp_path, monkeypatch):
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    rc = main(_args(env, tmp_path / "o.nii.gz", "--grid", "32", "--spacing", "2.5", "--device", "cpu",
                    "--mini-context", "1"))
    err = tty.getvalue()
    assert rc == 0, err
    pcts = {int(m) for m in re.findall(r"(\d+)%\|", err)}
    assert pcts & set(range(1, 100)), err  # not only 0% then 100%
