"""Fixtures of the command-line tests.

``env``: a folder with ``neuroverse3d_tiny`` (random weights, ``tiny.safetensors``), two
contexts (``ctx/c{0,1}_{image,label,multi}.nii.gz``) and two targets (``targets/t{0,1}.nii.gz``),
module-scoped (one per test module that uses it). test_inference.py defines its own ``env``,
which takes precedence there.
"""
from __future__ import annotations

import nibabel as nib
import pytest
import torch

from tests.cli._inputs import _affine, _case
from vicl_fast.checkpoint import save_checkpoint
from vicl_fast.models import create_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = create_model("neuroverse3d_tiny")
    save_checkpoint(model, d / "tiny.safetensors")
    ctx = d / "ctx"
    ctx.mkdir()
    for i, (shape, zooms) in enumerate((((22, 24, 20), (2.0, 2.0, 2.5)), ((20, 26, 18), (2.2, 1.8, 3.0)))):
        im, lb = _case(shape, _affine(zooms, 10.0 * i), seed=i)
        nib.save(im, str(ctx / f"c{i}_image.nii.gz"))
        nib.save(lb, str(ctx / f"c{i}_label.nii.gz"))
        _, lb2 = _case(shape, _affine(zooms, 10.0 * i), seed=i, labels=(1, 2))
        nib.save(lb2, str(ctx / f"c{i}_multi.nii.gz"))
    tgt = d / "targets"
    tgt.mkdir()
    for i in range(2):
        im, _ = _case((18 + 2 * i, 22, 16), _affine((2.4, 2.0, 3.2), -8.0 + 5 * i), seed=10 + i)
        nib.save(im, str(tgt / f"t{i}.nii.gz"))
    return d
