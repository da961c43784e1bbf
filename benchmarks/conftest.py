"""Shared configuration of the benchmark suites (pytest-benchmark).

* ``gpu`` benchmarks are skipped without CUDA; ``slow`` ones (the big cells of
  the grids) unless ``--bench-full`` or ``VICL_FAST_RUNSLOW=1``.
* Benchmarks that set ``benchmark.extra_info["per_item_ms"]`` (with ``table``,
  ``row`` and ``col`` keys) are summarised at the end of the session as one
  markdown table per ``table`` (rows x solver columns, best of the rounds);
  ``VICL_FAST_BENCH_MD=path`` also writes the tables to ``path``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

_RESULTS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="also run the benchmarks marked slow (the largest cells)")


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    full = config.getoption("--bench-full") or os.environ.get("VICL_FAST_RUNSLOW", "0") == "1"
    has_cuda = torch.cuda.is_available()
    # A plain `pytest` (testpaths = tests + benchmarks) must not spend an hour timing models:
    # benchmarks run with --benchmark-only (make bench), or as smoke tests with --benchmark-disable.
    timing = config.getoption("benchmark_only", False) or config.getoption("benchmark_disable", False)
    skip_untimed = pytest.mark.skip(reason="a benchmark: run with --benchmark-only (make bench)")
    skip_slow = pytest.mark.skip(reason="large cell: use --bench-full or VICL_FAST_RUNSLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue  # this hook sees every item of the session; tests/ has its own rules
        if not timing:
            item.add_marker(skip_untimed)
        if "slow" in item.keywords and not full:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture
def record_per_item():
    """Call ``record_per_item(benchmark, table, row, col, n_items)`` after a benchmark run."""

    def record(benchmark, table: str, row: str, col: str, n_items: int) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        best = stats.stats.min  # seconds per call, best round (least disturbed by other load)
        ms = 1e3 * best / max(n_items, 1)
        benchmark.extra_info.update(table=table, row=row, col=col, per_item_ms=ms)
        _RESULTS.append({"table": table, "row": row, "col": col, "ms": ms})

    return record


def _markdown() -> str:
    by_table: dict[str, list[dict]] = defaultdict(list)
    for r in _RESULTS:
        by_table[r["table"]].append(r)
    out = []
    for table, rows in by_table.items():
        cols = list(dict.fromkeys(r["col"] for r in rows))
        names = list(dict.fromkeys(r["row"] for r in rows))
        cell = {(r["row"], r["col"]): r["ms"] for r in rows}
        out.append(f"### {table}\n")
        out.append("| " + " | ".join(["case"] + cols) + " |")
        out.append("|" + "---|" * (len(cols) + 1))
        for name in names:
            vals = [f"{cell[(name, c)]:.4g}" if (name, c) in cell else "-" for c in cols]
            out.append("| " + " | ".join([name] + vals) + " |")
        out.append("")
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    md = _markdown()
    terminalreporter.write_sep("=", "per-item times (ms, best round)")
    terminalreporter.write_line(md)
    path = os.environ.get("VICL_FAST_BENCH_MD")
    if path:
        with open(path, "w") as f:
            f.write(md + "\n")
        terminalreporter.write_line(f"written to {path}")
