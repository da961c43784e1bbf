"""NIfTI input/output with validation, and atomic writes.

Every reader check raises an :class:`InputError` subclass whose message names
the file and the fix; the CLI turns each subclass into a one-line message and
its documented exit code (see :mod:`vicl_fast.cli`). Every writer goes through
:func:`atomic_write`: the bytes land in a temporary file in the destination
folder and are moved into place with :func:`os.replace`, so a failure (bad
data, full disk, Ctrl-C) never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

import nibabel as nib

__all__ = [
    "InputError",
    "UnreadableFileError",
    "BadImageError",
    "BadLabelError",
    "NoContextError",
    "BadModelError",
    "OutputError",
    "DeviceError",
    "is_nifti_path",
    "nifti_stem",
    "load_nifti",
    "check_same_grid",
    "atomic_write",
    "save_nifti",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """A problem with the user's input; ``exit_code`` is what the CLI returns for it."""

    exit_code = 4


class UnreadableFileError(InputError):
    """A file is missing, unreadable, or not in the expected format (exit code 3)."""

    exit_code = 3


class BadImageError(InputError):
    """An image has the wrong dimensionality, or an image/label pair disagrees (exit code 4)."""

    exit_code = 4


class BadLabelError(InputError):
    """A label map is empty, non-binary for a binary task, or non-integer (exit code 5)."""

    exit_code = 5


class NoContextError(InputError):
    """No context (example) pairs were given (exit code 6)."""

    exit_code = 6


class BadModelError(InputError):
    """The model file is missing or not a checkpoint this package can load (exit code 7)."""

    exit_code = 7


class OutputError(InputError):
    """An output path cannot be written, or would overwrite an input (exit code 8)."""

    exit_code = 8


class DeviceError(InputError):
    """The requested device is not available (exit code 9)."""

    exit_code = 9


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (``"case_01.nii.gz" -> "case_01"``)."""
    name = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def load_nifti(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Read a 3D NIfTI volume and check it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        what: how the file is named in error messages (``"target"``, ``"context label 2"``).

    Returns:
        A ``nib.Nifti1Image`` whose data is 3D, shape ``(X, Y, Z)``. A 4D file whose
        extra dimensions are all 1 (``(X, Y, Z, 1)``) is accepted and squeezed.

    Raises:
        UnreadableFileError: missing, a folder, unreadable, or not a NIfTI file.
        BadImageError: not 3D, or with NaN/inf voxels, or a non-invertible affine.
    """
    p = Path(path)
    if not p.exists():
        raise UnreadableFileError(f"{what} file not found: {p}")
    if p.is_dir():
        raise UnreadableFileError(f"{what} path is a folder, expected a .nii/.nii.gz file: {p}")
    if not is_nifti_path(p):
        raise UnreadableFileError(f"{what} file {p} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise UnreadableFileError(f"cannot read {what} file {p}: {type(exc).__name__}: {exc}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableFileError(f"{what} file {p} is not a NIfTI-1/2 image")
    shape = data.shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        data = data.reshape(shape[:3])
    elif len(shape) != 3:
        raise BadImageError(
            f"{what} {p} has shape {tuple(shape)}: expected a 3D volume; split 4D series "
            "into 3D files first (e.g. `fslsplit` or nibabel.four_to_three)"
        )
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise BadImageError(f"{what} {p} contains NaN or infinite voxels; clean it before use")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadImageError(f"{what} {p} has a singular or non-finite affine; fix its header")
    if data is not img.dataobj and data.shape != img.shape:
        img = nib.Nifti1Image(data, img.affine, header=img.header)
    return img


def check_same_grid(
    a: nib.Nifti1Image, b: nib.Nifti1Image, name_a: str, name_b: str, atol: float = 1e-3
) -> None:
    """Raise :class:`BadImageError` unless ``a`` and ``b`` share shape and affine (``atol`` in mm)."""
    if a.shape[:3] != b.shape[:3]:
        raise BadImageError(
            f"{name_a} has shape {tuple(a.shape[:3])} but {name_b} has shape {tuple(b.shape[:3])}; "
            "an image and its label must be on the same voxel grid"
        )
    if not np.allclose(a.affine, b.affine, atol=atol, rtol=0):
        raise BadImageError(
            f"{name_a} and {name_b} have different affines (max difference "
            f"{np.abs(np.asarray(a.affine) - np.asarray(b.affine)).max():.4g} mm); "
            "resample the label onto the image grid first"
        )


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only on success.

    The temporary name keeps the destination's suffix (``.nii.gz``, ``.png``) so
    writers that pick a format from the name behave as for ``path``. On any
    exception, the temporary file is removed and ``path`` is left untouched.
    """
    dst = Path(path)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist; create it first")
    name = dst.name
    suffix = next((s for s in (".nii.gz",) if name.lower().endswith(s)), dst.suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write in {parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``data`` (X, Y, Z) as NIfTI atomically, keeping ``header`` fields (descrip, units, codes).

    Scaling (scl_slope/scl_inter) is reset so the stored values are exactly ``data``
    cast to ``dtype`` (default: ``data.dtype``). Returns the final path.
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"save_nifti: data must be 3D (X, Y, Z), got shape {arr.shape}")
    dtype = np.dtype(dtype or arr.dtype)
    if dtype == np.float64:
        dtype = np.dtype(np.float32)
    hdr = header.copy() if header is not None else None
    if hdr is not None and not isinstance(hdr, nib.Nifti1Header):
        hdr = None  # e.g. a Nifti2/other header: keep only the affine
    img = nib.Nifti1Image(arr.astype(dtype, copy=False), np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(np.nan, np.nan)
    # Keep the original qform/sform codes (scanner vs. aligned space) when present.
    if header is not None and isinstance(header, nib.Nifti1Header):
        scode = int(header["sform_code"]) or 1
        qcode = int(header["qform_code"]) or 1
        img.set_sform(np.asarray(affine, dtype=np.float64), code=scode)
        img.set_qform(np.asarray(affine, dtype=np.float64), code=qcode)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
