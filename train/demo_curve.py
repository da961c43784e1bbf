"""The demo model's learning curve: colin27 metrics of every weight snapshot of a training run, as a PNG.

    python train/demo_curve.py --run-dir CACHE/runs/demo_64_demo_cpu_v2 \
        --run-dir CACHE/runs/demo_64_demo_cpu_phase2@1000 --out docs/demo_learning_curve.png

Evaluates each ``snapshots/step_*.safetensors`` of the run not yet in ``<run-dir>/colin27_curve.json``
(held-out colin27 on the run's grid, L = 4, ``--draws`` random context draws, every demo task; the protocol of
:mod:`vicl_fast.evaluation`), then draws the curve with the run's own validation (held-out icbm152
copies, ``val.csv``). Snapshots are written by the main job's training every ``min(500, steps/10)``
steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from vicl_fast import evaluation as ev
from vicl_fast.errors import UsageError
from vicl_fast.inference import load_model
from vicl_fast.training.demo_recipe import data_digest, run_folder_grid


_PROTOCOL = "_protocol"  # the key of colin27_curve.json that says what its numbers were measured on


def evaluate_snapshots(run_dir: Path, draws: int, grid: int = 64, last_step: float = float("inf")) -> dict:
    """``{snapshot stem: {task: {metric: [model, copy-the-prompt]}}}`` of the snapshots up to ``last_step``,
    cached in ``colin27_curve.json``; the cache is dropped when the embedded data, its task code or the
    number of draws changed."""
    out = run_dir / "colin27_curve.json"
    protocol = {"data": data_digest(), "draws": draws, "grid": grid}
    curve = json.loads(out.read_text()) if out.exists() else {}
    if curve.pop(_PROTOCOL, None) != protocol:
        curve = {}
    todo = [f for f in sorted((run_dir / "snapshots").glob("step_*.safetensors"))
            if f.stem not in curve and int(f.stem.split("_")[1]) <= last_step]
    if not todo:
        return curve
    target, pool = ev.demo_target(grid), ev.context_pool(grid)
    for f in todo:
        model = load_model(f, "cpu")
        t0 = time.time()
        res = {}
        for i, task in enumerate(ev.DEMO_TASKS):
            p = ev.evaluate_protocol(task, model, target, pool, grid, "cpu", (ev.N_CONTEXTS,), draws, seed=100 + i)
            p = p[str(ev.N_CONTEXTS)]
            res[task.name] = {k: [v["mean"], p["copy_prompt"][k]["mean"]] for k, v in p["model"].items()}
        curve[f.stem] = res
        out.write_text(json.dumps({_PROTOCOL: protocol, **curve}, indent=1))
        print(f"{f.stem}: {time.time() - t0:.0f} s; " + ", ".join(
            f"{t} {k} {v[0]:.3f} (copy {v[1]:.3f})" for t, r in res.items() for k, v in r.items()), flush=True)
    return curve


def _run_arg(text: str) -> tuple[Path, int]:
    path, _, start = text.partition("@")
    return Path(path), int(start or 0)


Series = dict[str, list[tuple[float, float]]]


def collect(runs: list[tuple[Path, int]], draws: int) -> tuple[Series, Series, Series]:
    """``(colin27 Dice, colin27 PSNR, validation)`` series over the phases ``runs`` = ``[(run folder,
    step of the previous phase where it starts)]``: each phase's points up to where the next starts."""
    seg: Series = {}
    gen: Series = {}
    val: Series = {}
    for i, (run_dir, start) in enumerate(runs):
        stop = runs[i + 1][1] if i + 1 < len(runs) else float("inf")  # the next phase takes over there
        curve = evaluate_snapshots(run_dir, draws, grid=run_folder_grid(run_dir), last_step=stop - start)
        steps = {k: start + int(k.split("_")[1]) for k in curve}
        keys = [k for k in curve if steps[k] <= stop]

        def add(into: Series, name: str, task: str, metric: str, which: int) -> None:
            into.setdefault(name, []).extend((steps[k], curve[k][task][metric][which]) for k in keys if task in curve[k])

        for t in ("white_matter", "deep_grey", "hippocampus", "cerebellum"):
            add(seg, t, t, "dice", 0)
        add(seg, "white matter, copy", "white_matter", "dice", 1)
        add(seg, "deep grey, copy", "deep_grey", "dice", 1)
        add(gen, "denoising", "denoising", "psnr", 0)
        add(gen, "bias field", "bias_field", "psnr", 0)
        add(gen, "copy-the-prompt", "denoising", "psnr", 1)
        vp = run_dir / "val.csv"
        phase = f"phase {i + 1}: " if len(runs) > 1 else ""
        if vp.exists():  # each phase validates on its own episodes: one series per phase
            for row in csv.DictReader(vp.open()):
                x = start + float(row["step"])
                if x > stop:
                    continue
                if row.get("dice"):
                    val.setdefault(f"{phase}segmentation Dice", []).append((x, float(row["dice"])))
                if row.get("psnr"):
                    val.setdefault(f"{phase}generation PSNR / 30", []).append((x, float(row["psnr"]) / 30))
    return seg, gen, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=_run_arg, required=True, action="append",
                    help="a run folder; DIR@STEP for a later phase whose step 0 is STEP of the one before "
                         "(e.g. --run-dir RUN1 --run-dir RUN2@1000: phase 2 continues phase 1's step 1,000)")
    ap.add_argument("--out", type=Path, required=True, help="PNG path")
    ap.add_argument("--draws", type=int, default=2)
    args = ap.parse_args()
    try:
        seg, gen, val = collect(args.run_dir, args.draws)
    except UsageError as exc:  # one line, no traceback
        raise SystemExit(f"--run-dir: {exc}") from None
    ev.learning_curve(args.out, [("colin27 (held out), L = 4, on each phase's grid: Dice", seg),
                                 ("colin27, L = 4: PSNR (dB)", gen),
                                 ("validation: held-out icbm152 copies", val)])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
