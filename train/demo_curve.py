"""The demo model's learning curve: colin27 metrics of every weight snapshot of a training run, as a PNG.

    python train/demo_curve.py --run-dir ~/.cache/vicl_fast/runs/demo_64_<key> --out docs/demo_learning_curve.png

Evaluates each ``snapshots/step_*.safetensors`` of the run not yet in ``<run-dir>/colin27_curve.json``
(held-out colin27 at 64^3, L = 4, ``--draws`` random context draws, every demo task; the protocol of
:mod:`vicl_fast.evaluation`), then draws the curve with the run's own validation (held-out icbm152
copies, ``val.csv``). Snapshots are written by the main job's training every ``min(500, steps/10)``
steps.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from vicl_fast import evaluation as ev
from vicl_fast.data.demo_data import load_demo_subjects
from vicl_fast.inference import load_model
from vicl_fast.training.demo_recipe import normalised


def evaluate_snapshots(run_dir: Path, draws: int, grid: int = 64) -> dict:
    out = run_dir / "colin27_curve.json"
    curve = json.loads(out.read_text()) if out.exists() else {}
    todo = [f for f in sorted((run_dir / "snapshots").glob("step_*.safetensors")) if f.stem not in curve]
    if not todo:
        return curve
    target = load_demo_subjects(names=["colin27"], size=grid)[0]
    target = normalised(dataclasses.replace(
        target, image=(target.image * target.masks["brain"]).astype(np.float32), has_skull=False))
    pool = [normalised(s) for s in load_demo_subjects(names=["icbm152"], size=grid, n_augmented=ev.CONTEXT_POOL,
                                                      seed=ev.CONTEXT_SEED)[1:]]
    for f in todo:
        model = load_model(f, "cpu")
        t0 = time.time()
        res = {}
        for i, task in enumerate(ev.DEMO_TASKS):
            p = ev.evaluate_protocol(task, model, target, pool, grid, "cpu", (ev.N_CONTEXTS,), draws, seed=100 + i)
            p = p[str(ev.N_CONTEXTS)]
            res[task.name] = {k: [v["mean"], p["copy_prompt"][k]["mean"]] for k, v in p["model"].items()}
        curve[f.stem] = res
        out.write_text(json.dumps(curve, indent=1))
        print(f"{f.stem}: {time.time() - t0:.0f} s; " + ", ".join(
            f"{t} {k} {v[0]:.3f} (copy {v[1]:.3f})" for t, r in res.items() for k, v in r.items()), flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="PNG path")
    ap.add_argument("--draws", type=int, default=2)
    args = ap.parse_args()
    curve = evaluate_snapshots(args.run_dir, args.draws)
    steps = {k: int(k.split("_")[1]) for k in curve}

    def series(task: str, metric: str, which: int) -> list[tuple[float, float]]:
        return [(steps[k], curve[k][task][metric][which]) for k in curve if task in curve[k]]

    seg = {t: series(t, "dice", 0) for t in ("white_matter", "deep_grey", "hippocampus", "cerebellum")}
    seg["white matter, copy"] = series("white_matter", "dice", 1)
    seg["deep grey, copy"] = series("deep_grey", "dice", 1)
    gen = {"denoising": series("denoising", "psnr", 0), "bias field": series("bias_field", "psnr", 0),
           "copy-the-prompt": series("denoising", "psnr", 1)}
    val: dict[str, list[tuple[float, float]]] = {"segmentation Dice": [], "generation PSNR / 30": []}
    vp = args.run_dir / "val.csv"
    if vp.exists():
        for row in csv.DictReader(vp.open()):
            if row.get("dice"):
                val["segmentation Dice"].append((float(row["step"]), float(row["dice"])))
            if row.get("psnr"):
                val["generation PSNR / 30"].append((float(row["step"]), float(row["psnr"]) / 30))
    ev.learning_curve(args.out, [("colin27 (held out), L = 4: Dice", seg), ("colin27, L = 4: PSNR (dB)", gen),
                                 ("validation: held-out icbm152 copies", val)])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
