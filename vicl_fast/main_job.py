"""``make demo``'s main job: in-context inference on the embedded real MRI, end to end.

Run: ``python -m vicl_fast.main_job [--out demo_out/] [--quick] [--device auto|cpu|cuda]
[--retrain] [--cache-dir DIR]``.

What it does, honestly:

1. **Data.** The package embeds TWO real heads (``vicl_fast.data.demo_data``): ``icbm152`` (an
   average of 152 brains, brain-extracted) and ``colin27`` (one person, with skull). Everything
   else is a warped copy of one of them. The model is trained on ``icbm152`` and warped copies
   of it only; the *target* is ``colin27`` (skull-stripped with its own brain mask, because the
   training head has no skull), which the model never sees in training. Contexts are further
   warped copies of ``icbm152`` drawn with another seed (not the training copies). The unwarped
   ``icbm152`` is not used as a context: its atlas labels (AAL: ``deep_grey``) were drawn on
   colin27 and transferred by MNI coordinates, so they are *identical* voxel for voxel to the
   target's and copying them would score a perfect, meaningless Dice.
2. **Model.** A checkpoint shipped in ``vicl_fast/checkpoints/demo_neuroverse3d.safetensors`` if
   present (not in ``--quick``); else a cached one (``--cache-dir``, default
   ``$VICL_FAST_CACHE`` or ``~/.cache/vicl_fast``, keyed by a hash of the training recipe and the
   demo data); else a small Neuroverse3D (``neuroverse3d_tiny``, 1.1 M parameters) is trained with
   the package's trainer (:mod:`vicl_fast.training`) for a few minutes and cached (atomic write).
3. **Tasks** (task synthesis of :mod:`vicl_fast.data.tasks3d`, as in training): segmentation of white
   matter, deep grey matter (caudate, putamen, pallidum, thalamus from the AAL atlas), hippocampus and
   cerebellum; Gaussian denoising (sigma 0.2) and bias-field correction. Every prediction goes through
   the Python API :class:`vicl_fast.inference.Predictor` (the path of ``vicl-fast predict``), at the
   model's grid and scales (its metadata), on volumes at the embedded data's own 96^3 grid (2.25 mm;
   ``--quick``: the model's grid), where every metric is computed. Per task:
   a showcase (context draw 0, L = 4) whose target, context pairs, reference and prediction are
   written as NIfTI with PNG previews; then ``--draws`` random context draws (default 5) from a pool of
   12 warped icbm152 copies for L = 4 (``--full-protocol``: L in {1, 4, 8}), reporting mean and std of
   Dice (segmentation) or PSNR/SSIM (generation) for the model and for RandP Table 2's
   copy-the-prompt baseline (the first context's output used as the prediction), the shipped model's
   targets (:data:`TARGETS`) met or not, the showcase's wall time and peak memory (CUDA
   ``max_memory_allocated``; on CPU the peak resident set size above the level before the call,
   sampled every 2 ms), and ``figure.png`` (input, reference, prediction, copy-the-prompt per task).
4. **Outputs** in ``--out``: ``<task>/target_image.nii.gz``, ``target_reference.nii.gz``,
   ``context<i>_image|_label.nii.gz``, ``prediction.nii.gz``, ``copy_prompt.nii.gz``,
   ``*.png``; ``figure.png``, ``summary.json`` and ``summary.md``.

``--quick`` (used by the tests): 32^3 grid, a few dozen training steps, same outputs.
Exit status: 0 ok, 2 usage, 8 output folder not writable, 9 device not available, 1 anything
else (with a one-line message; ``VICL_FAST_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from vicl_fast.data.demo_data import STORED_GRID
from vicl_fast.errors import ViclFastError
from vicl_fast.evaluation import (
    CONTEXT_POOL, CONTEXT_SEED, DEMO_TASKS, FULL_PROTOCOL_L, N_CONTEXTS, N_DRAWS, check_targets, context_pool,
    demo_target, evaluate_protocol, figure, showcase, table,
)
from vicl_fast.training.demo_recipe import (  # noqa: F401 - the recipe API, also reachable from here
    FOV_MM, FULL, QUICK, Recipe, export_bf16, load_recipe, normalised, recipe_key, train_or_load,
)
from vicl_fast.training.demo_recipe import _fmt_s, _say

__all__ = ["Recipe", "FULL", "QUICK", "DEMO_TASKS", "main", "recipe_key", "train_or_load", "run", "MainJobError"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_OUTPUT = 0, 1, 2, 8


class MainJobError(ViclFastError):
    """A problem the user can fix; ``exit_code`` is the process exit status."""


def _default_cache_dir() -> Path:
    env = os.environ.get("VICL_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vicl_fast"


def _check_writable(folder: Path, what: str, flag: str) -> None:
    """Create ``folder`` and write a probe file in it, or raise MainJobError naming the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MainJobError(f"{what} {folder} is not writable ({reason}); choose another folder with {flag}",
                           EXIT_OUTPUT) from None


def run(out: Path, *, quick: bool = False, device: str = "auto", retrain: bool = False,
        cache_dir: Path | None = None, recipe: Recipe | None = None, export: Path | None = None,
        max_train_minutes: float | None = None, full_protocol: bool = False, Ls: Sequence[int] | None = None,
        draws: int | None = None) -> dict[str, Any]:
    """The main job (see the module docstring); returns the summary also written to ``summary.json``."""
    import torch

    t_start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MainJobError(f"--out {out} exists and is not a folder; choose a folder path", EXIT_OUTPUT)
    _check_writable(out, "output folder", "--out")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    try:
        _check_writable(cache, "cache folder", "--cache-dir")
    except MainJobError as exc:
        cache = Path(tempfile.mkdtemp(prefix="vicl_fast_cache_"))
        _say(f"warning: {exc}; the model is trained in {cache} and will NOT be reused next time")
    from vicl_fast.inference import resolve_device

    dev = resolve_device(device)  # DeviceError (exit 9) / UsageError (exit 2)
    custom = recipe is not None
    recipe = recipe or (QUICK if quick else FULL)

    _say(f"vicl_fast main job{' (--quick)' if quick else ''}: in-context inference on the embedded real MRI")
    _say("  data: TWO real heads only (icbm152 = an average of 152 brains; colin27 = one person); every other "
         "'subject' is a warped copy of one of them. Training: icbm152 + warped copies. Target: colin27 "
         "(never seen in training; skull-stripped with its brain mask, as the training head has no skull). "
         f"Contexts: {N_CONTEXTS} other warped copies of icbm152. Far too few heads for a claim about "
         "generalisation: this shows the system working end to end.")
    _say(f"  device {dev}; outputs in {out}; model cache {cache}")
    _say("[1/3] model")
    ckpt, info = train_or_load(recipe, dev, cache, retrain=retrain, allow_shipped=not quick and not custom,
                               max_train_minutes=max_train_minutes)
    grid = int(info.get("grid", recipe.grid))  # the model's
    # Targets, contexts and metrics at the embedded data's own resolution (the model's output goes back to
    # it as `vicl-fast predict` writes it back onto a scan's grid); --quick stays on its small grid.
    data_grid = grid if quick else STORED_GRID
    if export is not None:
        _say(f"  exported the weights in bfloat16 to {export_bf16(ckpt, Path(export), info)}")

    from vicl_fast.inference import load_model

    Ls = tuple(Ls) if Ls else ((N_CONTEXTS,) if not full_protocol else FULL_PROTOCOL_L)
    draws = int(draws if draws is not None else (2 if quick else N_DRAWS))
    _say(f"[2/3] predicting {len(DEMO_TASKS)} tasks through vicl_fast.inference (the path of `vicl-fast "
         f"predict`) with the model at {grid}^3 ({FOV_MM / grid:.2f} mm), scored at {data_grid}^3 "
         f"({FOV_MM / data_grid:.2f} mm): {draws} random context draws for L in "
         f"{{{', '.join(map(str, Ls))}}} from {CONTEXT_POOL} warped icbm152 copies")
    model = load_model(ckpt, dev)
    trained = model.preprocessing or {}  # how the Predictor runs it by default (scales, mirror)
    target = demo_target(data_grid)
    pool = context_pool(data_grid, max(CONTEXT_POOL, max(Ls)))
    rows = []
    for i, task in enumerate(DEMO_TASKS):
        r = showcase(task, model, target, pool, grid, dev, out, seed=100 + i)
        t0 = time.perf_counter()
        r["protocol"] = evaluate_protocol(task, model, target, pool, grid, dev, Ls, draws, seed=100 + i,
                                          showcase_prediction=r["figure"]["prediction"])
        p = r["protocol"][str(Ls[0] if N_CONTEXTS not in Ls else N_CONTEXTS)]
        m = ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f} (copy {p['copy_prompt'][k]['mean']:.3f})"
                      for k, v in p["model"].items())
        _say(f"  {task.name:13s} {m}; {r['wall_s']:.2f} s per prediction, peak {r['peak_mem_mb']:.0f} MB; "
             f"protocol {time.perf_counter() - t0:.1f} s")
        rows.append(r)

    _say("[3/3] summary")
    fig = figure(out / "figure.png", rows)
    for r in rows:
        r.pop("figure")
    targets = check_targets(rows) if str(N_CONTEXTS) in rows[0]["protocol"] else []
    lref = str(N_CONTEXTS) if str(N_CONTEXTS) in rows[0]["protocol"] else str(Ls[0])
    beats = [r["task"] for r in rows
             if all(v["mean"] > r["protocol"][lref]["copy_prompt"][k]["mean"] for k, v in r["protocol"][lref]["model"].items())]
    notes = [
        "Two real heads only: the target colin27 is a different person from the training/context head "
        "icbm152 (an average template), but one target is one data point.",
        f"Contexts: L warped copies of icbm152 (seed {CONTEXT_SEED}, not the training copies) drawn at random "
        f"from a pool of {CONTEXT_POOL}, {draws} draws per L (mean ± std over draws). The unwarped icbm152 is "
        "not a context: its AAL-derived labels (deep_grey) are colin27's own atlas read at the same MNI "
        "coordinates, so copying them would give Dice 1.0.",
        "copy-the-prompt = the first context's output used as the prediction (RandP Table 2).",
        "Generation metrics are on the percentile-normalised [0, 1] scale that `vicl-fast predict` uses.",
        f"Peak memory (showcase prediction): {rows[0]['peak_mem_kind']}." if rows else "",
        f"The model beats copy-the-prompt (mean, L = {lref}) on: {', '.join(beats) if beats else 'no task'}.",
    ]
    summary = {
        "quick": quick, "device": dev, "torch": torch.__version__, "grid": grid,
        "spacing_mm": FOV_MM / grid, "scored_grid": data_grid,
        "segmentation_scales": list(trained.get("segmentation_scales") or [1.0]),
        "mirror_tta": bool(trained.get("mirror_tta", False)),
        "target": "colin27 (skull-stripped with its brain mask)",
        "contexts": [s.name for s in pool[:N_CONTEXTS]], "context_pool": [s.name for s in pool],
        "draws": draws, "L": list(Ls), "model": info, "tasks": rows, "targets": targets,
        "figure": str(fig.relative_to(out)), "notes": [n for n in notes if n],
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    lines = table(rows)
    for ln in lines:
        _say("  " + ln)
    tlines = ["| target (L = 4, mean over draws) | wanted | measured | met |", "|---|---|---|---|"]
    tlines += [f"| {t['task']} {t['what']} | {t['wanted']} | {t['measured']:.4f} | {'yes' if t['met'] else 'NO'} |"
               for t in targets]
    if targets:
        for ln in tlines:
            _say("  " + ln)
    for n in summary["notes"]:
        _say("  - " + n)
    from vicl_fast.data.io import atomic_write

    with atomic_write(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = [f"# vicl_fast main job{' (quick)' if quick else ''}", "",
          f"Model: {info['source']} `{Path(info['path']).name}` ({info.get('trained_on', '')}, grid {grid}^3 scored at "
          f"{data_grid}^3, segmentation scales {summary['segmentation_scales']}"
          f"{', averaged with its left-right mirror image' if summary['mirror_tta'] else ''}, "
          f"{info.get('steps', '?')} steps, {info.get('train_seconds', '?')} s training on "
          f"{info.get('device', '?')}{'; PARTIAL: stopped at the --max-train-minutes limit' if info.get('partial') else ''}"
          f"). Device: {dev}. Target: colin27; contexts: L of "
          f"{', '.join(summary['context_pool'])}.", "", *lines, "", *(tlines + [""] if targets else []),
          f"![predictions]({summary['figure']})", "", *[f"- {n}" for n in summary["notes"]], ""]
    with atomic_write(out / "summary.md") as tmp:
        Path(tmp).write_text("\n".join(md))
    _say(f"  wrote {out / 'summary.json'}, {out / 'summary.md'} and per-task NIfTI/PNG folders; "
         f"total {_fmt_s(summary['total_seconds'])}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vicl_fast.main_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--quick", action="store_true", help="tiny grid (32^3), a few training steps (seconds)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--retrain", action="store_true",
                   help="train the model again (ignore the shipped and the cached checkpoints)")
    p.add_argument("--cache-dir", default=None,
                   help="model cache (default $VICL_FAST_CACHE or ~/.cache/vicl_fast)")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="train with this recipe (keys of vicl_fast.main_job.Recipe), e.g. "
                        "train/configs/demo_gpu.yaml; the shipped checkpoint is then not used")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="also write the model's weights in bfloat16 to PATH (e.g. "
                        "vicl_fast/checkpoints/demo_neuroverse3d.safetensors to ship it)")
    p.add_argument("--max-train-minutes", type=float, default=None, metavar="M",
                   help="stop training after M minutes (checkpointed: the same command continues it); "
                        "the model so far is evaluated and exported, marked partial")
    p.add_argument("--full-protocol", action="store_true",
                   help=f"evaluate at every L in {FULL_PROTOCOL_L} (default: L = {N_CONTEXTS} only), "
                        f"{N_DRAWS} context draws each")
    p.add_argument("--draws", type=int, default=None, metavar="N",
                   help=f"random context draws per task and L (default {N_DRAWS}; --quick: 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok; errors print one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        print("vicl_fast.main_job: error: --max-train-minutes must be a positive number of minutes",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        recipe = load_recipe(args.recipe) if args.recipe else None
        run(Path(args.out), quick=args.quick, device=args.device, retrain=args.retrain,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None, recipe=recipe,
            export=Path(args.export) if args.export else None, max_train_minutes=args.max_train_minutes,
            full_protocol=args.full_protocol, draws=args.draws)
    except ViclFastError as exc:  # MainJobError and every error of the inference path, with its exit code
        print(f"vicl_fast.main_job: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vicl_fast.main_job: interrupted (an interrupted training run resumes next time)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get("VICL_FAST_DEBUG", "0") == "1":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"vicl_fast.main_job: error: {type(exc).__name__}: {first} (VICL_FAST_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

