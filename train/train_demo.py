"""Train the demo checkpoint in a run folder named after the recipe file (not after a hash of the code:
the main job's cache key hashes the data code, so an edit there would start a new run): the command to
continue the same run across sessions, then to export the checkpoint to ship.

    OMP_NUM_THREADS=1 python train/train_demo.py --cache-dir ~/.cache/vicl_fast --minutes 120
    python train/train_demo.py --cache-dir ~/.cache/vicl_fast --export vicl_fast/checkpoints/demo_neuroverse3d.safetensors

The default recipe is phase 3 of the shipped model (``train/configs/demo_cpu_phase3.yaml``, exported at
its final step), which starts from phase 2's committed weights (``demo_cpu_phase2.yaml`` to step 3,150,
exported with ``--snapshot 3150``), which start from phase 1's (``demo_cpu.yaml`` to step 1,000, run
``demo_cpu_v2``).
Checkpoints every 250 steps and a weights snapshot every ``min(500, steps / 10)`` (``train/demo_curve.py``
turns those into the learning curve); ``tools/pack_resume.py`` packs the latest checkpoint small enough
to commit."""

from __future__ import annotations

import argparse
from pathlib import Path

from vicl_fast.training import demo_recipe as dr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(Path(__file__).parent / "configs" / "demo_cpu_phase3.yaml"))
    ap.add_argument("--run", default=None, help="run folder name under CACHE/runs (default: the recipe's "
                    "file name; phase 1 of the shipped model was run demo_cpu_v2)")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vicl_fast").expanduser())
    ap.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes")
    ap.add_argument("--export", type=Path, default=None, help="after training, write the bf16 checkpoint here")
    ap.add_argument("--snapshot", type=int, default=None, help="with --export: export the weights snapshot of "
                    "this step (CACHE/runs/demo_64_RUN/snapshots/step_STEP.safetensors) instead of the last step")
    args = ap.parse_args()
    recipe = dr.load_recipe(args.recipe)
    run = args.run or Path(args.recipe).stem
    ckpt = args.cache_dir / f"{run}.safetensors"
    meta = dr._read_demo_meta(ckpt) if ckpt.is_file() else {}
    if meta.get("steps") == recipe.steps and not meta.get("partial"):  # finished (its checkpoints are gone)
        path, info = ckpt, {"source": "cache", **meta}
        print(f"run {run} is complete ({recipe.steps} steps): {ckpt}")
    else:
        path, info = dr._train(recipe, "cpu", args.cache_dir, ckpt, key=run, fresh=False, max_minutes=args.minutes)
    if args.export is not None and not info.get("partial"):
        # the metadata names the recipe by its content hash (the run folder is named after the file)
        pre = dr.preprocessing_metadata(recipe, dr.recipe_key(recipe))
        if args.snapshot is not None:
            path = dr.run_folder(args.cache_dir, recipe, run) / "snapshots" / f"step_{args.snapshot:06d}.safetensors"
            if not path.is_file():
                raise SystemExit(f"--snapshot {args.snapshot}: {path} does not exist")
            info = {**info, "steps": args.snapshot, "snapshot_of": f"{run}, step {args.snapshot} of {recipe.steps}"}
        print(f"exported {dr.export_bf16(path, args.export, info, preprocessing=pre)}")


if __name__ == "__main__":
    main()
