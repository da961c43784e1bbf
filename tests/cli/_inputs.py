"""Tiny NIfTI inputs shared by the ``vicl-fast predict`` tests (test_cli.py, test_cli_safety.py).

Plain helpers (not fixtures): the ``env`` fixture that writes them to disk is in this
folder's conftest.py. Imported as ``from tests.cli._inputs import ...``.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

GRID = ["--grid", "32", "--spacing", "2.5", "--device", "cpu", "-q"]


def _affine(zooms, angle_deg=12.0, origin=(-30.0, -35.0, -20.0)):
    a = np.deg2rad(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(zooms)
    A[:3, 3] = origin
    return A


def _case(shape, A, seed, labels=(1,)):
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float64)
    c = (np.asarray(shape) - 1)[:, None, None, None] / 2
    r = np.sqrt(((idx - c) ** 2).sum(0))  # ball in voxel units
    img = (100 * np.exp(-r / 8) + rng.normal(0, 2, shape)).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[r < 5] = labels[0]
    if len(labels) > 1:
        lab[(r >= 5) & (r < 7)] = labels[1]
    return nib.Nifti1Image(img, A), nib.Nifti1Image(lab, A)


def _ctx_args(env, label="label"):
    return [
        "--context",
        str(env / "ctx/c0_image.nii.gz"),
        str(env / f"ctx/c0_{label}.nii.gz"),
        "--context",
        str(env / "ctx/c1_image.nii.gz"),
        str(env / f"ctx/c1_{label}.nii.gz"),
    ]
