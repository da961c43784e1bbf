"""``vicl-fast predict`` on tiny inputs: outputs on the target grid, every bad input -> message + exit code.

The model is ``neuroverse3d_tiny`` with random weights saved by :mod:`vicl_fast.checkpoint`
(the real model code, not a stand-in). The CLI runs in-process (``main([...])``); one test
runs the installed console script.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nibabel as nib

from tests.cli._inputs import GRID, _ctx_args
from vicl_fast.cli import load_model, main
from vicl_fast.data.preprocess import preprocess_image, preprocess_label, to_original


def _manual(env, task="seg", label="label", value=1):
    """The CLI's pipeline written out by hand: preprocess, model, map back."""
    model = load_model(env / "tiny.safetensors")
    cis, cos = [], []
    for i in range(2):
        im, lb = (nib.load(str(env / f"ctx/c{i}_{k}.nii.gz")) for k in ("image", label))
        v, m = preprocess_image(im, spacing=2.5, grid=32)
        cis.append(v)
        cos.append((preprocess_label(lb, mapping=m)[0] == value).astype(np.float32))
    timg = nib.load(str(env / "targets/t0.nii.gz"))
    tv, tm = preprocess_image(timg, spacing=2.5, grid=32)
    y = model.predict(
        torch.from_numpy(tv)[None, None],
        torch.from_numpy(np.stack(cis))[None, :, None],
        torch.from_numpy(np.stack(cos))[None, :, None],
        l="auto",
    )
    return timg, tm, y[0, 0].numpy()


def test_predict_seg_matches_manual_pipeline(env, tmp_path, capsys):
    timg, tm, pred = _manual(env)
    thr = float(np.median(pred[tm.block]))  # random weights: pick a threshold that splits the volume
    out = tmp_path / "seg.nii.gz"
    rc = main(
        [
            "predict",
            "--target",
            str(env / "targets/t0.nii.gz"),
            *_ctx_args(env),
            "--model",
            str(env / "tiny.safetensors"),
            "--out",
            str(out),
            "--threshold",
            str(thr),
            "--preview",
            str(tmp_path / "p.png"),
            *GRID,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = nib.load(str(out))
    assert res.shape == timg.shape and np.allclose(res.affine, timg.affine, atol=1e-6)
    assert res.get_data_dtype() == np.uint8
    got = np.asarray(res.dataobj)
    # The probability goes back onto the target's grid (cubic B-spline), then the threshold (outside the
    # fitted box: 0).
    ref = (to_original(pred, tm, kind="probability") > thr).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    assert 0 < got.mean() < 1
    png = Image.open(tmp_path / "p.png")
    assert png.format == "PNG" and png.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "seg.nii.gz"]


def test_predict_gen_float_output(env, tmp_path):
    out = tmp_path / "gen.nii.gz"
    rc = main(
        [
            "predict",
            "--target",
            str(env / "targets/t0.nii.gz"),
            "--task",
            "gen",
            *_ctx_args(env, "image"),
            "--model",
            str(env / "tiny.safetensors"),
            "--out",
            str(out),
            "--mini-context",
            "1",
            *GRID,
        ]
    )
    assert rc == 0
    res = nib.load(str(out))
    tgt = nib.load(str(env / "targets/t0.nii.gz"))
    assert res.shape == tgt.shape and np.allclose(res.affine, tgt.affine, atol=1e-6)
    assert res.get_data_dtype() == np.float32 and np.isfinite(np.asarray(res.dataobj)).all()


def test_multilabel_batched_equals_per_label(env, tmp_path):
    outs = []
    for lb in ("1", "0"):
        out = tmp_path / f"m{lb}.nii.gz"
        rc = main(
            [
                "predict",
                "--target",
                str(env / "targets/t0.nii.gz"),
                *_ctx_args(env, "multi"),
                "--labels",
                "all",
                "--label-batch",
                lb,
                "--threshold=-1e9",
                "--model",
                str(env / "tiny.safetensors"),
                "--out",
                str(out),
                *GRID,
            ]
        )
        assert rc == 0
        outs.append(np.asarray(nib.load(str(out)).dataobj))
    # Batched (B = 2 labels) and per-label passes differ only by float rounding (conv reduction
    # order), which can flip the argmax where the random model scores both labels alike.
    assert (outs[0] == outs[1]).mean() > 0.995
    assert set(np.unique(outs[0])) <= {1, 2}  # threshold -inf: argmax over labels everywhere


def test_batch_mode_folder(env, tmp_path):
    out = tmp_path / "preds"
    rc = main(
        [
            "predict",
            "--target",
            str(env / "targets"),
            "--contexts",
            str(env / "ctx"),
            "--model",
            str(env / "tiny.safetensors"),
            "--out",
            str(out),
            "--preview",
            *GRID,
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["t0.nii.gz", "t0.png", "t1.nii.gz", "t1.png"]
    for i in range(2):
        assert nib.load(str(out / f"t{i}.nii.gz")).shape == nib.load(str(env / f"targets/t{i}.nii.gz")).shape


class _Opaque:
    """A pickled Python object inside a checkpoint (what Lightning hparams can hold)."""


def test_authors_checkpoint_format(env, tmp_path, capsys):
    """A Lightning-style file (``state_dict`` with ``net.`` keys + ``hyper_parameters``) predicts exactly
    as our safetensors copy of the same weights; one holding pickled objects is refused (exit 7)."""
    from vicl_fast.models.official import to_official_state_dict

    model = load_model(env / "tiny.safetensors")
    ckpt = tmp_path / "authors.ckpt"
    torch.save(
        {
            "state_dict": to_official_state_dict(model, lightning_prefix=True),
            "hyper_parameters": {"nb_inner_channels": [4, 8, 16, 32, 64], "nb_conv_layers_per_stage": 2},
        },
        ckpt,
    )
    outs = []
    for name, m in (("a", ckpt), ("b", env / "tiny.safetensors")):
        out = tmp_path / f"{name}.nii.gz"
        assert (
            main(
                [
                    "predict",
                    "--target",
                    str(env / "targets/t0.nii.gz"),
                    "--task",
                    "gen",
                    *_ctx_args(env, "image"),
                    "--model",
                    str(m),
                    "--out",
                    str(out),
                    *GRID,
                ]
            )
            == 0
        )
        outs.append(np.asarray(nib.load(str(out)).dataobj))
    np.testing.assert_array_equal(outs[0], outs[1])
    bad = tmp_path / "pickled.ckpt"
    torch.save(
        {"state_dict": to_official_state_dict(model, lightning_prefix=True), "hyper_parameters": _Opaque()},
        bad,
    )
    capsys.readouterr()
    rc = main(
        [
            "predict",
            "--target",
            str(env / "targets/t0.nii.gz"),
            *_ctx_args(env),
            "--model",
            str(bad),
            "--out",
            str(tmp_path / "c.nii.gz"),
            *GRID,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 7 and "--trust-checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.nii.gz").exists()


def _write(path: Path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _bad_cases(env: Path, tmp: Path):
    t0, c0i, c0l = (
        str(env / "targets/t0.nii.gz"),
        str(env / "ctx/c0_image.nii.gz"),
        str(env / "ctx/c0_label.nii.gz"),
    )
    c0 = nib.load(c0i)
    shp, A = c0.shape, c0.affine
    notnii = tmp / "junk.nii.gz"
    notnii.write_text("hello")
    empty = np.zeros(shp, np.uint8)
    multi = np.asarray(nib.load(c0l).dataobj).copy()
    multi[0, 0, 0] = 7
    model = str(env / "tiny.safetensors")
    txt = tmp / "model.safetensors"
    txt.write_text("not weights")
    csv_empty = tmp / "none.csv"
    csv_empty.write_text("image,label\n")
    return {
        "missing target": (["--target", str(tmp / "nope.nii.gz"), "--context", c0i, c0l], 3, "not found"),
        "unreadable target": (["--target", str(notnii), "--context", c0i, c0l], 3, "cannot read"),
        "missing context label": (["--target", t0, "--context", c0i, str(tmp / "x.nii.gz")], 3, "not found"),
        "shape mismatch": (
            ["--target", t0, "--context", c0i, _write(tmp / "s.nii.gz", np.ones((5, 5, 5), np.uint8), A)],
            4,
            "shape",
        ),
        "affine mismatch": (
            [
                "--target",
                t0,
                "--context",
                c0i,
                _write(tmp / "a.nii.gz", np.asarray(nib.load(c0l).dataobj), A @ np.diag([1, 1, 1.5, 1])),
            ],
            4,
            "affines",
        ),
        "4D target": (
            ["--target", _write(tmp / "4d.nii.gz", np.ones((6, 6, 6, 2), np.float32)), "--context", c0i, c0l],
            4,
            "3D",
        ),
        "empty label": (["--target", t0, "--context", c0i, _write(tmp / "e.nii.gz", empty, A)], 5, "empty"),
        "non-binary label": (
            ["--target", t0, "--context", c0i, _write(tmp / "m.nii.gz", multi, A)],
            5,
            "binary",
        ),
        "float label": (
            ["--target", t0, "--context", c0i, _write(tmp / "f.nii.gz", np.full(shp, 0.5, np.float32), A)],
            5,
            "non-integer",
        ),
        "absent label value": (["--target", t0, "--context", c0i, c0l, "--labels", "1,3"], 5, "absent"),
        "label absent from one context (all)": (
            ["--target", t0, "--context", c0i, c0l, "--context", c0i, str(env / "ctx/c0_multi.nii.gz"),
             "--labels", "all"],
            5,
            "lacks label(s) [2]",
        ),
        "zero contexts": (["--target", t0], 6, "no context"),
        "zero contexts (csv)": (["--target", t0, "--contexts", str(csv_empty)], 6, "no context"),
        "model not a checkpoint": (
            ["--target", t0, "--context", c0i, c0l, "--model", str(txt)],
            7,
            "not a checkpoint",
        ),
        "missing model": (
            ["--target", t0, "--context", c0i, c0l, "--model", str(tmp / "m.ckpt")],
            7,
            "not found",
        ),
        "output folder missing": (
            ["--target", t0, "--context", c0i, c0l, "--out", str(tmp / "no/dir/o.nii.gz")],
            8,
            "does not exist",
        ),
        "output overwrites input": (["--target", t0, "--context", c0i, c0l, "--out", t0], 8, "overwrite"),
        "preview folder missing": (
            ["--target", t0, "--context", c0i, c0l, "--preview", str(tmp / "no/dir/p.png")],
            8,
            "--preview folder",
        ),
        "bad grid": (["--target", t0, "--context", c0i, c0l, "--grid", "30"], 2, "multiples of 16"),
        "bad option": (["--target", t0, "--context", c0i, c0l, "--mini-context", "zero"], 2, "mini-context"),
        "bad skull option": (["--target", t0, "--context", c0i, c0l, "--skull-strip", "yes"], 2, "--skull-strip"),
    }, model


@pytest.mark.parametrize(
    "case",
    [
        "missing target",
        "unreadable target",
        "missing context label",
        "shape mismatch",
        "affine mismatch",
        "4D target",
        "empty label",
        "non-binary label",
        "float label",
        "absent label value",
        "label absent from one context (all)",
        "zero contexts",
        "zero contexts (csv)",
        "model not a checkpoint",
        "missing model",
        "output folder missing",
        "output overwrites input",
        "preview folder missing",
        "bad grid",
        "bad option",
        "bad skull option",
    ],
)
def test_bad_input(env, tmp_path, capsys, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases, model = _bad_cases(env, inputs)
    args, code, needle = cases[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    full = ["predict", *GRID, *args]
    if "--model" not in args:
        full += ["--model", model]
    if "--out" not in args:
        full += ["--out", str(out_dir / "o.nii.gz")]
    before = sorted(p.name for p in inputs.iterdir())
    rc = main(full)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.startswith("vicl-fast: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert needle.lower() in err.lower()
    assert list(out_dir.iterdir()) == []  # nothing written, no temp file
    assert sorted(p.name for p in inputs.iterdir()) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable(env, tmp_path, capsys):
    rc = main(
        [
            "predict",
            "--target",
            str(env / "targets/t0.nii.gz"),
            *_ctx_args(env),
            "--model",
            str(env / "tiny.safetensors"),
            "--out",
            str(tmp_path / "o.nii.gz"),
            "--grid",
            "32",
            "--device",
            "cuda",
        ]
    )
    assert rc == 9 and "CUDA is not available" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_console_script(env, tmp_path):
    import os

    import vicl_fast

    exe = shutil.which("vicl-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "vicl_fast.cli"]
    # The package under test first on the path: a stale editable install elsewhere must not win.
    root = str(Path(vicl_fast.__file__).resolve().parents[1])
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    info = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=120, env=penv)
    assert info.returncode == 0 and "cpp" in info.stdout
    bad = subprocess.run(
        [
            *cmd,
            "predict",
            "--target",
            str(tmp_path / "none.nii.gz"),
            *_ctx_args(env),
            "--model",
            str(env / "tiny.safetensors"),
            "--out",
            str(tmp_path / "o.nii.gz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=penv,
    )
    assert bad.returncode == 3
    assert bad.stderr.strip().startswith("vicl-fast: error: target file not found")
    assert "Traceback" not in bad.stderr and list(tmp_path.iterdir()) == []


def _fake_dicom_target(folder: Path, src: Path):
    """Write the NIfTI ``src`` as axial DICOM-like slices; return (folder, canonical NIfTI, pydicom stand-in).

    pydicom is optional and not installed here: ``dcmread`` of the stand-in unpickles the attributes.
    """
    import pickle
    import types

    img = nib.as_closest_canonical(nib.load(str(src)))
    vol = np.asarray(img.dataobj)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    zoom = np.linalg.norm(img.affine[:3, :3], axis=0)
    folder.mkdir()
    for k in range(vol.shape[2]):
        attrs = {
            "ImagePositionPatient": list((lps @ [0, 0, k, 1.0])[:3]),
            "ImageOrientationPatient": list(lps[:3, 0] / zoom[0]) + list(lps[:3, 1] / zoom[1]),
            "PixelSpacing": [zoom[1], zoom[0]],
            "Rows": vol.shape[1],
            "Columns": vol.shape[0],
            "SeriesInstanceUID": "1.2",
            "PixelData": b"",
            "pixel_array": vol[:, :, k].T.copy(),
        }
        (folder / f"{k:03d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + pickle.dumps(attrs))
    stub = types.ModuleType("pydicom")
    stub.dcmread = lambda path, **_: types.SimpleNamespace(**pickle.loads(Path(path).read_bytes()[132:]))
    return folder, img, stub


def test_dicom_target(env, tmp_path, capsys, monkeypatch):
    """A DICOM series folder as --target: without pydicom a clear exit 3 and nothing written; with it,
    the output lies on the series' grid and equals the prediction for the same scan given as NIfTI."""
    folder, canon, stub = _fake_dicom_target(tmp_path / "dicom", env / "targets/t0.nii.gz")
    out, ref_out = tmp_path / "o.nii.gz", tmp_path / "r.nii.gz"
    model = str(env / "tiny.safetensors")
    base = ["predict", *_ctx_args(env, "image"), "--task", "gen", "--model", model, *GRID]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    rc = main([*base, "--target", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3 and "pip install pydicom" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "pydicom", stub)
    assert main([*base, "--target", str(folder), "--out", str(out)]) == 0
    res = nib.load(str(out))
    assert res.shape == canon.shape and np.allclose(res.affine, canon.affine, atol=1e-5)
    nib.save(canon, str(tmp_path / "ref.nii.gz"))
    assert main([*base, "--target", str(tmp_path / "ref.nii.gz"), "--out", str(ref_out)]) == 0
    np.testing.assert_allclose(np.asarray(res.dataobj), np.asarray(nib.load(str(ref_out)).dataobj), atol=1e-6)


def test_train_subcommand_routes_to_trainer(tmp_path, capsys):
    from vicl_fast.cli import main

    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_preview_orientation_and_overlay(tmp_path):
    """Neurological display whatever the storage order: a label at the subject's left-superior shows
    top-left in the coronal tile, and an LPS-stored copy renders the same PNG."""
    from vicl_fast.preview import save_preview

    shape = (20, 24, 16)
    img = np.full(shape, 0.2, np.float32)
    img[::4] += 0.5  # some structure for the grey window
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 10:14, 11:15] = 1  # low x = subject left, high z = superior
    A = np.eye(4)
    save_preview(tmp_path / "ras.png", nib.Nifti1Image(img, A), labels=lab)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(shape[:2]) - 1
    lps_img = nib.Nifti1Image(img[::-1, ::-1].copy(), A @ flip)
    save_preview(tmp_path / "lps.png", lps_img, labels=lab[::-1, ::-1].copy())
    ras = np.asarray(Image.open(tmp_path / "ras.png").convert("RGB")).astype(int)
    np.testing.assert_array_equal(ras, np.asarray(Image.open(tmp_path / "lps.png").convert("RGB")))
    # Tiles: sagittal (24 mm wide), coronal (20), axial (20), 192 px high (16 mm -> 12 px/mm), 4 px gaps.
    assert ras.shape == (192, 288 + 4 + 240 + 4 + 160, 3)
    cor = ras[:, 292 : 292 + 240]
    coloured = np.argwhere((cor.max(-1) - cor.min(-1)) > 30)
    assert len(coloured)
    (r0, c0), (r1, c1) = coloured.min(0), coloured.max(0)
    assert r1 < 96 and c1 < 120  # top-left quadrant
    assert r0 == pytest.approx(12, abs=2) and c0 == pytest.approx(24, abs=2)  # z 14 -> row 1, x 2 -> col 2
