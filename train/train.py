#!/usr/bin/env python
"""Thin entry point: ``python train/train.py --config train/configs/neuroverse3d.yaml``.

Same as ``vicl-fast train ...`` and ``python -m vicl_fast.training ...``; under
torchrun: ``torchrun --nproc-per-node 8 train/train.py --config ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from vicl_fast.training import main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vicl_fast.training import main

if __name__ == "__main__":
    sys.exit(main())
