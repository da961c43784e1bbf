"""In-context inference on 3D volumes: the Python API under ``vicl-fast predict`` and the main job.

Segment (or restore) a scan from a few example pairs of the task, no training::

    from vicl_fast.inference import predict_volume

    seg = predict_volume("sub01_T1.nii.gz",
                         [("ex1_T1.nii.gz", "ex1_hippo.nii.gz"), ("ex2_T1.nii.gz", "ex2_hippo.nii.gz")],
                         task="seg")          # model=None: the checkpoint shipped with the package
    seg.to_filename("sub01_hippo.nii.gz")    # a nibabel image on the target's own voxel grid

Inputs (target, context images and labels) may be file paths (NIfTI, or a DICOM series folder),
nibabel images, or NumPy arrays ``(X, Y, Z)`` (then ``affine=`` gives their voxel-to-world matrix,
identity by default). Every volume is read and checked before the model runs; problems raise the
:mod:`vicl_fast.errors` classes (each names the fix and carries the command line's exit code).

Pipeline: each volume is reoriented, resampled to the model's spacing and fitted into its grid
(:mod:`vicl_fast.data.preprocess`; by default the grid, spacing and cropping the checkpoint was
trained with, from its metadata), intensities normalised on their 2 / 98 percentiles; the model
runs with APSP mini-contexts sized from a memory estimate (:func:`vicl_fast.apsp.plan_inference_memory`);
the output goes back onto the target's grid (images linearly; each label's probability by a cubic
B-spline before the label map is drawn, :func:`vicl_fast.data.preprocess.labels_to_original`).

:class:`Predictor` keeps the model and the preprocessed contexts for many targets (the command
line's batch mode); :func:`predict_volume` is the one-call form.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

import nibabel as nib

from vicl_fast.errors import (
    BadImageError,
    BadLabelError,
    BadModelError,
    DeviceError,
    InsufficientMemoryError,
    NoContextError,
    UsageError,
    ViclFastError,
)

__all__ = [
    "predict_volume",
    "Predictor",
    "Prediction",
    "VolumeLike",
    "as_image",
    "default_model_path",
    "load_model",
    "check_model_file",
    "resolve_device",
    "is_oom",
    "DEFAULT_GRID",
    "DEFAULT_SPACING",
    "FULL_FOV_WARNING",
]

#: A volume given as a path (NIfTI file or DICOM folder), a nibabel image or an array (X, Y, Z).
VolumeLike = Union[str, os.PathLike, nib.spatialimages.SpatialImage, np.ndarray]

#: Model grid and spacing (mm) when neither the caller nor the checkpoint's metadata sets them
#: (Neuroverse3D's 128^3 at 1 mm).
DEFAULT_GRID, DEFAULT_SPACING = 128, 1.0
#: Warn when a segmentation covers at least this fraction of the target's field of view.
FULL_FOV_WARNING = 0.95
SHIPPED_MODEL = "demo_neuroverse3d.safetensors"


# --------------------------------------------------------------------------- inputs


def as_image(volume: VolumeLike, what: str = "image", affine: np.ndarray | None = None) -> nib.Nifti1Image:
    """``volume`` as a checked 3D nibabel image (a path is read by :func:`vicl_fast.data.io.load_volume`).

    Raises:
        UnreadableFileError: a missing or unreadable file. BadImageError: not 3D, NaN/inf voxels.
        UsageError: a type that is none of path, nibabel image, array.
    """
    from vicl_fast.data.io import load_volume

    if isinstance(volume, (str, os.PathLike)):
        return load_volume(volume, what)
    if isinstance(volume, nib.spatialimages.SpatialImage):
        img = volume
    elif isinstance(volume, np.ndarray):
        img = nib.Nifti1Image(volume, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    else:
        raise UsageError(f"{what}: expected a file path, a nibabel image or a NumPy array, got "
                         f"{type(volume).__name__}")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape[:3]), img.affine, img.header)
    elif len(shape) != 3:
        raise BadImageError(f"{what} has shape {tuple(shape)}; a 3D volume (X, Y, Z) is needed")
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise BadImageError(f"{what} contains NaN or infinite voxels")
    return img


def _display(volume: VolumeLike) -> str:
    """How a volume is named in messages: its path, or its kind."""
    if isinstance(volume, (str, os.PathLike)):
        return str(volume)
    fn = volume.get_filename() if isinstance(volume, nib.spatialimages.SpatialImage) else None
    return fn or f"<{type(volume).__name__}>"


@dataclass
class _Context:
    name: str  # for messages: the label's file name or kind
    image: nib.Nifti1Image
    label: nib.Nifti1Image
    values: np.ndarray  # unique label values (seg) or empty (gen)


@dataclass
class _Level:
    """The contexts on one model grid (a multi-scale segmentation has several)."""

    grid: tuple[int, int, int]
    spacing: float | tuple[float, float, float]
    ctx_in: Any  # torch.Tensor (1, L, 1, *grid)
    ctx_lab: list[np.ndarray]  # L x (*grid): label maps (seg) or output images (gen)
    plan: Any  # vicl_fast.apsp.InferencePlan


def _scaled_grid(grid: tuple[int, int, int], spacing: float | tuple[float, float, float], scale: float
                 ) -> tuple[tuple[int, int, int], float | tuple[float, float, float]]:
    """The grid ``scale`` times finer over the same field of view: each side rounded to a multiple of 16,
    the spacing shrunk by the same per-axis ratio (so the fitted region does not change)."""
    if scale == 1.0:
        return grid, spacing
    g = tuple(max(16, int(np.floor(n * scale / 16 + 0.5)) * 16) for n in grid)  # halves up: 32 x 1.25 -> 48
    sp = tuple(float(v) * n / m for v, n, m in zip(np.broadcast_to(spacing, 3), grid, g))
    return g, (sp[0] if len(set(sp)) == 1 else sp)  # type: ignore[return-value]


def _read_contexts(pairs: Sequence[tuple[VolumeLike, VolumeLike]], task: str,
                   affine: np.ndarray | None) -> list[_Context]:
    from vicl_fast.data.io import check_same_grid, check_volume_content

    out = []
    for i, (ip, lp) in enumerate(pairs, start=1):
        img = as_image(ip, f"context image {i}", affine)
        lab = as_image(lp, f"context label {i}", affine)
        iname, lname = Path(_display(ip)).name, Path(_display(lp)).name
        check_same_grid(img, lab, f"context image {i} ({iname})", f"context label {i} ({lname})")
        check_volume_content(img, f"context image {i}", _display(ip))
        if task == "gen":
            check_volume_content(lab, f"context output {i}", _display(lp))
        vals = np.empty(0)
        if task == "seg":
            data = np.asanyarray(lab.dataobj)
            where = _display(lp)
            if np.issubdtype(data.dtype, np.floating) and not np.all(np.mod(data, 1) == 0):
                raise BadLabelError(
                    f"context label {i} ({where}) has non-integer values; a label map must "
                    "hold integer classes (did you pass an image as label, or use --task gen?)"
                )
            vals = np.unique(data).astype(np.int64)
            if np.any(vals < 0):
                raise BadLabelError(f"context label {i} ({where}) has negative values {vals[vals < 0][:5].tolist()}")
            if not np.any(vals > 0):
                raise BadLabelError(
                    f"context label {i} ({where}) is empty (all zeros); every context needs the "
                    "structure to be segmented, or drop that pair"
                )
        out.append(_Context(lname, img, lab, vals))
    return out


def parse_labels(spec: str | Sequence[int] | None) -> list[int] | str | None:
    """``None`` (binary 0/1 labels), ``"all"``, ``"1,2,5"`` or a list of positive ints, checked."""
    if spec is None or spec == "all":
        return spec
    if isinstance(spec, str):
        try:
            vals = sorted({int(v) for v in spec.split(",") if v.strip()})
        except ValueError:
            raise UsageError(f"--labels must be 'all' or comma-separated integers like '1,2,5', got {spec!r}") from None
    else:
        vals = sorted({int(v) for v in spec})
    if not vals or min(vals) < 1:
        raise UsageError(f"--labels values must be positive integers (0 is background), got {spec!r}")
    return vals


def _resolve_labels(contexts: Sequence[_Context], requested: list[int] | str | None) -> list[int]:
    if requested is None:
        for i, c in enumerate(contexts, start=1):
            extra = sorted(set(c.values.tolist()) - {0, 1})
            if extra:
                raise BadLabelError(
                    f"context label {i} ({c.name}) has values {c.values.tolist()[:8]} "
                    "but a binary task needs 0/1 labels; pass --labels all (one output class per value) "
                    f"or --labels {extra[0]} (that value only)"
                )
        return [1]
    if requested == "all":
        union = sorted(set().union(*[set(c.values.tolist()) for c in contexts]) - {0})
        # A context without a label would show the model "no such structure" for it.
        for i, c in enumerate(contexts, start=1):
            missing = sorted(set(union) - set(c.values.tolist()))
            if missing:
                raise BadLabelError(
                    f"--labels all: context label {i} ({c.name}) lacks label(s) {missing[:8]} "
                    "present in other contexts; every context must contain every label "
                    "(drop that pair, or list the shared labels with --labels)"
                )
        return union
    for v in requested:
        for i, c in enumerate(contexts, start=1):
            if v not in set(c.values.tolist()):
                raise BadLabelError(
                    f"label {v} is absent from context label {i} ({c.name}); "
                    "each context must contain every requested label (drop the pair or the label)"
                )
    return list(requested)


# --------------------------------------------------------------------------- model and device


def default_model_path() -> Path | None:
    """The checkpoint shipped with the package (``vicl_fast/checkpoints/``), or None if absent."""
    p = Path(str(resources.files("vicl_fast") / "checkpoints" / SHIPPED_MODEL))
    return p if p.is_file() else None


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28):
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"
    return "unknown"


def _clean_text(text: str, limit: int = 200) -> str:
    """First line of ``text`` without terminal escape codes, cut at ``limit`` characters."""
    import re

    line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).strip().splitlines()
    first = line[0].strip() if line else ""
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def check_model_file(path: str | os.PathLike) -> str:
    """The checkpoint's format (``"safetensors"``, ``"torch-zip"``, ``"torch-pickle"``), or BadModelError."""
    p = Path(path)
    if not p.exists():
        raise BadModelError(f"model file not found: {p}")
    if p.is_dir():
        raise BadModelError(f"--model {p} is a folder; pass the checkpoint file (.safetensors or .ckpt)")
    try:
        kind = _sniff(p)
    except OSError as exc:
        raise BadModelError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if kind == "unknown":
        raise BadModelError(
            f"{p} is not a checkpoint: expected a vicl_fast .safetensors file or the "
            "authors' PyTorch/Lightning .ckpt"
        )
    return kind


def load_model(path: str | os.PathLike, device: str = "cpu", trust_checkpoint: bool = False):
    """A Neuroverse3D from our safetensors checkpoint or the authors' checkpoint, in eval mode, float32.

    ``model.preprocessing`` holds the checkpoint's preprocessing metadata (None for the authors').

    Raises:
        BadModelError: missing file, unknown format, weights that do not fit, or not a 3D in-context model.
    """
    import torch

    kind = check_model_file(path)
    try:
        if kind == "safetensors":
            from vicl_fast.checkpoint import load_checkpoint

            model = load_checkpoint(path, device="cpu")
        else:
            from vicl_fast.models.official import load_official_neuroverse3d

            model = load_official_neuroverse3d(path, map_location="cpu", trust_checkpoint=trust_checkpoint)
    except ViclFastError:
        raise
    except Exception as exc:  # safetensors / torch raise many types for broken files
        import pickle

        if is_oom(exc):
            raise

        pickled = "trust_checkpoint" in str(exc) or isinstance(exc, pickle.UnpicklingError)
        if pickled and not trust_checkpoint:
            # The loader's text quotes PyTorch's (terminal colours, several sentences): one clean line.
            raise BadModelError(
                f"cannot load model {path}: it holds pickled Python objects, which can run code when "
                "loaded; add --trust-checkpoint only if you trust its source (e.g. the authors' release)"
            ) from None
        msg = _clean_text(str(exc)) or type(exc).__name__
        raise BadModelError(f"cannot load model {path}: {msg}") from None
    from vicl_fast.models.neuroverse3d import Neuroverse3D

    if not isinstance(model, Neuroverse3D) or getattr(model, "spatial_dims", 3) != 3:
        raise BadModelError(f"{path} holds a {type(model).__name__}, not a 3D in-context model (neuroverse3d*)")
    if not hasattr(model, "preprocessing"):
        model.preprocessing = None
    return model.to(torch.device(device)).float().eval()


def resolve_device(name: str) -> str:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> a device string.

    Raises:
        UsageError: not a device name. DeviceError: the device is not available here.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {name}: only cpu and cuda are supported")
    return str(dev)


def device_note(requested: str, device: str) -> str | None:
    """Why ``device="auto"`` chose ``device`` (None for an explicit device)."""
    if requested != "auto":
        return None
    import torch

    if device.startswith("cuda"):
        return f"auto: {torch.cuda.get_device_name(torch.device(device))}"
    return "auto: no CUDA device available"


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of Python, NumPy or PyTorch (CPU allocator or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "defaultcpuallocator", "can't allocate memory",
                                      "not enough memory"))
    return False


def gib(n: float) -> str:
    """Bytes as ``"1.5 GiB"`` / ``"12.0 MiB"`` / ``"3.0 KiB"``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


@contextlib.contextmanager
def _progress_hooks(model, tick: Callable[[int], None]):
    """Call ``tick(n)`` inside a forward pass: the target encoder (1), every mini-context (its
    number of contexts), the decoder (1). Instance attributes, removed afterwards."""
    ctx_name = "encode_contexts" if hasattr(model, "encode_contexts") else "_context_branch"
    units = {
        "encode_target": lambda a: 1,
        ctx_name: lambda a: int(a[0].shape[1]),  # (B, l, C, *S): l contexts
        "decode": lambda a: 1,
    }
    saved = {n: model.__dict__[n] for n in units if n in model.__dict__}

    def wrap(fn, amount):
        def counted(*a, **k):
            out = fn(*a, **k)
            tick(amount(a))
            return out

        return counted

    for name, amount in units.items():
        model.__dict__[name] = wrap(getattr(model, name), amount)
    try:
        yield
    finally:
        for name in units:
            if name in saved:
                model.__dict__[name] = saved[name]
            else:
                model.__dict__.pop(name, None)


# --------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """One target's result.

    Attributes:
        image: on the target's voxel grid, with its affine and header: a label map (seg, integer
            classes) or an image (gen, [0, 1] or the target's intensity range).
        grid_output: the model's output on the model grid, ``(K, D, H, W)`` float32 (K = labels
            for seg, probabilities; 1 for gen); with several ``scales``, the first scale's.
        foreground_fraction: seg: the labelled share of the target's voxels (None for gen).
        warnings: e.g. an empty segmentation, one covering nearly the whole field of view.
        seconds: ``{"preprocess", "model", "postprocess"}``.
    """

    image: nib.Nifti1Image
    grid_output: np.ndarray
    foreground_fraction: float | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _grid_tuple(grid: int | Sequence[int]) -> tuple[int, int, int]:
    from vicl_fast.data.preprocess import check_grid

    try:
        return check_grid(grid)
    except ValueError:
        raise UsageError(f"--grid must be positive multiples of 16 (e.g. 128 or 96 128 128), got {grid}") from None


def _spacing_value(spacing: float | Sequence[float]) -> float | tuple[float, float, float]:
    vals = [float(spacing)] if np.isscalar(spacing) else [float(s) for s in spacing]
    if len(vals) not in (1, 3) or any(not s > 0 for s in vals):
        raise UsageError(f"--spacing takes one or three positive values in mm, got {spacing}")
    return vals[0] if len(vals) == 1 else (vals[0], vals[1], vals[2])


class Predictor:
    """A model and its preprocessed contexts, ready to predict any number of targets.

    Args:
        contexts: ``[(image, label), ...]`` example pairs of the task (paths, nibabel images or
            arrays; for ``task="gen"`` the "label" is the output image).
        task: ``"seg"`` (labels are label maps; the output is a label map) or ``"gen"`` (image to
            image: denoising, bias-field correction, super-resolution, ...).
        model: a checkpoint path (ours or the authors' ``.ckpt``), a loaded Neuroverse3D, or None
            for the checkpoint shipped with the package (:func:`default_model_path`).
        labels: seg: None (binary 0/1 labels), ``"all"`` (one output per label value), or the
            label values to segment (``[1, 2, 5]`` or ``"1,2,5"``).
        grid, spacing, crop: model grid (multiples of 16), resampling in mm, and whether to fit the
            head's bounding box rather than the whole field of view; None: the checkpoint's
            (its preprocessing metadata), else 128 / 1.0 mm / True.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        mini_context: APSP mini-context size: ``"auto"`` (the largest that fits the free memory),
            ``"all"`` or a positive int.
        label_batch: labels per forward pass (0 = all in one batched pass).
        affine: voxel-to-world matrix of inputs given as arrays (identity when None).
        trust_checkpoint: allow unpickling the authors' Lightning checkpoint (runs code from it).
        progress: called with the number of network stages just done (a progress bar's update).
        log: called with notes for the user (the resolution warning); ``warnings.warn`` when None.
        skull_strip: ``"auto"``: a target showing much more head than its contexts (a skull and scalp
            that brain-extracted contexts lack) keeps only its brain before prediction
            (:mod:`vicl_fast.data.skull_strip`; the prediction's warnings say so); ``"no"``: never.
        scales: seg: also run the model on grids this many times finer over the same field of view
            (``(1, 1.25)``: 64^3 and 80^3 for a 64^3 model) and average each label's probability on the
            target's grid (:func:`vicl_fast.data.preprocess.labels_to_original`); None: the checkpoint's
            ``segmentation_scales`` (its metadata), else ``(1,)``. Time and memory grow with each grid.
        mirror: also predict the left-right mirror image of the target and contexts (the model grid's
            first axis, R-L after the reorientation) and average the two outputs (test-time
            augmentation; twice the model time); None: the checkpoint's ``mirror_tta``, else False.

    Raises:
        the :mod:`vicl_fast.errors` classes (bad options, unreadable or inconsistent contexts, a
        model that cannot load, a device that is not there, a request that cannot fit in memory).
    """

    def __init__(self, contexts: Sequence[tuple[VolumeLike, VolumeLike]], task: str = "seg",
                 model: str | os.PathLike | Any | None = None, *, labels: str | Sequence[int] | None = None,
                 grid: int | Sequence[int] | None = None, spacing: float | Sequence[float] | None = None,
                 crop: bool | None = None, device: str = "auto", mini_context: int | str = "auto",
                 label_batch: int = 1, affine: np.ndarray | None = None, trust_checkpoint: bool = False,
                 progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None,
                 skull_strip: str = "auto", scales: float | Sequence[float] | None = None,
                 mirror: bool | None = None):
        import torch

        from vicl_fast.data.preprocess import preprocess_image, preprocess_label

        # 1) Cheap checks of every argument, before reading volumes.
        if task not in ("seg", "gen"):
            raise UsageError(f"task must be 'seg' or 'gen', got {task!r}")
        self.task = task
        if skull_strip not in ("auto", "no"):
            raise UsageError(f"--skull-strip must be 'auto' or 'no', got {skull_strip!r}")
        self.skull_strip = skull_strip
        requested = parse_labels(labels)
        if task == "gen" and requested is not None:
            raise UsageError("--labels applies to --task seg only")
        if isinstance(mini_context, str) and mini_context not in ("auto", "all"):
            try:
                mini_context = int(mini_context)
            except ValueError:
                mini_context = 0
        if not (mini_context in ("auto", "all") or (isinstance(mini_context, int) and mini_context >= 1)):
            raise UsageError(f"--mini-context must be 'auto', 'all' or a positive integer, got {mini_context!r}")
        mini = None if mini_context == "all" else mini_context
        if int(label_batch) < 0:
            raise UsageError(f"--label-batch must be 0 (all labels at once) or positive, got {label_batch}")
        self.requested_device = device
        self.device = resolve_device(device)
        self.affine = affine
        self._log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.model_path: Path | None = None
        if model is None:
            self.model_path = default_model_path()
            if self.model_path is None:
                raise BadModelError("no model given and no checkpoint ships with this installation; pass "
                                    "--model (model=) a checkpoint file")
        elif isinstance(model, (str, os.PathLike)):
            self.model_path = Path(model)
            check_model_file(self.model_path)
        if not contexts:
            raise NoContextError("no context pairs: give at least one (image, label) pair (in-context "
                                 "inference needs examples of the task)")

        # 2) Read and check every context.
        t = time.perf_counter()
        ctx = _read_contexts(contexts, task, affine)
        self.labels = _resolve_labels(ctx, requested) if task == "seg" else []
        self.n_contexts = len(ctx)
        self._context_head_ml: list[float] = []  # for skull_strip="auto", filled with the contexts below
        read_s = time.perf_counter() - t

        # 3) The model, and the preprocessing it was trained with.
        t = time.perf_counter()
        if self.model_path is not None:
            model = load_model(self.model_path, self.device, trust_checkpoint=trust_checkpoint)
        else:
            model = model.to(torch.device(self.device)).eval()
        self.model = model
        trained = getattr(model, "preprocessing", None) or {}
        self.trained_on = trained
        self.grid = _grid_tuple(grid if grid is not None else trained.get("grid", DEFAULT_GRID))
        sp = spacing if spacing is not None else trained.get("spacing", DEFAULT_SPACING)
        self.spacing = _spacing_value(sp)
        self.crop = bool(crop if crop is not None else trained.get("crop", True))
        if trained.get("grid") is not None and (grid is not None or spacing is not None):
            tg, ts = _grid_tuple(trained["grid"]), np.broadcast_to(np.asarray(trained.get("spacing", 1.0), float), 3)
            if tuple(self.grid) != tuple(tg) or not np.allclose(np.broadcast_to(self.spacing, 3), ts, rtol=1e-3):
                self._log(f"the model was trained at grid {'x'.join(map(str, tg))} and "
                          f"{'/'.join(f'{v:g}' for v in ts)} mm; predicting at grid "
                          f"{'x'.join(map(str, self.grid))} and {self.spacing} mm leaves its trained resolution")
        model_s = time.perf_counter() - t

        # 4) Contexts on every model grid (shared by every target): the grid, and for a multi-scale
        # segmentation the finer grids over the same field of view.
        t = time.perf_counter()
        from vicl_fast._threads import thread_map

        self.scales = self._resolve_scales(scales, trained)
        self.mirror = bool(trained.get("mirror_tta", False)) if mirror is None else bool(mirror)
        # Voxels read once, for the head volume and every grid's preprocessing (a file-backed image would
        # decompress its file again each time).
        images = thread_map(_in_memory, [c.image for c in ctx])
        labels = thread_map(_in_memory, [c.label for c in ctx])
        if skull_strip == "auto":
            from vicl_fast.data.skull_strip import head_volume_ml

            self._context_head_ml = thread_map(lambda im: head_volume_ml(np.asanyarray(im.dataobj), im.affine), images)
        chunk = len(self.labels) if label_batch == 0 else max(1, int(label_batch))
        self.chunks = [self.labels[i:i + chunk] for i in range(0, len(self.labels), chunk)] if self.labels else [[]]
        self._levels: list[_Level] = []
        for s in self.scales:
            g, sp = _scaled_grid(self.grid, self.spacing, s)
            if any(lv.grid == g for lv in self._levels):
                continue  # two scales rounding to one grid: the same prediction twice

            def on_grid(pair: tuple[nib.Nifti1Image, nib.Nifti1Image]) -> tuple[np.ndarray, np.ndarray]:
                image, label = pair
                v, m = preprocess_image(image, spacing=sp, grid=g, crop=self.crop)
                if task == "seg":
                    return v, preprocess_label(label, mapping=m)[0]
                return v, preprocess_image(label, mapping=m)[0]  # same geometry as its image

            ctx_in, ctx_lab = (list(x) for x in zip(*thread_map(on_grid, list(zip(images, labels)))))
            if task == "seg":
                for ci, lab in enumerate(ctx_lab, start=1):
                    for v in self.labels:
                        if not np.any(lab == v):
                            raise BadLabelError(
                                f"label {v} of context {ci} vanishes on the model grid (structure smaller "
                                f"than a voxel at --spacing {sp}); use a finer --spacing/--grid"
                            )
            # 5) Memory: estimate before running; refuse what cannot fit, size mini-contexts.
            plan = self._memory_plan(g, mini)
            self._levels.append(_Level(g, sp, torch.from_numpy(np.stack(ctx_in))[None, :, None], ctx_lab, plan))
        self.plan = self._levels[0].plan
        read_s += time.perf_counter() - t
        self.progress = progress
        self.seconds = {"read": read_s, "model": model_s}

    def _resolve_scales(self, scales: Sequence[float] | None, trained: dict[str, Any]) -> tuple[float, ...]:
        """The grid scales to predict at: the caller's, else the checkpoint's ``segmentation_scales``
        (seg), else ``(1.0,)``."""
        if scales is None:
            found = trained.get("segmentation_scales") if self.task == "seg" else None
            return tuple(float(v) for v in found) if found else (1.0,)
        vals = [float(scales)] if np.isscalar(scales) else [float(v) for v in scales]
        if not vals or any(not (0.25 <= v <= 4.0) for v in vals):
            raise UsageError(f"--scales takes grid scales between 0.25 and 4 (e.g. 1 1.25), got {scales}")
        if self.task == "gen" and vals != [1.0]:
            raise UsageError("--scales applies to --task seg only (a multi-scale mean blurs generated images)")
        return tuple(vals)

    def _memory_plan(self, grid: tuple[int, int, int], mini: int | str | None):
        """:func:`vicl_fast.apsp.plan_inference_memory` for one model grid, or InsufficientMemoryError."""
        import torch

        from vicl_fast.apsp import plan_inference_memory

        L, B = self.n_contexts, max(1, max(len(ch) for ch in self.chunks))
        dev = torch.device(self.device)
        vox = int(np.prod(grid))
        host = (B * (L + 4) * vox * 4) if dev.type == "cpu" else 0  # per-pass host buffers
        plan = plan_inference_memory(self.model, grid, L, batch=B, l=mini, device=dev, extra_bytes=host)
        if plan.fits:
            return plan
        gtxt = "x".join(str(g) for g in grid)
        if plan.max_fit >= 1:
            raise InsufficientMemoryError(
                f"out of memory (estimated): --mini-context {plan.l} needs about "
                f"{gib(plan.need_bytes)} at grid {gtxt} but {gib(plan.free_bytes)} is available on {self.device}; "
                f"use --mini-context {plan.max_fit} (or auto)"
            )
        lb = ", --label-batch 1" if B > 1 else ""
        sc = ", --scales 1" if len(self.scales) > 1 else ""
        raise InsufficientMemoryError(
            f"out of memory (estimated): grid {gtxt} with {L} context(s) and {B} label(s) per pass "
            f"needs about {gib(plan.min_bytes)} even with --mini-context 1, but "
            f"{gib(plan.free_bytes)} is available on {self.device}; use a smaller --grid{lb}{sc}, or "
            + ("--device cpu" if dev.type == "cuda" else "a machine with more memory")
        )

    @property
    def stages_per_target(self) -> int:
        """Network stages per target (target encoder + contexts + decoder, per label chunk and grid)."""
        return (2 if self.mirror else 1) * len(self._levels) * len(self.chunks) * (self.n_contexts + 2)

    def describe_model(self) -> str:
        """One line: which model, what it was trained on, its grid."""
        src = str(self.model_path) if self.model_path is not None else type(self.model).__name__
        t = self.trained_on
        if not t:
            return f"model {src}"
        g = "x".join(map(str, _grid_tuple(t["grid"]))) if t.get("grid") else "?"
        sp = t.get("spacing", "?")
        sp = f"{sp[0]:g}" if isinstance(sp, list) and len(set(sp)) == 1 else sp
        expects = f"; expects {t['expects']}" if t.get("expects") else ""
        multi = ("; segmenting at grids " + " and ".join("x".join(map(str, lv.grid)) for lv in self._levels)
                 if len(self._levels) > 1 else "")
        multi += "; averaged with its left-right mirror image" if self.mirror else ""
        return (f"model {src}: {t.get('description', 'Neuroverse3D')}, trained on {t.get('training_data', '?')}, "
                f"grid {g} at {sp} mm{multi}{expects}")

    def predict(self, target: VolumeLike, *, threshold: float = 0.5, output_intensity: str = "unit",
                what: str = "target", checked: bool = False) -> Prediction:
        """Predict one target; returns a :class:`Prediction` on the target's voxel grid.

        Args:
            threshold: seg: foreground probability threshold.
            output_intensity: gen: ``"unit"`` ([0, 1]) or ``"target"`` (the target's 2-98 percentile range).
            checked: the caller already ran :func:`vicl_fast.data.io.check_volume_content` on ``target``
                (the command line checks every target before loading the model).
        """
        from vicl_fast.data.io import check_volume_content, make_nifti
        from vicl_fast.data.preprocess import labels_to_original, preprocess_image, to_original

        if output_intensity not in ("unit", "target"):
            raise UsageError(f"--output-intensity must be 'unit' or 'target', got {output_intensity!r}")
        t = time.perf_counter()
        timg = as_image(target, what, self.affine)
        name = _display(target)
        if not checked:
            check_volume_content(timg, what, name)
        notes: list[str] = []
        timg = _in_memory(timg)  # read once for the skull check and every grid's preprocessing
        if self.skull_strip == "auto":
            timg, note = self._strip_extra_head(timg, Path(name).name)
            notes += [note] if note else []
        secs = {"preprocess": time.perf_counter() - t, "model": 0.0}
        outputs = []  # (probabilities or image (K, *G), mapping) per model grid
        for lv in self._levels:
            t = time.perf_counter()
            tv, tm = preprocess_image(timg, spacing=lv.spacing, grid=lv.grid, crop=self.crop)
            secs["preprocess"] += time.perf_counter() - t
            t = time.perf_counter()
            outputs.append((self._run_model(lv, tv), tm))
            secs["model"] += time.perf_counter() - t
        t = time.perf_counter()
        pred, tm = outputs[0]
        frac = None
        if self.task == "seg":
            out = labels_to_original(outputs, self.labels, threshold)
            dtype = out.dtype
            frac = float(np.count_nonzero(out)) / out.size
            short = Path(name).name
            if frac == 0:
                notes.append(f"the segmentation of {short} is empty (no voxel above --threshold {threshold:g}); "
                             "check that the contexts show the target's structure and modality")
            elif frac >= FULL_FOV_WARNING:
                notes.append(f"the segmentation of {short} covers {frac:.0%} of the field of view; check the "
                             "contexts and --threshold")
        else:
            out = to_original(pred[0], tm, kind="image")
            if output_intensity == "target":
                lo, hi = tm.intensity or (0.0, 1.0)
                out = out * (hi - lo) + lo
            dtype = np.float32
        result = make_nifti(out, timg.affine, header=timg.header, dtype=dtype)
        secs["postprocess"] = time.perf_counter() - t
        return Prediction(result, pred, frac, notes, {k: round(v, 4) for k, v in secs.items()})

    def _run_model(self, lv: _Level, tv: np.ndarray) -> np.ndarray:
        """The model on one grid: target ``tv`` (*G) and the level's contexts -> (K, *G) float32
        (K = labels for seg, 1 for gen), label chunk by label chunk; OOM as InsufficientMemoryError."""
        import torch

        dev = torch.device(self.device)
        hooks = _progress_hooks(self.model, self.progress) if self.progress else contextlib.nullcontext()
        probs = []
        try:
            with hooks, torch.no_grad():
                for ch in self.chunks:
                    Bc = max(1, len(ch))
                    tt = torch.from_numpy(tv)[None, None].expand(Bc, 1, *lv.grid).contiguous().to(dev)
                    cin = lv.ctx_in.expand(Bc, *lv.ctx_in.shape[1:])
                    if self.task == "seg":
                        co = torch.from_numpy(np.stack([np.stack([(lab == v) for lab in lv.ctx_lab]) for v in ch])
                                              .astype(np.float32))[:, :, None]
                    else:
                        co = torch.from_numpy(np.stack(lv.ctx_lab))[None, :, None]
                    y = self.model.predict(tt, cin, co, l=lv.plan.l)
                    if self.mirror:  # (B, 1, D, H, W) and (B, L, 1, D, H, W): D is the R-L axis
                        y = (y + self.model.predict(tt.flip(2), cin.flip(3), co.flip(3), l=lv.plan.l).flip(2)) / 2
                    probs.append(y[:, 0].float().cpu().numpy())
                    del y, tt
        except (MemoryError, RuntimeError) as exc:
            if not is_oom(exc):
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            gtxt = "x".join(str(g) for g in lv.grid)
            alt = "--device cpu" if dev.type == "cuda" else "a machine with more memory"
            sc = ", --scales 1" if len(self._levels) > 1 else ""
            raise InsufficientMemoryError(
                f"out of memory on {self.device} while running (grid {gtxt}, {self.n_contexts} context(s), "
                f"mini-context {lv.plan.l}, {max(1, max(len(c) for c in self.chunks))} label(s) per pass; "
                f"estimated {gib(lv.plan.need_bytes)}, {gib(lv.plan.free_bytes)} available): try "
                f"--mini-context 1, a smaller --grid{sc}, or {alt}"
            ) from None
        return np.concatenate(probs, axis=0)

    def _strip_extra_head(self, timg: nib.Nifti1Image, short: str) -> tuple[nib.Nifti1Image, str | None]:
        """The target (in memory: :func:`_in_memory`) with only its brain kept when it shows much more head than the contexts
        (:func:`vicl_fast.data.skull_strip.has_extra_head`), and a note saying so; else unchanged."""
        from vicl_fast.data.skull_strip import VOLUME_SLACK, brain_mask, has_extra_head, head_volume_ml

        data = np.asanyarray(timg.dataobj)
        data = data.reshape(data.shape[:3])
        target_ml = head_volume_ml(data, timg.affine)
        if not has_extra_head(target_ml, self._context_head_ml):
            return timg, None
        ref_ml = float(np.median(self._context_head_ml))
        mask, radius = brain_mask(data, timg.affine, VOLUME_SLACK * ref_ml)
        stripped = nib.Nifti1Image(np.where(mask, data, 0).astype(np.float32), timg.affine, timg.header)
        who = "the target" if short.startswith("<") else short
        return stripped, (f"{who} shows {target_ml / ref_ml:.1f}x the head volume of the contexts (a skull they "
                          f"lack): kept its brain only ({mask.sum() / mask.size:.0%} of the volume, erosion "
                          f"{radius:g} mm); --skull-strip no keeps the whole head")


def _in_memory(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``img`` with its voxels read (scaling applied): later reads cost nothing, where a file-backed
    image would decompress its file again."""
    if isinstance(img.dataobj, np.ndarray):
        return img
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def predict_volume(target: VolumeLike, contexts: Sequence[tuple[VolumeLike, VolumeLike]],
                   model: str | os.PathLike | Any | None = None, task: str = "seg", *,
                   threshold: float = 0.5, output_intensity: str = "unit", **options: Any) -> nib.Nifti1Image:
    """In-context prediction of one volume; returns a nibabel image on ``target``'s voxel grid.

    Args:
        target: the scan to segment or restore (path, nibabel image, or array ``(X, Y, Z)``).
        contexts: ``[(image, label), ...]`` example pairs of the task.
        model: checkpoint path, loaded model, or None for the shipped checkpoint.
        task: ``"seg"`` or ``"gen"``.
        threshold, output_intensity: see :meth:`Predictor.predict`.
        options: the other :class:`Predictor` arguments (``labels``, ``grid``, ``spacing``,
            ``crop``, ``device``, ``mini_context``, ``label_batch``, ``affine``, ``trust_checkpoint``).

    Warnings (an empty segmentation, one covering the whole field of view) are issued with
    :func:`warnings.warn`; use :class:`Predictor` to get them as data.
    """
    pred = Predictor(contexts, task, model, **options).predict(target, threshold=threshold,
                                                               output_intensity=output_intensity)
    for w in pred.warnings:
        warnings.warn(w, stacklevel=2)
    return pred.image
