"""Training checkpoints: atomic, pickle-free, verified on load, resumable bit for bit.

One checkpoint is one folder ``<out_dir>/checkpoints/step_00001200/``:

- ``model.safetensors``: the weights, with the model name and factory kwargs in
  the metadata (the format of :mod:`vicl_fast.checkpoint`, so
  ``vicl_fast.checkpoint.load_checkpoint(".../model.safetensors")`` rebuilds the model);
- ``state.safetensors``: every tensor of the optimizer, scheduler and RNG states;
- ``state.json``: the step, the non-tensor parts of those states (tensors
  referenced by key), the metrics, the config and the SHA-256 of both
  ``.safetensors`` files.

Nothing is unpickled (``torch.load`` is never called), so a checkpoint from an
untrusted source cannot run code. A folder is written under a temporary name
(files fsynced), then renamed: a kill at any moment leaves either the complete
folder or none (leftover ``.tmp-*`` folders are ignored and cleaned). Loading
checks the JSON and the hashes first and refuses a corrupt or truncated
checkpoint with a :class:`CheckpointError` naming the file.

Kept: the last ``keep_last`` step folders, plus ``best/``: a copy (not hard links, so
damage to one file cannot reach the other) of the best validation so far, written
under a temporary name and renamed like a step folder. Files get the mode ``open()``
gives (0o666 minus the umask; safetensors alone would write 0o600).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "save_training_checkpoint", "load_training_checkpoint", "latest_checkpoint",
           "list_checkpoints", "prune_checkpoints", "update_best", "split_tensors", "join_tensors",
           "capture_rng", "restore_rng"]

log = logging.getLogger("vicl_fast.training")

FORMAT = "vicl_fast.training/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; the message names the file and what to do."""


# ------------------------------------------------------------ tensor split
def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list/tuple by ``{"__tensor__": key}`` (tensor -> ``tensors``).

    Tuples become ``{"__tuple__": [...]}`` so that :func:`join_tensors` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint (not JSON/tensor)")


def _key(k: Any) -> Any:
    # dict keys keep their type (optimizer state is keyed by int param ids)
    if isinstance(k, (bool, int, float, str)) or k is None:
        return k
    raise TypeError(f"unsupported dict key type {type(k).__name__}")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} referenced in state.json is missing from state.safetensors")
            return tensors[key]
        if "__dict__" in obj:
            return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and CUDA generator states (tensors and plain types only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((str(n[0]), n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_training_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, *,
                             model_name: str, model_kwargs: dict[str, Any], states: dict[str, Any],
                             meta: dict[str, Any] | None = None) -> Path:
    """Write ``<root>/step_<step>/`` atomically and return its path.

    Args:
        model: the bare model (not the DDP wrapper).
        states: e.g. ``{"optimizer": opt.state_dict(), "scheduler": ..., "rng": capture_rng(), ...}``:
            nested dicts/lists of tensors and JSON scalars.
        meta: JSON-able extras (metrics, config).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={
            "format": "pt", "vicl_fast.model": model_name, "vicl_fast.config": json.dumps(model_kwargs)})
        tensors: dict[str, torch.Tensor] = {}
        tree = split_tensors(states, "s", tensors)
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        from vicl_fast.data.io import default_file_mode

        for f in ("model.safetensors", "state.safetensors"):
            os.chmod(tmp / f, default_file_mode())  # safetensors creates 0o600 whatever the umask
            _fsync_file(tmp / f)
        doc = {"format": FORMAT, "step": int(step), "model": model_name, "model_kwargs": model_kwargs,
               "states": tree, "meta": meta or {},
               "sha256": {f: _sha256(tmp / f) for f in ("model.safetensors", "state.safetensors")}}
        with open(tmp / "state.json", "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, final)  # re-saving the same step (e.g. after a resume) replaces it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing an existing ``final``.

    A directory rename cannot overwrite a non-empty directory, so the old one is
    first renamed aside (a kill in between leaves a complete ``tmp`` and the old
    one, never a half-written ``final``), then deleted.
    """
    old = None
    if final.exists():
        old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step folders under ``root``, sorted by step (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders, and stale temporary folders of this process."""
    root = Path(root)
    for _, p in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def update_best(root: str | os.PathLike, ckpt: Path) -> Path:
    """Make ``<root>/best/`` an independent copy of ``ckpt``, atomically.

    A copy, not hard links: a file damaged in place (or rewritten by a tool that does not
    replace files) in one folder must not damage the other. Written under a temporary name,
    fsynced, then renamed over the old ``best/``.
    """
    root = Path(root)
    best = root / "best"
    tmp = root / f".tmp-best-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in ckpt.iterdir():
            shutil.copy2(f, tmp / f.name)
            _fsync_file(tmp / f.name)
        _fsync_dir(tmp)
        _replace_dir(tmp, best)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return best


def load_training_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read a checkpoint folder.

    Returns:
        ``(doc, model_state_dict, states)``: ``doc`` is ``state.json`` (step, model, meta),
        ``states`` the nested optimizer/scheduler/RNG states with their tensors restored.
    Raises:
        CheckpointError: missing files, unparsable JSON, a hash mismatch (corrupt or
            truncated file) or an unreadable safetensors file.
    """
    p = Path(path)
    fix = (f"delete {p} (or move it away) and resume from an earlier checkpoint, or start a new run "
           "with train.resume=none")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a checkpoint folder")
    sj = p / "state.json"
    if not sj.is_file():
        raise CheckpointError(f"checkpoint {p} has no state.json: it is incomplete; {fix}")
    try:
        doc = json.loads(sj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {p}: state.json is corrupt or truncated ({exc}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {p}: state.json is not a {FORMAT} checkpoint; {fix}")
    for f, digest in doc.get("sha256", {}).items():
        fp = p / f
        if not fp.is_file():
            raise CheckpointError(f"checkpoint {p}: {f} is missing; {fix}")
        actual = _sha256(fp)
        if actual != digest:
            raise CheckpointError(f"checkpoint {p}: {f} is corrupt or truncated (SHA-256 {actual[:12]}... "
                                  f"!= recorded {digest[:12]}..., {fp.stat().st_size} bytes); {fix}")
    try:
        weights = load_file(str(p / "model.safetensors"), device=str(map_location))
        tensors = load_file(str(p / "state.safetensors"), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {p}: cannot read its safetensors files ({type(exc).__name__}: "
                              f"{exc}); {fix}") from None
    states = join_tensors(doc["states"], tensors)
    return doc, weights, states
