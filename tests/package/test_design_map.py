"""docs/design.md's module map matches the tree: every module is listed, every listed file exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _map_block() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## Module map"):]
    return section[section.index("```") + 3:].split("```", 1)[0]


def test_every_module_is_in_the_map():
    block = _map_block()
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.(?:py|cpp|cu)\b", block))
    missing = []
    for f in sorted((ROOT / "vicl_fast").rglob("*.py")):
        if "__pycache__" in f.parts or f.name in ("__init__.py", "__main__.py") and f.parent.name != "vicl_fast":
            continue
        if f.name not in names:
            missing.append(str(f.relative_to(ROOT)))
    for f in sorted((ROOT / "csrc").rglob("*")):
        if f.suffix in (".cpp", ".cu") and f.name not in names:
            missing.append(str(f.relative_to(ROOT)))
    assert not missing, f"modules missing from docs/design.md's module map: {missing}"


def test_every_listed_file_exists():
    block = _map_block()
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*\.(?:py|cpp|cu|sh)\b", block))
    folders = ("vicl_fast", "csrc", "tools", "benchmarks", "train")
    present = {f.name for d in folders for f in (ROOT / d).rglob("*")}
    present |= {f.name for f in ROOT.iterdir()}
    stale = sorted(n for n in names if n not in present)
    assert not stale, f"docs/design.md lists files that do not exist: {stale}"


def test_readme_links_the_map_instead_of_copying_it():
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md" in readme
    assert "vicl_fast/_ext.py            loads" not in readme  # the old second map
