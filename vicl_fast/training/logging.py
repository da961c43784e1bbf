"""Run logs on rank 0: CSV always, TensorBoard when installed, a tqdm progress bar.

Files in ``out_dir``: ``train.csv`` (step, loss, lr, grad_norm, context size,
seconds per step, ...) and ``val.csv`` (step, loss, dice, psnr and per-task
columns). Columns are fixed when the file is created; on resume the rows after
the resumed step are dropped, so a killed-and-resumed run gives the same CSV
as an uninterrupted one.
"""
from __future__ import annotations

import csv
import logging as _pylogging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["CSVLog", "RunLogger", "setup_console_logging"]

log = _pylogging.getLogger("vicl_fast.training")


def setup_console_logging(is_main: bool) -> None:
    """INFO messages of ``vicl_fast.training`` on stderr, on rank 0 only (others: warnings)."""
    if not log.handlers:
        h = _pylogging.StreamHandler(sys.stderr)
        h.setFormatter(_pylogging.Formatter("[vicl-fast train] %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(_pylogging.INFO if is_main else _pylogging.WARNING)


class CSVLog:
    """Append rows with a fixed header to ``path``; ``truncate_after(step)`` drops later rows."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != self.columns:  # different columns (new config): start a fresh file
                self.path.rename(self.path.with_suffix(".old.csv"))

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(float(r["step"])) <= step]
        if len(keep) != len(rows):
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                w.writerows(keep)
            os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in self.columns})


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


class RunLogger:
    """CSV + optional TensorBoard + tqdm for one run (no-op on ranks other than 0)."""

    TRAIN_COLUMNS = ["step", "loss", "lr", "grad_norm", "context_size", "mini_context", "tasks", "sec_per_step"]

    def __init__(self, out_dir: str | os.PathLike, task_names: Sequence[str], *, enabled: bool, total: int,
                 initial: int, progress: bool, tensorboard: bool,
                 val_metrics: dict[str, Sequence[str]] | None = None):
        self.enabled = enabled
        self.tb = None
        self.bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.train = CSVLog(out / "train.csv", self.TRAIN_COLUMNS)
        # val_metrics: task -> metric names (default: dice for segmentation, psnr otherwise)
        vm = {t: list((val_metrics or {}).get(t) or ["dice" if t == "segmentation" else "psnr"])
              for t in task_names}
        val_cols = ["step", "loss", "dice", "psnr"] + (["ssim"] if any("ssim" in m for m in vm.values()) else [])
        for t in task_names:
            val_cols += [f"{t}/loss"] + [f"{t}/{m}" for m in vm[t]]
        self.val = CSVLog(out / "val.csv", val_cols)
        self.train.truncate_after(initial)
        self.val.truncate_after(initial)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # the tensorboard package is optional: CSV only, said once
                log.info("TensorBoard log off: torch.utils.tensorboard cannot be imported (%s: %s); "
                         "`pip install tensorboard` to enable it, or set train.tensorboard: false. "
                         "CSV logs: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                         out)
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=initial + 1)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                            disable=not sys.stderr.isatty() and os.environ.get("VICL_FAST_PROGRESS") != "1")

    def log_train(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.train.write(row)
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "context_size"):
                if isinstance(row.get(k), (int, float)):
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def log_val(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.val.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not math.isnan(v):
                    self.tb.add_scalar(f"val/{k}", v, row["step"])
        msg = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                        if k in ("loss", "dice", "psnr", "ssim") and isinstance(v, float) and not math.isnan(v))
        self.write(f"step {row['step']}: validation {msg}")

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"[vicl-fast train] {msg}")
        else:
            log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
