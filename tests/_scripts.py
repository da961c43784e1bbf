"""The repository's scripts (tools/, train/) as modules for tests: they are files, not package modules.

Importable from every test folder as ``from tests._scripts import load_script``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """``REPO/relpath`` (e.g. ``"tools/pack_resume.py"``) imported as a module named after its stem and
    registered in ``sys.modules`` (dataclasses and pickling look their module up there)."""
    name = Path(relpath).stem
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
