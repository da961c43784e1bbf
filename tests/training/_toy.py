"""A toy NIfTI dataset and the smallest training configurations on it (Neuroverse3D, RandP).

Plain helpers shared by training/test_training.py and cli/test_cli_safety.py (``vicl_fast.training``
``--check``); imported as ``from tests.training._toy import ...``.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def _write_dataset(root: Path, n: int = 5, shape=(20, 22, 18), seed: int = 0) -> Path:
    """Synthetic 'heads': smooth blobs (image) and two nested label classes, 1.2 mm voxels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    aff = np.diag([1.2, 1.2, 1.2, 1.0])
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(n):
        r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2) * rng.uniform(0.9, 1.1)
        img = np.clip(1.2 - r, 0, 1) + 0.1 * ndimage.gaussian_filter(rng.standard_normal(shape), 2)
        lab = (r < 0.7).astype(np.int16) + (r < 0.35).astype(np.int16)
        nib.save(nib.Nifti1Image((img * 1000).astype(np.float32), aff), str(root / "images" / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labels" / f"s{i}.nii.gz"))
    return root


def _nv_raw(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name": "neuroverse3d_tiny"},
        "data": {"datasets": [{"name": "toy", "path": str(data)}], "grid": [16, 16, 16],
                 "tasks": [{"name": "segmentation", "rate": 2, "weight": 50},
                           {"name": "gaussian_noise", "rate": 1, "weight": 1}],
                 "context_phases": [{"from_step": 0, "min": 1, "max": 3, "mini_context": 2}],
                 "val_fraction": 0.2, "val_episodes": 2, "val_context_size": 2},
        "optim": {"lr": 1e-3, "plateau_patience": 0},
        "train": {"steps": 10, "device": "cpu", "out_dir": str(out), "progress": False, "tensorboard": False,
                  "val_every": 100, "ckpt_every": 100, "log_every": 1, **train},
    }


def _randp_raw(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name": "randp_vit_tiny"},
        "data": {"datasets": [{"name": "toy", "path": str(data)}], "grid": [32, 32],
                 "val_fraction": 0.2, "val_episodes": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 10, "batch_size": 2, "device": "cpu", "out_dir": str(out), "progress": False,
                  "tensorboard": False, "val_every": 100, "ckpt_every": 100, "log_every": 1, **train},
    }
