"""Pack a training checkpoint folder small enough to commit, and unpack it back (continue a run later).

    python tools/pack_resume.py pack   RUN/checkpoints/step_00003000  train/resume/demo_cpu_v2
    python tools/pack_resume.py unpack train/resume/demo_cpu_v2       RUN/checkpoints/step_00003000

Packing keeps the model weights exactly (float32) and stores Adam's moment estimates (``exp_avg``,
``exp_avg_sq``) in bfloat16: 35 MB instead of 53 MB for the demo model. Unpacking casts them back
and rewrites the checkpoint's sha256 so that :func:`vicl_fast.training.checkpointing.load_training_checkpoint`
accepts it; the resumed run then differs from an uninterrupted one by the moments' rounding only.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vicl_fast.training.checkpointing import _sha256  # the digest load_training_checkpoint verifies

PACKED = "state_bf16.safetensors"


def _moment(key: str) -> bool:
    return key.endswith(".exp_avg") or key.endswith(".exp_avg_sq")


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "model.safetensors", dst / "model.safetensors")
    shutil.copy2(src / "state.json", dst / "state.json")
    state = load_file(str(src / "state.safetensors"))
    save_file({k: (v.to(torch.bfloat16) if _moment(k) and v.dtype == torch.float32 else v) for k, v in state.items()},
              str(dst / PACKED))
    print(f"packed {src} -> {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 2**20:.1f} MiB)")


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "model.safetensors", dst / "model.safetensors")
    state = load_file(str(src / PACKED))
    save_file({k: (v.float() if _moment(k) else v) for k, v in state.items()}, str(dst / "state.safetensors"))
    doc = json.loads((src / "state.json").read_text())
    doc["sha256"] = {f: _sha256(dst / f) for f in doc.get("sha256", {})}
    (dst / "state.json").write_text(json.dumps(doc, indent=1))
    print(f"unpacked {src} -> {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args()
    (pack if a.action == "pack" else unpack)(a.src, a.dst)


if __name__ == "__main__":
    main()
