"""Training of every vicl_fast model: ``vicl-fast train --config CONFIG.yaml``.

One trainer for Neuroverse3D (3D) and every RandP / 2D vICL model, on one CPU,
one GPU or many (``torchrun``). See ``train/README.md`` for the config format
and the data layout.

    >>> from vicl_fast.training import load_config, Trainer
    >>> Trainer(load_config("train/configs/neuroverse3d_tiny_cpu.yaml")).fit()  # doctest: +SKIP
"""
from __future__ import annotations

from vicl_fast.training.config import Config, ConfigError, config_from_dict, load_config

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "Trainer", "main"]


def __getattr__(name: str):
    # The trainer pulls in the models; keep `import vicl_fast.training` light for config checks.
    if name == "Trainer":
        from vicl_fast.training.trainer import Trainer

        return Trainer
    raise AttributeError(name)


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="vicl-fast train",
        description="Train Neuroverse3D or a RandP model from a YAML config (train/README.md). "
                    "Multi-GPU / multi-node: torchrun --nproc-per-node N -m vicl_fast.training --config ...")
    p.add_argument("--config", required=True, help="YAML config (see train/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set train.steps=100 --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--out-dir", help="= --set train.out_dir=...")
    p.add_argument("--resume", help="'auto' (default: latest checkpoint in out_dir), 'none', or a checkpoint folder")
    p.add_argument("--steps", type=int, help="= --set train.steps=...")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="= --set train.device=...")
    p.add_argument("--check", action="store_true",
                   help="check the config and the data folders, print the resolved config, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: ``vicl-fast train`` = ``python -m vicl_fast.training`` = ``python train/train.py``.

    Returns the exit status (0 ok, 2 config/data/checkpoint problem); errors are one clear line.
    """
    import json
    import sys

    args = _parser().parse_args(argv)
    ov = list(args.overrides)
    for key, val in (("train.out_dir", args.out_dir), ("train.resume", args.resume), ("train.steps", args.steps),
                     ("train.device", args.device)):
        if val is not None:
            ov.append(f"{key}={json.dumps(val) if isinstance(val, str) else val}")
    from vicl_fast.training.checkpointing import CheckpointError

    try:
        cfg = load_config(args.config, ov)
        if args.check:
            import yaml

            from vicl_fast.training.config import config_to_dict
            from vicl_fast.training.datasets import build_sources, resolve_tasks

            sources = build_sources(cfg)
            tasks, _ = resolve_tasks(cfg, sources)
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            for s in sources:
                print(f"# dataset {s.name}: {len(s)} subjects")
            print(f"# tasks: {', '.join(t.name for t in tasks)}")
            return 0
        from vicl_fast.training import distributed
        from vicl_fast.training.trainer import Trainer

        try:
            result = Trainer(cfg).fit()
        finally:
            distributed.cleanup()
    except (ConfigError, CheckpointError) as exc:
        print(f"vicl-fast train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vicl-fast train: interrupted; resume with the same command (train.resume=auto)", file=sys.stderr)
        return 130
    best = result["best"]
    print(f"vicl-fast train: done at step {result['step']}; last loss {result['loss']:.4g}"
          + (f", best validation loss {best:.4g}" if best < float("inf") else "")
          + f"; checkpoints in {result['out_dir']}/checkpoints (best/: best validation)")
    return 0
