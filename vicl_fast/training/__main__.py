"""``python -m vicl_fast.training --config CONFIG.yaml`` (also under ``torchrun``)."""
from __future__ import annotations

import sys

from vicl_fast.training import main

if __name__ == "__main__":
    sys.exit(main())
