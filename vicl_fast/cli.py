"""``vicl-fast``: in-context inference on NIfTI volumes, and a backend report.

Usage (segmentation of one scan from two labelled examples)::

    vicl-fast predict --target sub01_T1.nii.gz \\
        --context ex1_T1.nii.gz ex1_hippo.nii.gz --context ex2_T1.nii.gz ex2_hippo.nii.gz \\
        --task seg --model neuroverse3d.safetensors --out sub01_hippo.nii.gz --preview sub01.png

    vicl-fast predict --target scans/ --contexts examples.csv --labels all --model nv3d.ckpt \\
        --trust-checkpoint --out predictions/          # batch mode, multi-label, authors' checkpoint
    vicl-fast info                                     # compiled / CUDA / Triton backends

Inputs are NIfTI files; a folder holding one DICOM series is read too when
``pydicom`` is installed (``pip install pydicom``; see :mod:`vicl_fast.data.io`).
Every output lands on the target's own voxel grid with its affine and header
(labels nearest neighbour, images linear). All inputs are read and checked
before the model runs; a blank (constant) scan is refused rather than given an
invented result, and an empty segmentation, or one covering nearly the whole
field of view, is reported as a ``vicl-fast: warning:`` line.

Outputs (NIfTI and PNG previews of every target) are written to hidden staging
folders beside their destinations, created before any compute (so a read-only
location is refused at once), and moved into place only when all of them were
written: a failure or Ctrl-C leaves nothing behind. Memory is estimated before
the run (grid, channels, contexts per mini-context); ``--mini-context auto``
takes the largest size that fits, and a request that cannot fit is refused
with the numbers. Files follow the umask.

Progress: a bar advancing per network stage (target encoder, each mini-context,
decoder) when stderr is a terminal; the device ``--device auto`` chose; a
closing one-line timing summary (``-q``: none of these; warnings still shown).
:func:`predict` is the same command as a Python function returning a summary.

Exit codes (each with a one-line ``vicl-fast: error: ...`` on stderr):

====  =======================================================================
0     success
1     internal error (a bug; ``VICL_FAST_DEBUG=1`` shows the traceback)
2     usage error (bad or missing option; argparse's convention)
3     a file is missing, unreadable or not NIfTI; an empty input folder; a
      DICOM folder without pydicom installed
4     bad image: not a 3D volume (2D, a single slice, 4D), NaN voxels, a
      constant (blank) image, or a context image and label whose shapes or
      affines differ
5     bad label: empty, non-integer, or non-binary for a binary task, or a
      requested ``--labels`` value missing from a context label
6     no context pairs given
7     ``--model`` is missing or not a checkpoint this tool can load
8     an output cannot be written (missing or read-only folder, checked before
      any compute; would overwrite an input)
9     the requested ``--device`` is not available
10    out of memory: refused from the estimate before the run (the message
      gives the bytes needed and available), or met while running (try
      ``--mini-context 1``, a smaller ``--grid``, or CPU); nothing is written
130   interrupted (Ctrl-C); nothing partial is left behind
====  =======================================================================

Subcommands are registered in :data:`COMMANDS`; ``train`` is added there by
the training code.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vicl_fast.data.io import (
    BadLabelError,
    BadModelError,
    DeviceError,
    InputError,
    InsufficientMemoryError,
    NoContextError,
    OutputError,
    OutputStager,
    UnreadableFileError,
    check_same_grid,
    check_volume_content,
    is_dicom_dir,
    is_nifti_path,
    load_volume,
    nifti_stem,
    save_nifti,
)

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 10, 130

__all__ = [
    "main",
    "predict",
    "UsageError",
    "build_parser",
    "COMMANDS",
    "load_model",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_OOM",
    "EXIT_INTERRUPTED",
]


class _UsageError(Exception):
    """argparse's error, raised instead of exiting so main() can return 2 in-process."""


UsageError = _UsageError  #: a bad option (exit code 2), raised by :func:`predict`


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(f"{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- inputs


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith(".")
    )


def _case_id(path: Path) -> str:
    """nnU-Net convention: ``case_0000.nii.gz`` (channel 0) is case ``case``."""
    stem = nifti_stem(path)
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def _pairs_from_csv(path: Path) -> list[tuple[Path, Path]]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as exc:
        raise UnreadableFileError(f"cannot read contexts CSV {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UnreadableFileError(f"contexts CSV {path} is not a valid CSV file: {exc}") from None
    first = rows[0][0].strip() if rows else ""
    if rows and not is_nifti_path(first) and not (path.parent / first).is_dir() and not Path(first).is_dir():
        rows = rows[1:]  # header, e.g. "image,label" (a DICOM folder in the first row is data)
    pairs = []
    for n, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise UnreadableFileError(f"contexts CSV {path} row {n}: expected 'image,label', got {r}")
        img, lab = (Path(c.strip()) for c in r[:2])
        pairs.append(
            (img if img.is_absolute() else path.parent / img, lab if lab.is_absolute() else path.parent / lab)
        )
    return pairs


def _pairs_from_folder(folder: Path) -> list[tuple[Path, Path]]:
    """``images/`` + ``labels/`` (or nnU-Net's ``imagesTr/`` + ``labelsTr/``), matched by case id;
    else a flat folder of ``<case>_image.nii.gz`` / ``<case>_label.nii.gz``."""
    for a, b in (("images", "labels"), ("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (folder / a).is_dir() and (folder / b).is_dir():
            labels = {_case_id(p): p for p in _nifti_files(folder / b)}
            pairs = []
            for img in _nifti_files(folder / a):
                cid = _case_id(img)
                if cid not in labels:
                    raise UnreadableFileError(
                        f"context image {img} has no label {folder / b / (cid + '.nii.gz')}"
                    )
                pairs.append((img, labels[cid]))
            return pairs
    files = _nifti_files(folder)
    imgs = {nifti_stem(p)[: -len("_image")]: p for p in files if nifti_stem(p).endswith("_image")}
    labs = {nifti_stem(p)[: -len("_label")]: p for p in files if nifti_stem(p).endswith("_label")}
    missing = sorted(set(imgs) ^ set(labs))
    if missing:
        raise UnreadableFileError(
            f"contexts folder {folder}: unpaired case(s) {missing}; each case needs "
            "<case>_image.nii.gz and <case>_label.nii.gz"
        )
    return [(imgs[k], labs[k]) for k in sorted(imgs)]


def _collect_contexts(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    pairs = [(Path(a), Path(b)) for a, b in (args.context or [])]
    if args.contexts:
        src = Path(args.contexts)
        if not src.exists():
            raise UnreadableFileError(f"--contexts {src} not found (expected a folder or a CSV file)")
        pairs += _pairs_from_folder(src) if src.is_dir() else _pairs_from_csv(src)
    if not pairs:
        raise NoContextError(
            "no context pairs: give at least one --context IMAGE LABEL, or --contexts "
            "FOLDER|CSV (in-context inference needs examples of the task)"
        )
    return pairs


def _collect_targets(target: str) -> list[Path]:
    p = Path(target)
    if p.is_dir() and not is_dicom_dir(p):
        files = _nifti_files(p)
        if not files:
            raise UnreadableFileError(f"target folder {p} contains no .nii/.nii.gz files")
        return files
    return [p]


def _parse_labels(spec: str | None) -> list[int] | str | None:
    if spec is None or spec == "all":
        return spec
    try:
        vals = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise _UsageError(
            f"--labels must be 'all' or comma-separated integers like '1,2,5', got {spec!r}"
        ) from None
    if not vals or min(vals) < 1:
        raise _UsageError(f"--labels values must be positive integers (0 is background), got {spec!r}")
    return vals


@dataclass
class _Context:
    image_path: Path
    label_path: Path
    image: object  # nib image
    label: object
    values: np.ndarray  # unique label values (seg) or empty (gen)


def _load_contexts(pairs: Sequence[tuple[Path, Path]], task: str) -> list[_Context]:
    out = []
    for i, (ip, lp) in enumerate(pairs, start=1):
        img = load_volume(ip, f"context image {i}")
        lab = load_volume(lp, f"context label {i}")
        check_same_grid(img, lab, f"context image {i} ({ip.name})", f"context label {i} ({lp.name})")
        check_volume_content(img, f"context image {i}", ip)
        if task == "gen":
            check_volume_content(lab, f"context output {i}", lp)
        vals = np.empty(0)
        if task == "seg":
            data = np.asanyarray(lab.dataobj)
            if np.issubdtype(data.dtype, np.floating) and not np.all(np.mod(data, 1) == 0):
                raise BadLabelError(
                    f"context label {i} ({lp}) has non-integer values; a label map must "
                    "hold integer classes (did you pass an image as label, or use --task gen?)"
                )
            vals = np.unique(data).astype(np.int64)
            if np.any(vals < 0):
                raise BadLabelError(
                    f"context label {i} ({lp}) has negative values {vals[vals < 0][:5].tolist()}"
                )
            if not np.any(vals > 0):
                raise BadLabelError(
                    f"context label {i} ({lp}) is empty (all zeros); every context needs the "
                    "structure to be segmented, or drop that pair"
                )
        out.append(_Context(ip, lp, img, lab, vals))
    return out


def _resolve_labels(contexts: Sequence[_Context], requested: list[int] | str | None) -> list[int]:
    if requested is None:
        for i, c in enumerate(contexts, start=1):
            extra = sorted(set(c.values.tolist()) - {0, 1})
            if extra:
                raise BadLabelError(
                    f"context label {i} ({c.label_path.name}) has values {c.values.tolist()[:8]} "
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
                    f"--labels all: context label {i} ({c.label_path.name}) lacks label(s) {missing[:8]} "
                    "present in other contexts; every context must contain every label "
                    "(drop that pair, or list the shared labels with --labels)"
                )
        return union
    for v in requested:
        for i, c in enumerate(contexts, start=1):
            if v not in set(c.values.tolist()):
                raise BadLabelError(
                    f"label {v} is absent from context label {i} ({c.label_path.name}); "
                    "each context must contain every requested label (drop the pair or the label)"
                )
    return list(requested)


def _output_paths(targets: Sequence[Path], out: str, batch: bool) -> list[Path]:
    o = Path(out)
    if batch or (o.exists() and o.is_dir()) or (not is_nifti_path(o) and not o.suffix):
        if not o.exists():
            if not o.parent.exists():
                raise OutputError(f"--out folder {o} cannot be created: {o.parent} does not exist")
        elif not o.is_dir():
            raise OutputError(f"--out {o} must be a folder when --target is a folder")
        return [o / f"{_case_id(t)}.nii.gz" for t in targets]
    if not is_nifti_path(o):
        raise OutputError(f"--out {o} must end in .nii or .nii.gz (or be a folder)")
    if not o.parent.is_dir():
        raise OutputError(f"output folder {o.parent} does not exist; create it first")
    return [o]


# --------------------------------------------------------------------------- model


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
    """Load a Neuroverse3D from our safetensors checkpoint or the authors' checkpoint, in eval mode.

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
    except InputError:
        raise
    except Exception as exc:  # safetensors / torch raise many types for broken files
        import pickle

        if _is_oom(exc):
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
        raise BadModelError(
            f"{path} holds a {type(model).__name__}, not a 3D in-context model (neuroverse3d*)"
        )
    return model.to(torch.device(device)).float().eval()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise _UsageError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
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


# --------------------------------------------------------------------------- predict


def _is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of Python, NumPy or PyTorch (CPU allocator or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(
            s in msg
            for s in ("out of memory", "defaultcpuallocator", "can't allocate memory", "not enough memory")
        )
    return False


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _device_note(requested: str, device: str) -> str | None:
    """Why ``--device auto`` chose ``device`` (None for an explicit device)."""
    if requested != "auto":
        return None
    import torch

    if device.startswith("cuda"):
        return f"auto: {torch.cuda.get_device_name(torch.device(device))}"
    return "auto: no CUDA device available"


@contextlib.contextmanager
def _progress_hooks(model, tick: Callable[[int], None]):
    """Advance the progress bar inside a forward pass: the target encoder (1), every mini-context
    (its number of contexts), the decoder (1). Instance attributes, removed afterwards."""
    units = {
        "encode_target": lambda a: 1,
        "_context_branch": lambda a: int(a[0].shape[1]),  # (B, l, C, *S): l contexts
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


#: Warn when a segmentation covers at least this fraction of the target's field of view.
FULL_FOV_WARNING = 0.95


def predict(argv: Sequence[str]) -> dict[str, Any]:
    """Python API of ``vicl-fast predict``: the same options (without the word ``predict``).

    Messages go to stderr as on the command line. Returns a summary::

        {"outputs": [...], "previews": [...], "device": "cpu", "device_note": ..., "mini_context": 2,
         "memory": {"estimated_bytes": ..., "available_bytes": ...},
         "foreground_fraction": [...],            # seg: labelled share of each target's voxels
         "warnings": [...],                       # e.g. an empty segmentation
         "seconds": {"total": ..., "read": ..., "model": ..., "write": ...}}

    Raises:
        InputError: its subclass and ``exit_code`` say what is wrong (see the module docstring);
            ``InsufficientMemoryError`` (exit code 10) when the request does not fit in memory.
        UsageError: a bad option.
    """
    args = build_parser().parse_args(["predict", *argv])
    return _run_predict(args)


def _predict(args: argparse.Namespace) -> int:
    _run_predict(args)
    return EXIT_OK


def _run_predict(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from vicl_fast.apsp import plan_inference_memory
    from vicl_fast.data.preprocess import check_grid, preprocess_image, preprocess_label, to_original

    t_start = time.perf_counter()
    verbose = not args.quiet

    # 1) Cheap checks of every option and path, before reading volumes.
    if len(args.grid) not in (1, 3) or len(args.spacing) not in (1, 3):
        raise _UsageError(f"--grid and --spacing take one value or three, got {args.grid} and {args.spacing}")
    try:
        grid = check_grid(args.grid[0] if len(args.grid) == 1 else args.grid)
    except ValueError:
        raise _UsageError(
            f"--grid must be positive multiples of 16 (e.g. 128 or 96 128 128), got {args.grid}"
        ) from None
    if any(s <= 0 for s in args.spacing):
        raise _UsageError(f"--spacing must be positive, got {args.spacing}")
    mini: int | str | None
    if args.mini_context in ("auto", "all"):
        mini = "auto" if args.mini_context == "auto" else None
    else:
        try:
            mini = int(args.mini_context)
            assert mini >= 1
        except (ValueError, AssertionError):
            raise _UsageError(
                f"--mini-context must be 'auto', 'all' or a positive integer, got {args.mini_context!r}"
            ) from None
    requested = _parse_labels(args.labels)
    if args.task == "gen" and requested is not None:
        raise _UsageError("--labels applies to --task seg only")
    device = _resolve_device(args.device)
    check_model_file(args.model)
    targets = _collect_targets(args.target)
    batch = Path(args.target).is_dir() and not is_dicom_dir(args.target)
    outs = _output_paths(targets, args.out, batch)
    pairs = _collect_contexts(args)
    inputs = {p.resolve() for p in targets} | {q.resolve() for pr in pairs for q in pr}
    for o in outs:
        if o.resolve() in inputs:
            raise OutputError(f"output {o} would overwrite an input file; choose another --out")
    if len(set(outs)) != len(outs):
        raise OutputError("two targets map to the same output name; rename them or run them separately")
    previews = [_preview_path(args.preview, o, batch) for o in outs] if args.preview is not None else []
    for pv in previews:
        if not (pv.parent.is_dir() or (batch and pv.parent == outs[0].parent)):
            raise OutputError(f"--preview folder {pv.parent} does not exist; create it first")
        if pv.resolve() in inputs or pv in outs:
            raise OutputError(f"--preview {pv} would overwrite an input or an output; choose another name")
    if len(set(previews)) != len(previews):
        raise OutputError("two previews map to the same file name; give --preview a folder")

    # Every output is written to a hidden staging folder beside its destination (created now: an
    # unwritable location is refused before any compute) and moved into place only at the end.
    stager = OutputStager([*outs, *previews])
    warnings: list[str] = []
    secs = {"read": 0.0, "model": 0.0, "write": 0.0}
    plan = None
    L = len(pairs)
    B = 1
    bar = None

    def say(msg: str) -> None:
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    try:
        with stager:
            # 2) Read and check every volume.
            t = time.perf_counter()
            contexts = _load_contexts(pairs, args.task)
            labels = _resolve_labels(contexts, requested) if args.task == "seg" else []
            target_imgs = []
            for tp in targets:
                what = f"target {tp.name}" if batch else "target"
                img = load_volume(tp, what)
                check_volume_content(img, what, tp)
                target_imgs.append(img)
            spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)

            # 3) Contexts on the model grid (shared by every target).
            ctx_in, ctx_lab = [], []
            for c in contexts:
                v, m = preprocess_image(c.image, spacing=spacing, grid=grid, crop=args.crop)
                ctx_in.append(v)
                if args.task == "seg":
                    lab, _ = preprocess_label(c.label, mapping=m)
                    ctx_lab.append(lab)
                else:
                    out_v, _ = preprocess_image(c.label, mapping=m)  # same geometry as its image
                    ctx_lab.append(out_v)
            if args.task == "seg":
                for ci, lab in enumerate(ctx_lab, start=1):
                    for v in labels:
                        if not np.any(lab == v):
                            raise BadLabelError(
                                f"label {v} of context {ci} vanishes on the model grid (structure smaller "
                                f"than a voxel at --spacing {args.spacing}); use a finer --spacing/--grid"
                            )
            ci_t = torch.from_numpy(np.stack(ctx_in))[None, :, None]  # (1, L, 1, *G)
            secs["read"] += time.perf_counter() - t

            t = time.perf_counter()
            model = load_model(args.model, device, trust_checkpoint=args.trust_checkpoint)
            dev = torch.device(device)
            chunk = len(labels) if args.label_batch == 0 else max(1, args.label_batch)
            chunks = [labels[i : i + chunk] for i in range(0, len(labels), chunk)] if labels else [[]]
            B = max(1, max(len(ch) for ch in chunks))

            # 4) Memory: estimate before running; refuse what cannot fit, size mini-contexts.
            vox = int(np.prod(grid))
            host = (B * (L + 4) * vox * 4) if dev.type == "cpu" else 0  # per-pass host buffers
            plan = plan_inference_memory(model, grid, L, batch=B, l=mini, device=dev, extra_bytes=host)
            gtxt = "x".join(str(g) for g in grid)  # also in the out-of-memory message below
            if not plan.fits:
                if plan.max_fit >= 1:
                    raise InsufficientMemoryError(
                        f"out of memory (estimated): --mini-context {plan.l} needs about "
                        f"{_gib(plan.need_bytes)} but {_gib(plan.free_bytes)} is available on {device}; "
                        f"use --mini-context {plan.max_fit} (or auto)"
                    )
                lb = ", --label-batch 1" if B > 1 else ""
                raise InsufficientMemoryError(
                    f"out of memory (estimated): grid {gtxt} with {L} context(s) and {B} label(s) per pass "
                    f"needs about {_gib(plan.min_bytes)} even with --mini-context 1, but "
                    f"{_gib(plan.free_bytes)} is available on {device}; use a smaller --grid{lb}, or "
                    + ("--device cpu" if dev.type == "cuda" else "a machine with more memory")
                )
            note = _device_note(args.device, device)
            if verbose and note:
                say(f"vicl-fast: device {device} ({note})")

            # 5) Run: one forward per label chunk (binary: one), per target.
            steps_per_pass = L + 2
            bar = tqdm(
                total=len(targets) * len(chunks) * steps_per_pass,
                desc="vicl-fast predict",
                unit="step",
                disable=not (verbose and sys.stderr.isatty()),
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0,  # steps are whole network stages: show each
            )
            hooks = _progress_hooks(model, bar.update) if not bar.disable else contextlib.nullcontext()
            fractions = []
            secs["model"] += time.perf_counter() - t
            with hooks:
                for timg, tpath, opath in zip(target_imgs, targets, outs):
                    t = time.perf_counter()
                    tv, tm = preprocess_image(timg, spacing=spacing, grid=grid, crop=args.crop)
                    probs = []
                    for ch in chunks:
                        Bc = max(1, len(ch))
                        tt = torch.from_numpy(tv)[None, None].expand(Bc, 1, *grid).contiguous().to(dev)
                        cin = ci_t.expand(Bc, *ci_t.shape[1:])
                        if args.task == "seg":
                            co = torch.from_numpy(
                                np.stack([np.stack([(lab == v) for lab in ctx_lab]) for v in ch]).astype(
                                    np.float32
                                )
                            )[:, :, None]
                        else:
                            co = torch.from_numpy(np.stack(ctx_lab))[None, :, None]
                        y = model.predict(tt, cin, co, l=plan.l)
                        probs.append(y[:, 0].float().cpu().numpy())
                        del y, tt
                    secs["model"] += time.perf_counter() - t
                    t = time.perf_counter()
                    pred = np.concatenate(probs, axis=0)  # (K, *G)
                    if args.task == "seg":
                        best = pred.argmax(0)
                        grid_map = np.where(pred.max(0) > args.threshold, np.asarray(labels)[best], 0)
                        dtype = np.uint8 if max(labels) <= 255 else np.uint16
                        out = to_original(grid_map.astype(dtype), tm, kind="label")
                        second = None
                        frac = float(np.count_nonzero(out)) / out.size
                        fractions.append(frac)
                        warning = None
                        if frac == 0:
                            warning = (f"the segmentation of {tpath.name} is empty (no voxel above --threshold "
                                       f"{args.threshold:g}); check that the contexts show the target's "
                                       "structure and modality")
                        elif frac >= FULL_FOV_WARNING:
                            warning = (f"the segmentation of {tpath.name} covers {frac:.0%} of the field of "
                                       "view; check the contexts and --threshold")
                        if warning:
                            warnings.append(warning)
                            say(f"vicl-fast: warning: {warning}")
                    else:
                        out = to_original(pred[0], tm, kind="image")
                        if args.output_intensity == "target":
                            lo, hi = tm.intensity or (0.0, 1.0)
                            out = out * (hi - lo) + lo
                        dtype = np.float32
                        second = out
                    try:
                        save_nifti(out.astype(dtype), timg.affine, stager.path(opath), header=timg.header,
                                   dtype=dtype)
                        if args.preview is not None:
                            from vicl_fast.preview import save_preview

                            save_preview(stager.path(previews[outs.index(opath)]), timg,
                                         labels=out if args.task == "seg" else None, second=second)
                    except OSError as exc:
                        raise OutputError(f"cannot write the output for {tpath.name}: "
                                          f"{exc.strerror or exc}") from None
                    secs["write"] += time.perf_counter() - t
            bar.close()
            t = time.perf_counter()
            stager.commit()
            secs["write"] += time.perf_counter() - t
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        where = ""
        if plan is not None:
            where = (
                f" (grid {gtxt}, {L} context(s), mini-context {plan.l}, "
                f"{B} label(s) per pass; estimated {_gib(plan.need_bytes)}, "
                f"{_gib(plan.free_bytes)} available)"
            )
        alt = "--device cpu" if device.startswith("cuda") else "a machine with more memory"
        raise InsufficientMemoryError(
            f"out of memory on {device} while running{where}: try --mini-context 1, a smaller --grid, "
            f"or {alt}"
        ) from None
    finally:
        if bar is not None:
            bar.close()

    total = time.perf_counter() - t_start
    if verbose:
        for o in [*outs, *previews]:
            print(f"vicl-fast: wrote {o}", file=sys.stderr)
        n = len(outs)
        print(
            f"vicl-fast: done: {n} output{'s' if n != 1 else ''} in {total:.2f} s on {device} "
            f"(read {secs['read']:.2f} s, model {secs['model']:.2f} s, write {secs['write']:.2f} s; "
            f"mini-context {plan.l})",
            file=sys.stderr,
        )
    return {
        "outputs": [str(o) for o in outs],
        "previews": [str(p) for p in previews],
        "device": device,
        "device_note": _device_note(args.device, device),
        "mini_context": plan.l,
        "memory": {"estimated_bytes": plan.need_bytes, "available_bytes": plan.free_bytes},
        "foreground_fraction": fractions,
        "warnings": warnings,
        "seconds": {"total": round(total, 3), **{k: round(v, 3) for k, v in secs.items()}},
    }


def _preview_path(arg: str, out: Path, batch: bool) -> Path:
    if arg == "":
        return out.with_name(nifti_stem(out) + ".png")
    p = Path(arg)
    if batch or p.is_dir():
        return p / (nifti_stem(out) + ".png")
    return p


# --------------------------------------------------------------------------- parser


def _cmd_info(args: argparse.Namespace) -> int:
    import vicl_fast

    print(vicl_fast.backends_report())
    return EXIT_OK


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="in-context segmentation / generation of NIfTI volumes",
        description="Predict the target's label (seg) or restored image (gen) from context pairs; "
        "the output is written on the target's voxel grid.",
    )
    p.add_argument(
        "--target",
        required=True,
        help="target scan (.nii/.nii.gz, or a folder of one DICOM series: needs pydicom), "
        "or a folder of .nii/.nii.gz scans (batch mode)",
    )
    p.add_argument(
        "--context",
        nargs=2,
        action="append",
        metavar=("IMAGE", "LABEL"),
        help="one context pair (NIfTI files; an image may be a DICOM series folder); repeat for more",
    )
    p.add_argument(
        "--contexts",
        metavar="FOLDER|CSV",
        help="context pairs: CSV 'image,label' rows (paths relative to the CSV), a folder with "
        "images/ + labels/ (or imagesTr/ + labelsTr/), or <case>_image/<case>_label files",
    )
    p.add_argument(
        "--task",
        choices=("seg", "gen"),
        default="seg",
        help="seg: labels are label maps, output a label map; gen: labels are images (default seg)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint: ours (.safetensors, vicl_fast.checkpoint) or the authors' (.ckpt)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling the authors' Lightning checkpoint (runs code from the file: only "
        "for files from a source you trust)",
    )
    p.add_argument("--out", required=True, help="output .nii.gz (single target) or folder (batch mode)")
    p.add_argument("--labels", help="multi-label seg: 'all' or '1,2,5'; default: binary 0/1 labels required")
    p.add_argument(
        "--label-batch",
        type=int,
        default=1,
        help="labels per forward pass (0 = all labels in one batched pass); default 1",
    )
    p.add_argument(
        "--mini-context",
        default="auto",
        help="APSP mini-context size: 'auto' (the largest that fits the free memory, from an estimate), "
        "'all', or N (default auto); a size that cannot fit is refused (exit 10)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--grid", type=int, nargs="+", default=[128], help="model grid, multiples of 16 (default 128)"
    )
    p.add_argument("--spacing", type=float, nargs="+", default=[1.0], help="resampling in mm (default 1.0)")
    p.add_argument(
        "--no-crop",
        dest="crop",
        action="store_false",
        help="fit the whole field of view into the grid instead of the head/brain bounding box",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="seg: foreground threshold (default 0.5)")
    p.add_argument(
        "--output-intensity",
        choices=("unit", "target"),
        default="unit",
        help="gen: write [0, 1] (unit) or rescale to the target's 2-98 percentile range (target)",
    )
    p.add_argument(
        "--preview",
        nargs="?",
        const="",
        metavar="PNG",
        help="write a PNG preview (three slices with overlay); default name <out>.png; "
        "a folder in batch mode",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar, device or timing lines (warnings still shown)",
    )
    p.set_defaults(func=_predict)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="report the compiled / CUDA / Triton backends")
    p.set_defaults(func=_cmd_info)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train Neuroverse3D or a RandP model from a YAML config",
                       description="Arguments are those of `python -m vicl_fast.training`"
                       " (--config CONFIG.yaml [--set key=value ...] [--resume auto|none|DIR] [--check]).")
    p.set_defaults(func=None)


#: Subcommand registrars, in help order.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_predict, _add_train, _add_info]


def build_parser() -> argparse.ArgumentParser:
    """The ``vicl-fast`` argument parser (subcommands from :data:`COMMANDS`)."""
    from vicl_fast import __version__

    parser = _Parser(
        prog="vicl-fast",
        description="Fast medical visual in-context learning.",
        epilog="Exit codes: 0 ok, 1 internal, 2 usage, 3 missing/unreadable file, 4 bad image, "
        "5 bad label, 6 no contexts, 7 bad model, 8 output, 9 device, 10 out of memory, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"vicl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _err(msg: str) -> None:
    print(f"vicl-fast: error: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vicl-fast`` console script; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # The trainer owns its options (argparse cannot forward "--config ..." through a subparser).
        from vicl_fast.training import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    except _UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except InputError as exc:
        _err(str(exc).splitlines()[0])
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the console never shows a raw traceback
        if _is_oom(exc):
            _err("out of memory: try --mini-context 1, a smaller --grid, or --device cpu")
            return EXIT_OOM
        if os.environ.get("VICL_FAST_DEBUG", "0") == "1":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _err(f"internal error: {type(exc).__name__}: {first} (set VICL_FAST_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":  # python -m vicl_fast.cli
    sys.exit(main())
