"""``vicl-fast``: in-context inference on NIfTI volumes, and a backend report.

Usage (segmentation of one scan from two labelled examples)::

    vicl-fast predict --target sub01_T1.nii.gz \\
        --context ex1_T1.nii.gz ex1_hippo.nii.gz --context ex2_T1.nii.gz ex2_hippo.nii.gz \\
        --task seg --model neuroverse3d.safetensors --out sub01_hippo.nii.gz --preview sub01.png

    vicl-fast predict --target scans/ --contexts examples.csv --labels all --model nv3d.ckpt \\
        --trust-checkpoint --out predictions/          # batch mode, multi-label, authors' checkpoint
    vicl-fast info [--explain]                         # backends, and why each is (not) used

Inputs are NIfTI files; a folder holding one DICOM series is read too when
``pydicom`` is installed (``pip install pydicom``; see :mod:`vicl_fast.data.io`).
Every output lands on the target's own voxel grid with its affine and header
(images linearly; a label map from each label's probability resampled by a
cubic B-spline). All inputs are read and checked before the model runs; a
blank (constant) scan is refused rather than given an invented result, and an empty segmentation, or one covering nearly the whole
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

This module is argument parsing and file handling only: reading, checking,
preprocessing, the model and the maths are :class:`vicl_fast.inference.Predictor`
(the Python API), and the errors with their exit codes are :mod:`vicl_fast.errors`.
Without ``--model`` the checkpoint shipped with the package is used (one line says
which), at the grid, spacing and cropping it was trained with unless
``--grid`` / ``--spacing`` / ``--no-crop`` override them (a warning says when an
override leaves its trained resolution), and for a segmentation at the grid scales
its metadata lists (``--scales``), averaged with the left-right mirror image when
its metadata says so (``--mirror``; the shipped model does).

Subcommands are registered in :data:`COMMANDS`; ``train`` is added there by
the training code.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vicl_fast.data.io import OutputStager, is_dicom_dir, is_nifti_path, nifti_stem
from vicl_fast.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OOM,
    EXIT_USAGE,
    NoContextError,
    OutputError,
    UnreadableFileError,
    UsageError,
    ViclFastError,
)
from vicl_fast.inference import check_model_file, is_oom, load_model, parse_labels

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see {self.prog} --help)")  # not sys.exit: main() returns 2 in-process


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


# --------------------------------------------------------------------------- predict


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
    """``vicl-fast predict``: paths and outputs here; reading, model and maths in :class:`~vicl_fast.inference.Predictor`."""
    from tqdm import tqdm

    from vicl_fast.data.io import check_volume_content, load_volume, save_image
    from vicl_fast.inference import Predictor, device_note

    t_start = time.perf_counter()
    verbose = not args.quiet

    # 1) Cheap checks of every option and path, before reading volumes.
    if len(args.grid or [0]) not in (1, 3) or len(args.spacing or [0]) not in (1, 3):
        raise UsageError(f"--grid and --spacing take one value or three, got {args.grid} and {args.spacing}")
    grid = None if args.grid is None else (args.grid[0] if len(args.grid) == 1 else args.grid)
    spacing = None if args.spacing is None else (args.spacing[0] if len(args.spacing) == 1 else args.spacing)
    parse_labels(args.labels)
    if args.model is not None:
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
    bar = None

    def say(msg: str) -> None:
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    with stager:
        # 2) Read and check every target (contexts and the model: the Predictor).
        t = time.perf_counter()
        target_imgs = []
        for tp in targets:
            what = f"target {tp.name}" if batch else "target"
            img = load_volume(tp, what)
            check_volume_content(img, what, tp)
            target_imgs.append(img)
        secs["read"] += time.perf_counter() - t
        progress: list[Callable[[int], None]] = []
        predictor = Predictor(
            pairs, args.task, args.model, labels=args.labels, grid=grid, spacing=spacing,
            crop=args.crop, device=args.device, mini_context=args.mini_context,
            label_batch=args.label_batch, trust_checkpoint=args.trust_checkpoint, skull_strip=args.skull_strip,
            scales=args.scales, mirror=None if args.mirror is None else args.mirror == "yes",
            progress=lambda n: [f(n) for f in progress], log=lambda m: say(f"vicl-fast: warning: {m}"),
        )
        secs["read"] += predictor.seconds["read"]
        secs["model"] += predictor.seconds["model"]
        device = predictor.device
        if args.model is None:  # the shipped checkpoint: say which model answers
            say(f"vicl-fast: {predictor.describe_model()}")
        note = device_note(args.device, device)
        if verbose and note:
            say(f"vicl-fast: device {device} ({note})")

        # 3) Run, target by target; outputs go to the staging folder.
        bar = tqdm(
            total=len(targets) * predictor.stages_per_target,
            desc="vicl-fast predict",
            unit="step",
            disable=not (verbose and sys.stderr.isatty()),
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0,  # steps are whole network stages: show each
        )
        if not bar.disable:
            progress.append(bar.update)
        fractions = []
        for timg, tpath, opath in zip(target_imgs, targets, outs):
            what = f"target {tpath.name}" if batch else "target"
            pred = predictor.predict(timg, threshold=args.threshold, output_intensity=args.output_intensity,
                                     what=what, checked=True)
            secs["read"] += pred.seconds["preprocess"]
            secs["model"] += pred.seconds["model"]
            t = time.perf_counter()
            if pred.foreground_fraction is not None:
                fractions.append(pred.foreground_fraction)
            for w in pred.warnings:
                warnings.append(w)
                say(f"vicl-fast: warning: {w}")
            try:
                save_image(pred.image, stager.path(opath))
                if args.preview is not None:
                    from vicl_fast.preview import save_preview

                    out = np.asanyarray(pred.image.dataobj)
                    save_preview(stager.path(previews[outs.index(opath)]), timg,
                                 labels=out if args.task == "seg" else None,
                                 second=None if args.task == "seg" else out)
            except OSError as exc:
                raise OutputError(f"cannot write the output for {tpath.name}: {exc.strerror or exc}") from None
            secs["write"] += time.perf_counter() - t + pred.seconds["postprocess"]
        bar.close()
        t = time.perf_counter()
        stager.commit()
        secs["write"] += time.perf_counter() - t

    total = time.perf_counter() - t_start
    plan = predictor.plan
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
        "device_note": device_note(args.device, device),
        "model": predictor.describe_model(),
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
    if args.explain:
        from vicl_fast.ops._dispatch import explain_all

        print()
        print(explain_all())
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
        default=None,
        help="checkpoint: ours (.safetensors, vicl_fast.checkpoint) or the authors' (.ckpt); default: the "
        "model shipped with the package (its grid, spacing and cropping unless overridden)",
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
        "--grid", type=int, nargs="+", default=None,
        help="model grid, multiples of 16 (default: the checkpoint's, else 128)",
    )
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="resampling in mm (default: the checkpoint's, else 1.0)")
    p.add_argument(
        "--no-crop",
        dest="crop",
        action="store_false",
        default=None,
        help="fit the whole field of view into the grid instead of the head/brain bounding box",
    )
    p.add_argument(
        "--skull-strip",
        choices=("auto", "no"),
        default="auto",
        help="auto: a target showing much more head than its contexts (a skull that brain-extracted "
        "contexts lack) keeps only its brain, and says so; no: never (default auto)",
    )
    p.add_argument(
        "--scales", type=float, nargs="+", default=None, metavar="S",
        help="seg: also predict on grids S times finer over the same field of view and average each label's "
        "probability (e.g. 1 1.25); default: the checkpoint's (the shipped model: 1), else 1",
    )
    p.add_argument(
        "--mirror", choices=("yes", "no"), default=None,
        help="also predict the left-right mirror image and average the two (twice the model time); "
        "default: the checkpoint's (the shipped model: yes), else no",
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
    p = sub.add_parser("info", help="report the compiled / CUDA / Triton / oneDNN / xformers backends")
    p.add_argument("--explain", action="store_true",
                   help="every backend of every op: usable or not on this machine, and why")
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
    except ViclFastError as exc:  # UsageError (2) and every input / model / output / device / memory error
        _err(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the console never shows a raw traceback
        if is_oom(exc):
            _err("out of memory: try --mini-context 1, a smaller --grid, or --device cpu")
            return EXIT_OOM
        if os.environ.get("VICL_FAST_DEBUG", "0") == "1":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _err(f"internal error: {type(exc).__name__}: {first} (set VICL_FAST_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":  # python -m vicl_fast.cli
    sys.exit(main())
