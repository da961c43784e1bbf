#!/usr/bin/env python3
"""Build the embedded demo MRI set ``vicl_fast/data/demo_*.npz`` from real, offline-installable scans.

Sources (see /work/shared/notes/data.md and vicl_fast/data/LICENSE-DATA.txt):

* ICBM152 2009a symmetric T1 template, from the PyPI
  wheel of nilearn 0.14.1 (``nilearn/datasets/data/mni_icbm152_*``), fetched
  with ``pip download nilearn==0.14.1 --no-deps`` (nilearn is NOT a dependency).
* Colin27 (``ch2.nii.gz``, with skull), its skull-stripped version
  (``ch2bet.nii.gz``), the AAL and Brodmann atlases on its grid, from Debian's
  ``mricron-data`` (``apt-get install -y mricron-data``,
  ``/usr/share/mricron/templates``). The FSL-derived atlases of that package
  (Harvard-Oxford, JHU) are deliberately not used (non-commercial licence).

Both heads are in MNI space, so they are resampled (one interpolation each,
world -> world) onto ONE shared MNI-aligned grid: 96^3 voxels of 2.25 mm
(216 mm, enough for Colin27's whole head). Intensities are normalised on
each source's 0.02 / 0.98 percentiles (as the paper) and stored as uint8.

Labels per subject (uint8 maps on the same grid):

* ``brain`` (0/1) - ICBM152: non-zero voxels of its (already brain-extracted)
  T1 template, holes filled; Colin27: non-zero voxels of ch2bet, holes filled.
* ``head`` (0/1) - voxels inside the head (Colin27: ch2 above its background
  level, holes filled; ICBM152 = ``brain``).
* ``tissue`` - 1 GM, 2 WM, drawn by ONE rule on both heads: a 3-class
  multi-Otsu split (CSF < GM < WM) of the brain-extracted T1 on the demo grid,
  within the brain mask (a crude intensity segmentation). Colin27 has nothing
  better; ICBM152's own GM/WM probability maps are NOT used for it, because a
  model taught by one head's rule and scored against the other's measures how
  the rules disagree (on ICBM152 the maps' white matter is 6.2 % of the grid,
  its Otsu split 9.5 %; Dice 0.79 between the two).
* ``aal`` (1..116) and ``brodmann`` - atlases drawn on Colin27 in MNI space.
  On Colin27 they are native; on ICBM152 they are the same atlases read at the
  same MNI coordinates (standard practice for MNI-normalised brains, but not
  hand-drawn on that head), limited to its brain mask.

Run (about 20 s):  python tools/build_demo_data.py [--wheel nilearn-0.14.1-py3-none-any.whl]
The output is deterministic (no randomness; fixed zip timestamps).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

import nibabel as nib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vicl_fast.data.preprocess import normalize_intensity, resample  # noqa: E402

MRICRON = Path("/usr/share/mricron/templates")
NILEARN_DATA = "nilearn/datasets/data/"
ICBM = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}
GRID = 96
SPACING = 2.25
CENTRE_MM = np.array([0.0, -16.0, 17.0])  # centre of Colin27's head bounding box in MNI mm


def grid_affine(n: int = GRID, spacing: float = SPACING, centre: np.ndarray = CENTRE_MM) -> np.ndarray:
    """MNI-aligned (RAS) affine of the demo grid, voxel centres symmetric about ``centre``."""
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = centre - spacing * (n - 1) / 2.0
    return A


def to_grid(img: nib.Nifti1Image, order: int, antialias: bool = True) -> np.ndarray:
    """Resample a world-space image onto the demo grid (world -> world, one interpolation)."""
    dst = grid_affine()
    Q = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ dst  # grid voxel -> source voxel
    data = np.asanyarray(img.dataobj)
    return resample(data, Q, (GRID,) * 3, order=order, antialias=antialias and order == 1)


def _image_u8(img: nib.Nifti1Image) -> np.ndarray:
    norm, _ = normalize_intensity(np.asanyarray(img.dataobj))
    vol = resample(
        norm,
        np.linalg.inv(np.asarray(img.affine, np.float64)) @ grid_affine(),
        (GRID,) * 3,
        order=1,
        antialias=True,
    )
    return np.clip(np.rint(vol * 255.0), 0, 255).astype(np.uint8)


def _fill(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


def _wheel_member(wheel: zipfile.ZipFile, name: str) -> nib.Nifti1Image:
    """Read one gzipped NIfTI member of the nilearn wheel without unpacking it to disk."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(wheel.read(NILEARN_DATA + name)))


def build_icbm(wheel_path: Path, aal: np.ndarray, brodmann: np.ndarray) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel_path) as whl:
        t1 = _wheel_member(whl, ICBM["t1"])
    image = _image_u8(t1)
    brain = _fill(image > 2)
    return {
        "image": image,
        "brain": brain,
        "head": brain.copy(),
        "tissue": otsu_tissue(to_grid(t1, 1), brain),
        "aal": (aal * brain).astype(np.uint8),
        "brodmann": (brodmann * brain).astype(np.uint8),
        "has_skull": np.array(False),
    }


def otsu_tissue(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Tissue map (1 GM, 2 WM) of a brain-extracted T1 on the grid: 3-class multi-Otsu within ``brain``."""
    from skimage.filters import threshold_multiotsu  # build-time only

    inside = brain.astype(bool)
    t_low, t_high = threshold_multiotsu(t1[inside], classes=3)
    tissue = np.zeros(t1.shape, np.uint8)
    tissue[inside & (t1 > t_low) & (t1 <= t_high)] = 1
    tissue[inside & (t1 > t_high)] = 2
    return tissue


def build_colin(src: Path, aal: np.ndarray, brodmann: np.ndarray) -> dict[str, np.ndarray]:
    ch2 = nib.load(str(src / "ch2.nii.gz"))
    bet = nib.load(str(src / "ch2bet.nii.gz"))
    image = _image_u8(ch2)
    bet_g = to_grid(bet, 1)
    brain = _fill(bet_g > 0.5)
    head = _fill(ndimage.binary_closing(image > 20, iterations=2))
    return {
        "image": image,
        "brain": brain,
        "head": head,
        "tissue": otsu_tissue(bet_g, brain),
        "aal": aal,
        "brodmann": brodmann,
        "has_skull": np.array(True),
    }


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Deterministic compressed npz (fixed member timestamps), returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="nilearn-0.14.1-py3-none-any.whl (downloaded when omitted)")
    ap.add_argument("--mricron", type=Path, default=MRICRON, help="mricron-data templates folder")
    ap.add_argument("--out", type=Path, default=REPO / "vicl_fast" / "data")
    args = ap.parse_args(argv)
    src = args.mricron
    if not (src / "ch2.nii.gz").exists():
        sys.exit(f"{src}/ch2.nii.gz not found: run `apt-get install -y mricron-data` first")
    wheel = args.wheel
    tmpdir = None
    if wheel is None:
        tmpdir = tempfile.TemporaryDirectory()
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "nilearn==0.14.1", "--no-deps", "-d", tmpdir.name],
            check=True,
        )
        wheel = next(Path(tmpdir.name).glob("nilearn-0.14.1-*.whl"))

    aal = to_grid(nib.load(str(src / "aal.nii.gz")), 0).astype(np.uint8)
    brod = to_grid(nib.load(str(src / "brodmann.nii.gz")), 0).astype(np.uint8)
    names = [ln.split()[1] for ln in (src / "aal.nii.txt").read_text().splitlines() if ln.strip()]
    common = {"affine": grid_affine(), "aal_names": np.array(names)}

    subjects = {
        "icbm152": {
            **build_icbm(wheel, aal, brod),
            **common,
            "source": np.array(
                "ICBM152 2009a sym T1 (nilearn 0.14.1 wheel), GM/WM by 3-class Otsu; "
                "AAL/Brodmann read at MNI coordinates"
            ),
        },
        "colin27": {
            **build_colin(src, aal, brod),
            **common,
            "source": np.array("Colin27 ch2/ch2bet + AAL/Brodmann (Debian mricron-data)"),
        },
    }
    total = 0
    for name, arrays in subjects.items():
        path = args.out / f"demo_{name}.npz"
        digest = _save_npz(path, arrays)
        size = path.stat().st_size
        total += size
        counts = {k: int(arrays[k].astype(bool).sum()) for k in ("brain", "head")}
        print(
            f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {size / 1e6:.2f} MB "
            f"sha256 {digest[:16]} voxels {counts} tissue {np.bincount(arrays['tissue'].ravel()).tolist()}"
        )
    print(f"total {total / 1e6:.2f} MB")
    if tmpdir is not None:
        tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
