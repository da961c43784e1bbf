"""NIfTI input/output with validation, and atomic writes.

Every reader check raises an :class:`InputError` subclass whose message names
the file and the fix; the CLI turns each subclass into a one-line message and
its documented exit code (see :mod:`vicl_fast.errors`). Every writer goes through
:func:`atomic_write`: the bytes land in a temporary file in the destination
folder and are moved into place with :func:`os.replace`, so a failure (bad
data, full disk, Ctrl-C) never leaves a partial output behind.

DICOM: :func:`load_volume` also reads a folder holding ONE single-frame DICOM
series (CT / MR slices) when ``pydicom`` is installed (it is optional: without
it the error says ``pip install pydicom``). Slices are sorted along the slice
normal, the geometry is taken from ImagePositionPatient / ImageOrientationPatient
/ PixelSpacing (LPS, converted to NIfTI's RAS), RescaleSlope/Intercept are
applied. Enhanced multi-frame files, several series in one folder, and 4D series
(repeated slice positions) are refused with a message; convert those with
``dcm2niix``. Outputs are always NIfTI.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

import nibabel as nib

# The error classes live in vicl_fast.errors (one hierarchy for the whole package); the readers raise them.
from vicl_fast.errors import BadImageError, OutputError, UnreadableFileError

__all__ = [
    "is_nifti_path",
    "nifti_stem",
    "load_nifti",
    "is_dicom_dir",
    "dicom_series_affine",
    "load_dicom_series",
    "load_volume",
    "check_same_grid",
    "check_volume_content",
    "atomic_write",
    "default_file_mode",
    "OutputStager",
    "save_nifti",
    "make_nifti",
    "save_image",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")




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
        raise UnreadableFileError(
            f"{what} path is a folder, expected a .nii/.nii.gz file (or a folder of DICOM slices): {p}"
        )
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
    elif len(shape) < 3:
        raise BadImageError(
            f"{what} {p} is a 2D image (shape {tuple(shape)}); vicl-fast needs a 3D volume (X, Y, Z)"
        )
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
    if data is not img.dataobj:
        # Keep the voxels just read (and checked) in the image: every later reader (content checks,
        # label values, preprocessing) then uses them instead of decompressing the file again.
        img = nib.Nifti1Image(data, img.affine, header=img.header)
    return img


DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")


def _looks_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` at byte 128) or a file named ``*.dcm`` / ``*.ima``."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of DICOM files and no NIfTI file (a NIfTI folder is batch input)."""
    p = Path(path)
    if not p.is_dir():
        return False
    files = [q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")]
    if not files or any(is_nifti_path(q) for q in files):
        return False
    return any(_looks_dicom(q) for q in files)


def dicom_series_affine(
    orientation: np.ndarray,
    positions: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_spacing: float | None = None,
) -> np.ndarray:
    """RAS voxel -> world affine (4, 4) of a sorted DICOM series, for voxel order ``(column, row, slice)``.

    Args:
        orientation: ImageOrientationPatient, 6 values: the row direction (along which the
            column index grows) then the column direction (along which the row index grows), LPS.
        positions: (N, 3) ImagePositionPatient of the slices, sorted along the slice normal.
        pixel_spacing: PixelSpacing ``(between rows, between columns)`` in mm.
        slice_spacing: step along the normal when N == 1 (SpacingBetweenSlices / SliceThickness).

    The DICOM pixel formula (PS3.3 C.7.6.2.1.1) ``P = S + X_r dc c + X_c dr r`` plus the slice
    step ``(S_last - S_first) / (N - 1)`` (which also covers gantry tilt), then LPS -> RAS.
    """
    iop = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    dr, dc = (float(v) for v in pixel_spacing)
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = np.cross(iop[0], iop[1]) * float(slice_spacing or 1.0)
    A = np.eye(4)
    A[:3, 0] = iop[0] * dc
    A[:3, 1] = iop[1] * dr
    A[:3, 2] = step
    A[:3, 3] = pos[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ A


def _floats(ds, key: str, n: int, name: str, what: str) -> np.ndarray:
    v = getattr(ds, key, None)
    try:
        arr = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.shape != (n,):
        raise BadImageError(f"{what} {name}: DICOM slice without a valid {key}; convert with dcm2niix")
    return arr


def load_dicom_series(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Read a folder holding one single-frame DICOM series as a 3D RAS-affine ``Nifti1Image`` (X, Y, Z).

    Voxel order is ``(column, row, slice)`` (as dcm2niix and nibabel), slices sorted along the
    normal; voxel values ``stored * RescaleSlope + RescaleIntercept`` (float32 when rescaled).

    Raises:
        UnreadableFileError: pydicom missing, or a DICOM file that cannot be parsed.
        BadImageError: several series, multi-frame files, repeated / irregular slice positions,
            slices of different sizes, orientations or pixel spacings.
    """
    p = Path(path)
    try:
        import pydicom
    except ImportError:
        raise UnreadableFileError(
            f"{what} {p} is a DICOM folder; reading DICOM needs pydicom (`pip install pydicom`), "
            "or convert the series to NIfTI first (e.g. `dcm2niix`)"
        ) from None
    slices = []
    for f in sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")):
        if not _looks_dicom(f):
            continue  # README, DICOMDIR index without .dcm, thumbnails...
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as exc:  # pydicom raises many types for corrupt files
            raise UnreadableFileError(
                f"cannot read DICOM file {f} of {what}: {type(exc).__name__}: {exc}"
            ) from None
        if getattr(ds, "ImagePositionPatient", None) is None and getattr(ds, "PixelData", None) is None:
            continue  # a DICOMDIR or other non-image object
        slices.append((f, ds))
    if not slices:
        raise UnreadableFileError(f"{what} folder {p} holds no DICOM image slices")
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise BadImageError(
            f"{what} folder {p} mixes {len(series)} DICOM series; put one series per folder "
            "(or convert with dcm2niix)"
        )
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in slices):
        raise BadImageError(
            f"{what} {p}: enhanced multi-frame DICOM is not supported; convert it with dcm2niix"
        )
    iops = np.stack([_floats(ds, "ImageOrientationPatient", 6, f.name, what) for f, ds in slices])
    ipps = np.stack([_floats(ds, "ImagePositionPatient", 3, f.name, what) for f, ds in slices])
    sps = np.stack([_floats(ds, "PixelSpacing", 2, f.name, what) for f, ds in slices])
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(sizes) > 1 or not np.allclose(iops, iops[0], atol=1e-4) or not np.allclose(sps, sps[0], atol=1e-4):
        raise BadImageError(
            f"{what} {p}: DICOM slices differ in size, orientation or pixel spacing; "
            "not one 3D series (convert with dcm2niix)"
        )
    normal = np.cross(iops[0, :3], iops[0, 3:])
    order = np.argsort(ipps @ normal, kind="stable")
    ipps = ipps[order]
    if len(ipps) > 1:
        gaps = np.diff(ipps @ normal)
        if np.any(gaps < 1e-3):
            raise BadImageError(
                f"{what} {p}: several DICOM slices share one position (a 4D / multi-echo series); "
                "split it into 3D series first (e.g. dcm2niix)"
            )
        if np.ptp(gaps) > 0.01 * gaps.mean() + 1e-3:
            raise BadImageError(
                f"{what} {p}: DICOM slice spacing is irregular ({gaps.min():.3g}-{gaps.max():.3g} mm; "
                "missing slices?); convert with dcm2niix, which can resample such series"
            )
    planes = []
    rescaled = False
    for i in order:
        f, ds = slices[int(i)]
        try:
            px = np.asarray(ds.pixel_array)
        except Exception as exc:  # missing pixel data / unsupported transfer syntax
            raise UnreadableFileError(
                f"cannot decode the pixels of DICOM file {f} of {what}: {type(exc).__name__}: {exc} "
                "(compressed DICOM may need `pip install pylibjpeg` or conversion with dcm2niix)"
            ) from None
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if slope != 1 or inter != 0:
            rescaled = True
            px = px.astype(np.float64) * slope + inter
        planes.append(px.T)  # (columns, rows)
    data = np.stack(planes, axis=-1)
    data = data.astype(np.float32) if rescaled or np.issubdtype(data.dtype, np.floating) else data
    if data.ndim != 3:
        raise BadImageError(f"{what} {p}: DICOM pixels of shape {data.shape[:-1]} are not 2D grey slices")
    ds0 = slices[int(order[0])][1]
    thick = getattr(ds0, "SpacingBetweenSlices", None) or getattr(ds0, "SliceThickness", None)
    affine = dicom_series_affine(iops[0], ipps, tuple(sps[0]), float(thick) if thick else None)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)  # scanner coordinates
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    desc = str(getattr(ds0, "SeriesDescription", "") or "")[:79]
    if desc:
        img.header["descrip"] = desc.encode("ascii", "replace")
    return img


def load_volume(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """:func:`load_nifti` for a file, :func:`load_dicom_series` for a folder of DICOM slices."""
    if is_dicom_dir(path):
        img = load_dicom_series(path, what)
        data = np.asanyarray(img.dataobj)
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            raise BadImageError(f"{what} {path} contains NaN or infinite voxels")
        return img
    return load_nifti(path, what)


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


#: A volume whose standard deviation is below this fraction of its range (max - min) is "nearly
#: constant": a few odd voxels in a blank scan. Scale-free, so a small dynamic range is fine.
CONSTANT_STD_FRACTION = 1e-4


def check_volume_content(img: nib.spatialimages.SpatialImage, what: str, path: str | os.PathLike) -> None:
    """Refuse an image that cannot be a scan for in-context inference (:class:`BadImageError`).

    - a single slice (a dimension of size 1): a 2D image, not a 3D volume;
    - constant: every voxel equal (all-zero included), or nearly so: a standard deviation below
      :data:`CONSTANT_STD_FRACTION` of the range. The model would otherwise invent a result.

    Meant for images (targets, context images, generation outputs), not label maps.
    """
    shape = tuple(int(s) for s in img.shape[:3])
    if min(shape) <= 1:
        raise BadImageError(
            f"{what} {path} is a single slice (shape {shape}), a 2D image; vicl-fast predict needs "
            "a 3D volume (X, Y, Z)"
        )
    data = np.asanyarray(img.dataobj)
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi == lo:
        raise BadImageError(
            f"{what} {path} is constant (every voxel is {lo:g}): a blank scan, from which the model "
            "would invent a result; check the file"
        )
    # Two passes by slab (float64 accumulation without a float64 copy of the whole volume).
    n = data.size
    slabs = [data[..., k : k + 8] for k in range(0, data.shape[-1], 8)]
    mean = sum(float(np.sum(s, dtype=np.float64)) for s in slabs) / n
    var = sum(float(np.sum((np.asarray(s, np.float64) - mean) ** 2)) for s in slabs) / n
    if var ** 0.5 < CONSTANT_STD_FRACTION * (hi - lo):
        raise BadImageError(
            f"{what} {path} is nearly constant (std {var ** 0.5:.3g} for a range {lo:g}..{hi:g}: a few "
            "odd voxels in a blank scan), from which the model would invent a result; check the file"
        )


def default_file_mode() -> int:
    """The mode a new file gets from ``open()`` here: ``0o666`` minus the process umask.

    Read from ``/proc/self/status`` when possible (setting and restoring the umask to read it is
    not thread-safe).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only on success.

    The temporary name keeps the destination's suffix (``.nii.gz``, ``.png``) so
    writers that pick a format from the name behave as for ``path``. On any
    exception, the temporary file is removed and ``path`` is left untouched. The
    file gets the mode ``open()`` would give it (0o666 minus the umask), not
    ``mkstemp``'s private 0o600.
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
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


class OutputStager:
    """Stage every output of a run, and move them into place only when all were written.

    ``OutputStager(paths)`` checks the destinations and creates one hidden folder
    (``.vicl-fast-staging-*``) beside them per destination folder: on the same file system, so
    the final :func:`os.replace` is atomic, and a real test that the folder is writable, done
    before any compute. A destination folder that does not exist yet but whose parent does (a
    batch ``--out`` folder) is staged in that parent and created at :meth:`commit`.

    Write each output to :meth:`path` (e.g. with :func:`save_nifti`), then call :meth:`commit`.
    :meth:`abort` (also on leaving the ``with`` block without a commit, whatever the exception,
    KeyboardInterrupt included) removes everything staged: nothing partial is left behind.

    Raises:
        OutputError: a destination folder that is missing or not writable, a destination that is a
            folder, or a failure while moving the outputs into place.
    """

    _PREFIX = ".vicl-fast-staging-"

    def __init__(self, paths: "list[str | os.PathLike]"):
        self._dest = [Path(p) for p in paths]
        self._stage: dict[Path, Path] = {}  # staging root -> staging folder
        self._staged: list[Path] = []
        self._create: set[Path] = set()
        self.committed = False
        roots = []
        for d in self._dest:
            if d.is_dir():
                raise OutputError(f"output {d} is a folder; give a file name")
            parent = d.parent if str(d.parent) else Path(".")
            if parent.is_dir():
                root = parent
            elif parent.parent.is_dir() and not parent.exists():
                root = parent.parent
                self._create.add(parent)
            else:
                raise OutputError(f"output folder {parent} does not exist; create it first")
            roots.append(root)
        try:
            for root in dict.fromkeys(roots):
                try:
                    self._stage[root] = Path(tempfile.mkdtemp(prefix=self._PREFIX, dir=root))
                except OSError as exc:
                    raise OutputError(
                        f"output folder {root} is not writable ({exc.strerror or exc}); "
                        "choose another --out / --preview location"
                    ) from None
        except BaseException:
            self.abort()
            raise
        for i, (d, root) in enumerate(zip(self._dest, roots)):
            self._staged.append(self._stage[root] / f"{i:04d}-{d.name}")  # keeps the suffix

    def path(self, dest: "str | os.PathLike") -> Path:
        """Where to write ``dest`` now (a file in a staging folder, same name suffix)."""
        return self._staged[self._dest.index(Path(dest))]

    def commit(self) -> list[Path]:
        """Move every staged output onto its destination (all must have been written); returns them.

        Ctrl-C during the moves (milliseconds) is held back until they are done.
        """
        import signal

        missing = [d for d, s in zip(self._dest, self._staged) if not s.is_file()]
        if missing:
            raise OutputError(f"output {missing[0]} was not written")
        held: list[int] = []
        try:
            old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        except ValueError:  # not the main thread
            old = None
        try:
            for folder in sorted(self._create):
                folder.mkdir(exist_ok=True)
            for s, d in zip(self._staged, self._dest):
                try:
                    os.replace(s, d)
                except OSError as exc:
                    raise OutputError(
                        f"cannot move the output into place at {d}: {exc.strerror or exc}"
                    ) from None
            self.committed = True
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            self._cleanup()
        if held:
            raise KeyboardInterrupt
        return list(self._dest)

    def abort(self) -> None:
        """Remove everything staged (safe to call more than once)."""
        self._cleanup()

    def _cleanup(self) -> None:
        import shutil

        for folder in self._stage.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._stage = {}

    def __enter__(self) -> "OutputStager":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()


def make_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> nib.Nifti1Image:
    """``data`` (X, Y, Z) as a NIfTI image on ``affine``, keeping ``header`` fields (descrip, units, codes).

    Scaling (scl_slope/scl_inter) is reset so the stored values are exactly ``data``
    cast to ``dtype`` (default: ``data.dtype``; float64 is stored as float32), and the display
    window (cal_min/cal_max) is cleared.
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
    # The input's display window (e.g. T1 intensities) would hide a label map or a [0, 1] output.
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    # Keep the original qform/sform codes (scanner vs. aligned space) when present.
    if header is not None and isinstance(header, nib.Nifti1Header):
        scode = int(header["sform_code"]) or 1
        qcode = int(header["qform_code"]) or 1
        img.set_sform(np.asarray(affine, dtype=np.float64), code=scode)
        img.set_qform(np.asarray(affine, dtype=np.float64), code=qcode)
    return img


def save_image(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write a nibabel image atomically (see :func:`atomic_write`); returns the final path."""
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``data`` (X, Y, Z) as NIfTI atomically: :func:`make_nifti` then :func:`save_image`."""
    return save_image(make_nifti(data, affine, header, dtype), path)
