"""Train the demo checkpoint with ``train/configs/demo_cpu.yaml`` in a run folder whose name does not
depend on the code (the main job's cache key hashes the data code, so an edit there would start a
new run): the command to continue the same run across sessions, then to export the checkpoint to ship.

    OMP_NUM_THREADS=1 python train/train_demo.py --cache-dir ~/.cache/vicl_fast --minutes 120
    python train/train_demo.py --cache-dir ~/.cache/vicl_fast --export vicl_fast/checkpoints/demo_neuroverse3d.safetensors

Checkpoints every 250 steps and a weights snapshot every 500 (``train/demo_curve.py`` turns those into
the learning curve); ``tools/pack_resume.py`` packs the latest checkpoint small enough to commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vicl_fast.training import demo_recipe as dr

RUN_KEY = "demo_cpu_v2"  # the run of the shipped model (v1: stopped, inputs not normalised as at inference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(Path(__file__).parent / "configs" / "demo_cpu.yaml"))
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/vicl_fast").expanduser())
    ap.add_argument("--minutes", type=float, default=None, help="stop (checkpointed) after this many minutes")
    ap.add_argument("--export", type=Path, default=None, help="after training, write the bf16 checkpoint here")
    args = ap.parse_args()
    recipe = dr.load_recipe(args.recipe)
    ckpt = args.cache_dir / f"{RUN_KEY}.safetensors"
    path, info = dr._train(recipe, "cpu", args.cache_dir, ckpt, key=RUN_KEY, fresh=False, max_minutes=args.minutes)
    if args.export is not None and not info.get("partial"):
        print(f"exported {dr.export_bf16(path, args.export, info)}")


if __name__ == "__main__":
    main()
