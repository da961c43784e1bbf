"""``make demo``'s main job: in-context inference on the embedded real MRI, end to end.

Run: ``python -m vicl_fast.main_job [--out demo_out/] [--quick] [--device auto|cpu|cuda]
[--retrain] [--cache-dir DIR]``.

What it does, honestly:

1. **Data.** The package embeds TWO real heads (``vicl_fast.data.demo_data``): ``icbm152`` (an
   average of 152 brains, brain-extracted) and ``colin27`` (one person, with skull). Everything
   else is a warped copy of one of them. The model is trained on ``icbm152`` and warped copies
   of it only; the *target* is ``colin27`` (skull-stripped with its own brain mask, because the
   training head has no skull), which the model never sees in training. Contexts are further
   warped copies of ``icbm152`` drawn with another seed (not the training copies). The unwarped
   ``icbm152`` is not used as a context: its atlas labels (AAL: ``deep_grey``) were drawn on
   colin27 and transferred by MNI coordinates, so they are *identical* voxel for voxel to the
   target's and copying them would score a perfect, meaningless Dice.
2. **Model.** A checkpoint shipped in ``vicl_fast/checkpoints/demo_neuroverse3d.safetensors`` if
   present (not in ``--quick``); else a cached one (``--cache-dir``, default
   ``$VICL_FAST_CACHE`` or ``~/.cache/vicl_fast``, keyed by a hash of the training recipe and the
   demo data); else a small Neuroverse3D (``neuroverse3d_tiny``, 1.1 M parameters) is trained with
   the package's trainer (:mod:`vicl_fast.training`) for a few minutes and cached (atomic write).
3. **Tasks** (task synthesis of :mod:`vicl_fast.data.tasks3d`, as in training): segmentation of white
   matter, deep grey matter (caudate, putamen, pallidum, thalamus from the AAL atlas), hippocampus and
   cerebellum; Gaussian denoising (sigma 0.2) and bias-field correction. Every prediction goes through
   the Python API :class:`vicl_fast.inference.Predictor` (the path of ``vicl-fast predict``). Per task:
   a showcase (context draw 0, L = 4) whose target, context pairs, reference and prediction are
   written as NIfTI with PNG previews; then ``--draws`` random context draws (default 5) from a pool of
   12 warped icbm152 copies for L = 4 (``--full-protocol``: L in {1, 4, 8}), reporting mean and std of
   Dice (segmentation) or PSNR/SSIM (generation) for the model and for RandP Table 2's
   copy-the-prompt baseline (the first context's output used as the prediction), the shipped model's
   targets (:data:`TARGETS`) met or not, the showcase's wall time and peak memory (CUDA
   ``max_memory_allocated``; on CPU the peak resident set size above the level before the call,
   sampled every 2 ms), and ``figure.png`` (input, reference, prediction, copy-the-prompt per task).
4. **Outputs** in ``--out``: ``<task>/target_image.nii.gz``, ``target_reference.nii.gz``,
   ``context<i>_image|_label.nii.gz``, ``prediction.nii.gz``, ``copy_prompt.nii.gz``,
   ``*.png``; ``figure.png``, ``summary.json`` and ``summary.md``.

``--quick`` (used by the tests): 32^3 grid, a few dozen training steps, same outputs.
Exit status: 0 ok, 2 usage, 8 output folder not writable, 9 device not available, 1 anything
else (with a one-line message; ``VICL_FAST_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vicl_fast.data.task_registry import default_tasks
from vicl_fast.errors import ViclFastError
from vicl_fast.training.datasets import SubjectSource

__all__ = ["Recipe", "FULL", "QUICK", "DEMO_TASKS", "main", "recipe_key", "train_or_load", "run"]

#: Bump when the meaning of a recipe changes (invalidates every cached model).
RECIPE_VERSION = 1
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_OUTPUT, EXIT_DEVICE = 0, 1, 2, 8, 9
FOV_MM = 216.0  # the embedded data's field of view (96 voxels of 2.25 mm)
SHIPPED_NAME = "demo_neuroverse3d.safetensors"
_META_KEY = "vicl_fast.demo"


class MainJobError(ViclFastError):
    """A problem the user can fix; ``exit_code`` is the process exit status."""


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """How the demo model is trained (every field goes into the cache key).

    Attributes:
        grid: cubic model grid (multiple of 16); the 216 mm field of view at ``216 / grid`` mm.
        steps: optimisation steps (batch 1).
        train_variants: warped copies of icbm152 added to it for training (seed 0).
        context: ``(min, max, mini_context)`` of the context size L drawn per step.
        seg_masks: structures the segmentation tasks are drawn from (the demo asks wm, deep_grey).
        tasks: ``(name, rate, weight)`` (Neuroverse3D Table 3 weights: segmentation 50).
    """

    grid: int
    steps: int
    train_variants: int
    lr: float
    warmup: int
    grad_clip: float
    context: tuple[int, int, int]
    seg_masks: tuple[str, ...]
    tasks: tuple[tuple[str, float, float], ...]
    seed: int = 0
    model: str = "neuroverse3d_tiny"
    channels: tuple[int, ...] | None = None  # None: the model's default (tiny: 4..64)
    crop: int | None = None  # train on random crop^3 windows of the grid (the model is fully convolutional)
    batch: int = 1  # episodes per step (on a CPU batch 2 costs about what batch 1 does: oneDNN convs)

    @property
    def spacing(self) -> float:
        return FOV_MM / self.grid


# Restricted to the structures the demo asks for: with the whole mask set the model does not get past
# predicting a blurred mean in a few CPU minutes (measured: Dice 0 on white matter after 300 steps).
_SEG_MASKS = ("wm", "deep_grey")
_TASKS = default_tasks(3, ("segmentation", "gaussian_noise"))  # Table 3 rates and weights (the registry)
# Twice the tiny model's width (4.4 M parameters): the 4..64 tiny model stayed at a constant output
# within the CPU budget; this one learns white matter and denoising in ~500 steps at 32^3.
_CHANNELS = (8, 16, 32, 64, 128)

#: The default recipe: about 4 minutes on a 2-core CPU (measured 217 s of training on a shared machine).
FULL = Recipe(grid=32, steps=500, train_variants=8, lr=2e-3, warmup=25, grad_clip=1.0, context=(1, 3, 3),
              seg_masks=_SEG_MASKS, tasks=_TASKS, channels=_CHANNELS)
#: ``--quick``: seconds; for tests and smoke runs (same model, a few steps: not a useful model).
QUICK = Recipe(grid=32, steps=16, train_variants=3, lr=2e-3, warmup=4, grad_clip=1.0, context=(1, 2, 2),
               seg_masks=_SEG_MASKS, tasks=_TASKS, channels=_CHANNELS)


@dataclass(frozen=True)
class DemoTask:
    """One demo task: a tasks3d spec on the target and the contexts."""

    name: str
    kind: str  # "seg" | "gen"
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    what: str = ""


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("white_matter", "seg", "segmentation", {"source": "mask", "name": "wm"},
             "white matter (tissue map)"),
    DemoTask("deep_grey", "seg", "segmentation", {"source": "mask", "name": "deep_grey"},
             "deep grey matter: caudate+putamen+pallidum+thalamus (AAL atlas)"),
    DemoTask("hippocampus", "seg", "segmentation", {"source": "mask", "name": "hippocampus"},
             "hippocampus (AAL atlas)"),
    DemoTask("cerebellum", "seg", "segmentation", {"source": "mask", "name": "cerebellum"},
             "cerebellum (AAL atlas)"),
    DemoTask("denoising", "gen", "gaussian_noise", {"sigma": 0.2}, "Gaussian denoising, sigma 0.2"),
    DemoTask("bias_field", "gen", "bias_field", {}, "bias-field correction (random Legendre field)"),
)
N_CONTEXTS = 4  # L of the showcase (files, previews) and of the targets
CONTEXT_SEED = 1  # warped copies for the contexts: another seed than the training copies (0)
CONTEXT_POOL = 12  # warped copies of icbm152 the context draws pick from
N_DRAWS = 5  # random context draws per task and L (RandP's protocol: mean and std)
FULL_PROTOCOL_L = (1, 4, 8)  # --full-protocol: every L of the shipped model's report


def _data_digest() -> str:
    """Hash of the embedded heads and of the code that turns them into training pairs (a change of the
    augmentation or the task synthesis changes what a recipe trains on, so it invalidates the cache)."""
    h = hashlib.sha256()
    files = resources.files("vicl_fast.data")
    for name in ("demo_icbm152.npz", "demo_colin27.npz", "demo_data.py", "augment.py", "tasks3d.py",
                 "task_registry.py", "resample.py"):
        h.update((files / name).read_bytes())
    return h.hexdigest()


def recipe_key(recipe: Recipe) -> str:
    """16 hex digits identifying ``recipe`` + the embedded data + :data:`RECIPE_VERSION`."""
    doc = {"recipe": dataclasses.asdict(recipe), "version": RECIPE_VERSION, "data": _data_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A :class:`Recipe` from a YAML file whose keys are its fields (e.g. ``train/configs/demo_gpu.yaml``);
    missing keys take :data:`FULL`'s values. ``tasks`` is a list of ``{name, rate, weight}``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MainJobError(f"--recipe {p}: file not found", EXIT_USAGE)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MainJobError(f"--recipe {p} is not valid YAML: {exc}", EXIT_USAGE) from None
    names = [f.name for f in dataclasses.fields(Recipe)]
    if not isinstance(raw, dict) or any(k not in names for k in raw):
        bad = [k for k in raw if k not in names] if isinstance(raw, dict) else raw
        raise MainJobError(f"--recipe {p}: unknown key(s) {bad}; allowed: {', '.join(names)}", EXIT_USAGE)
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "tasks":
            v = tuple((str(t["name"]), float(t.get("rate", 1.0)), float(t.get("weight", 1.0))) for t in v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    r = dataclasses.replace(FULL, **kw)
    if r.grid <= 0 or r.grid % 16:
        raise MainJobError(f"--recipe {p}: grid must be a positive multiple of 16, got {r.grid}", EXIT_USAGE)
    return r


def preprocessing_metadata(recipe: Recipe, key: str) -> dict[str, Any]:
    """How the demo model's training data were prepared (:data:`vicl_fast.checkpoint.PREPROCESSING_KEY`):
    what :class:`vicl_fast.inference.Predictor` predicts with by default."""
    ch = f"channels {'..'.join(map(str, (recipe.channels[0], recipe.channels[-1])))}" if recipe.channels else "tiny"
    return {
        "grid": [recipe.grid] * 3,
        "spacing": [round(recipe.spacing, 6)] * 3,
        "crop": True,  # real scans: fit the head's bounding box (the training heads fill the field of view)
        "intensity": "percentiles 0.02 / 0.98 -> [0, 1], clipped",
        "description": f"Neuroverse3D ({recipe.model}, {ch}) trained by vicl_fast's trainer",
        "tasks": [{"name": n, "rate": r, "weight": w} for n, r, w in recipe.tasks],
        "segmentation_structures": list(recipe.seg_masks),
        "training_data": f"icbm152 + {recipe.train_variants} warped copies (embedded demo MRI, brain-extracted "
                         "T1, MNI space)",
        "recipe": dataclasses.asdict(recipe),
        "recipe_hash": key,
        "data_licence": "derived from the MNI ICBM152 2009 template; notice in vicl_fast/data/LICENSE-DATA.txt",
    }


def export_bf16(ckpt: Path, dest: Path, info: dict[str, Any]) -> Path:
    """Write ``ckpt``'s weights in bfloat16 (half the bytes; ``vicl-fast predict`` computes in float32)
    to ``dest`` atomically, with the demo metadata and the preprocessing it was trained with, e.g. as
    ``vicl_fast/checkpoints/demo_neuroverse3d.safetensors`` (the checkpoint shipped with the package)."""
    import torch

    from vicl_fast.checkpoint import PREPROCESSING_KEY, load_checkpoint, save_checkpoint

    model = load_checkpoint(ckpt)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {k: v for k, v in info.items() if k not in ("source", "path")}
    meta["dtype"] = "bfloat16"
    extra = {_META_KEY: json.dumps(meta, default=str)}
    if isinstance(meta.get("recipe"), dict):
        recipe = Recipe(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                           for k, v in meta["recipe"].items()})
        extra[PREPROCESSING_KEY] = json.dumps(preprocessing_metadata(recipe, str(meta.get("key", ""))))
    save_checkpoint(sd, dest, model_name="neuroverse3d", config=model.config, extra_metadata=extra)
    return dest


# ----------------------------------------------------------------------------- utilities


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def _default_cache_dir() -> Path:
    env = os.environ.get("VICL_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vicl_fast"


def _check_writable(folder: Path, what: str, flag: str) -> None:
    """Create ``folder`` and write a probe file in it, or raise MainJobError naming the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MainJobError(f"{what} {folder} is not writable ({reason}); choose another folder with {flag}",
                           EXIT_OUTPUT) from None


def _resolve_device(name: str) -> str:
    """``vicl-fast predict``'s device rules (:func:`vicl_fast.inference.resolve_device`)."""
    from vicl_fast.inference import resolve_device

    return resolve_device(name)  # DeviceError (exit 9) / UsageError (exit 2)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _peak_memory(device: str) -> Iterator[dict[str, Any]]:
    """Peak memory of the enclosed block: CUDA ``max_memory_allocated``, or on CPU the peak RSS above
    the RSS at entry (sampled every 2 ms by a thread; ``ru_maxrss`` growth where /proc is missing)."""
    import torch

    out: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(peak_mb=torch.cuda.max_memory_allocated() / 2**20, kind="cuda max_memory_allocated")
        return
    base = _rss_bytes()
    if base is None:
        import resource

        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield out
        r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        out.update(peak_mb=(r1 - r0) * scale / 2**20, kind="cpu ru_maxrss growth (lower bound)")
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            v = _rss_bytes()
            if v is not None and v > peak[0]:
                peak[0] = v

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        v = _rss_bytes()
        peak[0] = max(peak[0], v or 0)
        import resource

        out.update(peak_mb=(peak[0] - base) / 2**20, kind="cpu peak RSS above start (sampled 2 ms)",
                   process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ----------------------------------------------------------------------------- data


def _normalised(subject):
    """The subject with its image percentile-normalised exactly as ``vicl-fast predict`` does."""
    from vicl_fast.data.preprocess import normalize_intensity

    return dataclasses.replace(subject, image=normalize_intensity(subject.image)[0])


def training_subjects(recipe: Recipe) -> list:
    """icbm152 and ``train_variants`` warped copies of it (seed 0), on the recipe grid, with only the
    recipe's segmentation masks and no label maps (so segmentation tasks are drawn from those)."""
    from vicl_fast.data.demo_data import load_demo_subjects

    subs = load_demo_subjects(names=["icbm152"], size=recipe.grid, n_augmented=recipe.train_variants,
                              seed=recipe.seed)
    keep = set(recipe.seg_masks)
    return [dataclasses.replace(_normalised(s), masks={k: v for k, v in s.masks.items() if k in keep},
                                label_maps={}) for s in subs]


class DemoHeadSource(SubjectSource):
    """A training pool of given subjects (here icbm152 + warped copies; colin27 stays unseen).

    Module level (not local) so that DataLoader workers started with spawn/forkserver can pickle it.
    """

    def __init__(self, subjects: Sequence[Any], name: str = "demo_icbm152"):
        self.name = name
        self._subjects = list(subjects)
        self.names = [s.name for s in self._subjects]
        self.has_labels = all(s.masks or s.label_maps for s in self._subjects)
        self.has_skull_masks = False

    def subject(self, i: int):
        return self._subjects[i]


def _training_source(recipe: Recipe) -> DemoHeadSource:
    return DemoHeadSource(training_subjects(recipe))


def _train_config(recipe: Recipe, device: str, out_dir: Path):
    from vicl_fast.training import config_from_dict

    cmin, cmax, mini = recipe.context
    s = recipe.steps
    raw = {
        "model": {"name": recipe.model,
                  "kwargs": {"channels": list(recipe.channels)} if recipe.channels else {}},
        "data": {
            "datasets": [{"name": "demo_icbm152", "path": "demo"}],  # replaced by the held-out split below
            "grid": [recipe.grid] * 3,
            "tasks": [{"name": n, "rate": r, "weight": w} for n, r, w in recipe.tasks],
            "context_phases": [{"from_step": 0, "min": cmin, "max": cmax, "mini_context": mini}],
            "crop": [recipe.crop] * 3 if recipe.crop else None,
            "val_fraction": 0.12,
            "val_episodes": 2 if s <= 1000 else 8,
            "val_context_size": cmax,
            # Episodes do not depend on the worker count (pure function of seed and step): CPU runs keep
            # the two cores for the model, GPU runs synthesise data on the host's cores.
            "num_workers": 0 if device == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1)),
        },
        "optim": {"lr": recipe.lr, "grad_clip": recipe.grad_clip, "schedule": "cosine",
                  "warmup_steps": recipe.warmup, "min_lr": recipe.lr * 0.05},
        "train": {"steps": s, "batch_size": recipe.batch, "seed": recipe.seed, "device": device, "apsp_mode": "scaled",
                  "val_every": s if s <= 1000 else max(100, min(500, s // 10)), "ckpt_every": max(10, min(250, s // 4)),
                  "log_every": max(1, min(50, s // 20)), "keep_last": 1,
                  "out_dir": str(out_dir), "resume": "auto", "progress": False, "tensorboard": False},
    }
    return config_from_dict(raw)


def _shipped_checkpoint() -> Path | None:
    p = Path(str(resources.files("vicl_fast") / "checkpoints" / SHIPPED_NAME))
    return p if p.is_file() else None


def _read_demo_meta(path: Path) -> dict[str, Any]:
    from vicl_fast.checkpoint import read_metadata

    try:
        return json.loads(read_metadata(path).get(_META_KEY, "{}"))
    except (OSError, ValueError) as exc:
        raise MainJobError(f"checkpoint {path} cannot be read ({exc}); delete it or pass --retrain") from None


def train_or_load(recipe: Recipe, device: str, cache_dir: Path, *, retrain: bool = False,
                  allow_shipped: bool = True, max_train_minutes: float | None = None
                  ) -> tuple[Path, dict[str, Any]]:
    """The demo model's checkpoint: shipped, cached, or trained now (then cached).

    Returns ``(path of a vicl_fast safetensors checkpoint, info)`` with ``info["source"]`` in
    ``{"shipped", "cache", "trained"}``, ``info["grid"]`` (the grid the model was trained on) and the
    training time / steps / loss. ``max_train_minutes`` time-boxes the training: a run stopped
    early is saved as ``*_partial.safetensors`` (``info["partial"]``), never as the recipe's cached
    model, and its checkpoints stay in the cache so the same command continues it.
    """
    shipped = _shipped_checkpoint() if allow_shipped and not retrain else None
    if shipped is not None:
        meta = _read_demo_meta(shipped)
        grid = int(meta.get("grid", recipe.grid))
        _say(f"  using the checkpoint shipped with the package: {shipped} "
             f"(trained on {meta.get('trained_on', 'icbm152 variants')}, grid {grid}^3)")
        return shipped, {"source": "shipped", "path": str(shipped), **meta, "grid": grid}

    key = recipe_key(recipe)
    ckpt = cache_dir / f"demo_{recipe.model}_{recipe.grid}_{key}.safetensors"
    if ckpt.is_file() and not retrain:
        meta = _read_demo_meta(ckpt)
        if meta.get("key") == key:
            _say(f"  reusing the cached model {ckpt}\n"
                 f"  (trained {meta.get('date', '?')} in {_fmt_s(float(meta.get('train_seconds', 0)))}, "
                 f"{meta.get('steps')} steps; --retrain trains it again)")
            return ckpt, {"source": "cache", "path": str(ckpt), **meta}
        _say(f"  cached file {ckpt} does not carry this recipe's key: training again")
    return _train(recipe, device, cache_dir, ckpt, key, fresh=retrain, max_minutes=max_train_minutes)


def _train(recipe: Recipe, device: str, cache_dir: Path, ckpt: Path, key: str, fresh: bool,
           max_minutes: float | None = None) -> tuple[Path, dict[str, Any]]:
    import torch

    from vicl_fast.checkpoint import save_checkpoint
    from vicl_fast.training.trainer import Trainer

    run_dir = cache_dir / "runs" / f"demo_{recipe.grid}_{key}"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = _train_config(recipe, device, run_dir)
    threads = torch.get_num_threads()
    ch = f" (channels {', '.join(map(str, recipe.channels))})" if recipe.channels else ""
    _say(f"  no shipped or cached model: training {recipe.model}{ch} on icbm152 + {recipe.train_variants} warped "
         f"copies at {recipe.grid}^3 ({recipe.spacing:.2f} mm), {recipe.steps} steps on {device}"
         + (f" ({threads} threads)" if device == "cpu" else ""))
    tasks = ", ".join(f"{n} (rate {r:g}, weight {w:g})" for n, r, w in recipe.tasks)
    _say(f"  tasks: {tasks}; segmentation of {', '.join(recipe.seg_masks)}; context size L in "
         f"[{recipe.context[0]}, {recipe.context[1]}]; Adam {recipe.lr:g}, warm-up + cosine")
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else None
    trainer = Trainer(cfg, sources=[_training_source(recipe)])
    n_par = sum(p.numel() for p in trainer.model.parameters())
    start = trainer.step
    if start:
        _say(f"  resuming an interrupted training run at step {start} ({run_dir})")
    if recipe.steps - start > 1:
        trainer.fit(max_steps=1)  # warm-up step (allocations, first-call overheads): not timed
    t1 = time.perf_counter()
    probe = min(3, recipe.steps - trainer.step)
    if probe > 0:
        trainer.fit(max_steps=probe)
    per_step = (time.perf_counter() - t1) / max(1, probe)
    left = recipe.steps - trainer.step
    _say(f"  {n_par:,} parameters; first steps: {per_step:.2f} s/step -> about {_fmt_s(per_step * left)} "
         f"of training left (the model is cached afterwards: later runs skip this)")
    chunk = max(1, min(500, recipe.steps // 10))
    snapshots = run_dir / "snapshots"  # the weights after every chunk: the learning curve on colin27
    result: dict[str, Any] = {"loss": float("nan"), "val": {}}
    while trainer.step < recipe.steps:
        if deadline is not None and time.monotonic() >= deadline:
            break
        t1 = time.perf_counter()
        before = trainer.step
        result = trainer.fit(max_steps=chunk - trainer.step % chunk, deadline=deadline)
        done = trainer.step - before
        per_step = (time.perf_counter() - t1) / max(1, done)
        if trainer.step % chunk == 0:
            snapshots.mkdir(parents=True, exist_ok=True)
            save_checkpoint(trainer.model, snapshots / f"step_{trainer.step:06d}.safetensors", model_name="neuroverse3d")
        _say(f"  step {trainer.step:4d}/{recipe.steps}  last loss {result['loss']:.4f}  "
             f"elapsed {_fmt_s(time.perf_counter() - t0)}  ETA {_fmt_s(per_step * (recipe.steps - trainer.step))}")
    train_s = time.perf_counter() - t0
    partial = trainer.step < recipe.steps
    if partial:  # time box reached: the model so far, under a name the cache never reuses as complete
        if not result.get("stopped_at_deadline"):  # stopped between chunks: no checkpoint at this step yet
            trainer.save_checkpoint(improved=False)
        ckpt = ckpt.with_name(f"{ckpt.stem}_partial{ckpt.suffix}")
        _say(f"  stopped at the {max_minutes:g}-minute limit after step {trainer.step}/{recipe.steps}; "
             f"the same command continues from {run_dir / 'checkpoints'}")
    val = {k: v for k, v in (result.get("val") or trainer.last_val or {}).items()
           if isinstance(v, float) and math.isfinite(v)}
    meta = {"key": key, "recipe": dataclasses.asdict(recipe), "grid": recipe.grid, "steps": trainer.step,
            "train_seconds": round(train_s, 1), "device": device, "final_loss": result.get("loss"),
            "val_on_held_out_icbm152_copies": val, "trained_on": f"icbm152 + {recipe.train_variants} warped copies",
            "date": time.strftime("%Y-%m-%d %H:%M"), "partial": partial}
    from vicl_fast.checkpoint import PREPROCESSING_KEY

    save_checkpoint(trainer.model, ckpt, model_name="neuroverse3d",  # atomic: temp file + rename
                    extra_metadata={_META_KEY: json.dumps(meta),
                                    PREPROCESSING_KEY: json.dumps(preprocessing_metadata(recipe, key))})
    if not partial:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep only the CSV logs of the run
    _say(f"  trained in {_fmt_s(train_s)}; {'saved (partial)' if partial else 'cached'} as {ckpt}")
    return ckpt, {"source": "trained", "path": str(ckpt), **meta}


# ----------------------------------------------------------------------------- inference


def _demo_pairs(task: DemoTask, target, contexts, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], list]:
    """(target input, reference) and [(context input, context output)] by tasks3d (no augmentation)."""
    from vicl_fast.data.tasks3d import TaskSpec, apply_task

    spec = TaskSpec(task.family, dict(task.params))
    rng = np.random.default_rng(seed)
    tgt = apply_task(spec, target, rng, augment=False)
    ctx = [apply_task(spec, c, rng, augment=False) for c in contexts]
    return tgt, ctx


def _save(path: Path, vol: np.ndarray, affine: np.ndarray, label: bool) -> Path:
    from vicl_fast.data.io import save_nifti

    arr = (vol > 0.5).astype(np.uint8) if label else np.asarray(vol, np.float32)
    save_nifti(arr, affine, path)
    return path


def _nifti(vol: np.ndarray, affine: np.ndarray, label: bool):
    """An in-memory NIfTI image of a demo volume (labels as uint8 0/1, as the files are written)."""
    from vicl_fast.data.io import make_nifti

    return make_nifti((vol > 0.5).astype(np.uint8) if label else np.asarray(vol, np.float32), affine)


def _metrics(kind: str, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from vicl_fast.data.metrics import dice, psnr, ssim

    if kind == "seg":
        return {"dice": dice(pred > 0.5, ref > 0.5)}
    return {"psnr": psnr(np.clip(pred, 0, 1), ref, 1.0), "ssim": ssim(np.clip(pred, 0, 1), ref, 1.0)}


def context_draw(L: int, draw: int, pool: int = CONTEXT_POOL) -> list[int]:
    """Indices of the ``L`` contexts of draw ``draw`` in the pool of warped icbm152 copies (without
    replacement; draw 0 at L = :data:`N_CONTEXTS` is the showcase whose files are written)."""
    if L > pool:
        raise MainJobError(f"L = {L} contexts but the context pool holds {pool}", EXIT_USAGE)
    if draw == 0 and L <= N_CONTEXTS:
        return list(range(L))
    return sorted(np.random.default_rng([CONTEXT_SEED, L, draw]).choice(pool, size=L, replace=False).tolist())


def _predict(model, task: DemoTask, tin: np.ndarray, ctx: Sequence[tuple[np.ndarray, np.ndarray]],
             target, ctx_subjects: Sequence[Any], grid: int, device: str):
    """One in-context prediction through the Python API (:class:`vicl_fast.inference.Predictor`), the
    same path as ``vicl-fast predict``. Returns ``(prediction on the target grid, Prediction)``."""
    from vicl_fast.inference import Predictor

    seg = task.kind == "seg"
    pairs = [(_nifti(ci, s.affine, False), _nifti(co, s.affine, seg)) for (ci, co), s in zip(ctx, ctx_subjects)]
    predictor = Predictor(pairs, task.kind, model, grid=grid, spacing=FOV_MM / grid, crop=False, device=device,
                          mini_context="auto")
    res = predictor.predict(_nifti(tin, target.affine, False))
    return np.asarray(res.image.dataobj, dtype=np.float32), res


def _reference_and_copy(task: DemoTask, tin: np.ndarray, tref: np.ndarray, ctx: Sequence[tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The reference and copy-the-prompt on the scale the prediction is compared on."""
    from vicl_fast.data.preprocess import normalize_intensity

    if task.kind == "seg":
        return tref, ctx[0][1], {}
    # Predictions are in percentile-normalised intensities ([0.02, 0.98] -> [0, 1], the context outputs
    # normalised on their own percentiles, written as [0, 1]): compare on that scale.
    ref = normalize_intensity(tref)[0]
    return ref, normalize_intensity(ctx[0][1])[0], {"noisy_input" if task.family == "gaussian_noise" else "input":
                                                    _metrics("gen", normalize_intensity(tin)[0], ref)}


def _showcase(task: DemoTask, model, target, pool: Sequence[Any], grid: int, device: str, out: Path,
              seed: int) -> dict[str, Any]:
    """Draw 0 at L = N_CONTEXTS, with every input, the prediction and the baselines written as NIfTI + PNG."""
    from vicl_fast.preview import save_preview

    d = out / task.name
    d.mkdir(parents=True, exist_ok=True)
    ctx_subjects = [pool[i] for i in context_draw(N_CONTEXTS, 0)]
    (tin, tref), ctx = _demo_pairs(task, target, ctx_subjects, seed)
    seg = task.kind == "seg"
    aff = target.affine
    files = {"target_image": _save(d / "target_image.nii.gz", tin, aff, False),
             "target_reference": _save(d / "target_reference.nii.gz", tref, aff, seg)}
    cmd = ["predict", "--target", str(files["target_image"])]
    for i, ((ci, co), s) in enumerate(zip(ctx, ctx_subjects), start=1):
        ip = _save(d / f"context{i}_image.nii.gz", ci, s.affine, False)
        lp = _save(d / f"context{i}_label.nii.gz" if seg else d / f"context{i}_output.nii.gz", co, s.affine, seg)
        cmd += ["--context", str(ip), str(lp)]
    pred_path = d / "prediction.nii.gz"
    cmd += ["--task", task.kind, "--out", str(pred_path), "--grid", str(grid), "--spacing", f"{FOV_MM / grid:.6g}",
            "--no-crop"]
    t0 = time.perf_counter()
    with _peak_memory(device) as mem:
        pred, res = _predict(model, task, tin, ctx, target, ctx_subjects, grid, device)
    wall = time.perf_counter() - t0
    from vicl_fast.data.io import save_image

    save_image(res.image, pred_path)
    ref, copy, extra = _reference_and_copy(task, tin, tref, ctx)
    files["copy_prompt"] = _save(d / "copy_prompt.nii.gz", copy, aff, seg)
    files["prediction"] = pred_path
    timg = _nifti(tin, aff, False)
    save_preview(d / "prediction.png", timg, labels=pred.astype(np.uint8) if seg else None,
                 second=None if seg else pred)
    save_preview(d / "reference.png", timg, labels=(tref > 0.5).astype(np.uint8) if seg else None,
                 second=None if seg else tref)
    save_preview(d / "context1.png", _nifti(ctx[0][0], ctx_subjects[0].affine, False),
                 labels=(ctx[0][1] > 0.5).astype(np.uint8) if seg else None, second=None if seg else ctx[0][1])
    files["prediction_png"], files["reference_png"], files["context1_png"] = (
        d / "prediction.png", d / "reference.png", d / "context1.png")
    return {
        "task": task.name, "kind": task.kind, "what": task.what,
        "model": _metrics(task.kind, pred, ref),
        "copy_prompt": _metrics(task.kind, copy, ref),
        **({"extra_baselines": extra} if extra else {}),
        "wall_s": round(wall, 3), "peak_mem_mb": round(float(mem.get("peak_mb", float("nan"))), 1),
        "peak_mem_kind": mem.get("kind", ""), "n_contexts": len(ctx),
        **({"process_peak_rss_mb": round(mem["process_peak_rss_mb"], 1)} if "process_peak_rss_mb" in mem else {}),
        "files": {k: str(v.relative_to(out)) for k, v in files.items()},
        "command": "vicl-fast " + " ".join(a if " " not in a else repr(a) for a in cmd),
        "figure": {"input": tin, "reference": ref, "prediction": pred, "copy": copy},
    }


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": [round(float(x), 5) for x in v]}


def evaluate_protocol(task: DemoTask, model, target, pool: Sequence[Any], grid: int, device: str,
                      Ls: Sequence[int], draws: int, seed: int) -> dict[str, Any]:
    """Model and copy-the-prompt over ``draws`` random context draws per L (mean, std, values)."""
    res: dict[str, Any] = {}
    for L in Ls:
        model_vals: dict[str, list[float]] = {}
        copy_vals: dict[str, list[float]] = {}
        for d in range(draws):
            ctx_subjects = [pool[i] for i in context_draw(L, d, len(pool))]
            (tin, tref), ctx = _demo_pairs(task, target, ctx_subjects, seed + 7919 * d)
            pred, _ = _predict(model, task, tin, ctx, target, ctx_subjects, grid, device)
            ref, copy, _ = _reference_and_copy(task, tin, tref, ctx)
            for k, v in _metrics(task.kind, pred, ref).items():
                model_vals.setdefault(k, []).append(v)
            for k, v in _metrics(task.kind, copy, ref).items():
                copy_vals.setdefault(k, []).append(v)
        res[str(L)] = {"model": {k: _stats(v) for k, v in model_vals.items()},
                       "copy_prompt": {k: _stats(v) for k, v in copy_vals.items()}}
    return res


#: The shipped model's targets on colin27 at L = 4 (issue "a trained model that ships"): metric of
#: the model's mean minus ``copy_margin`` x copy-the-prompt's mean must reach ``at_least``.
TARGETS: tuple[tuple[str, str, float, float], ...] = (
    ("white_matter", "dice", 0.85, 0.0),
    ("deep_grey", "dice", 0.65, 0.0),
    ("deep_grey", "dice", 0.15, 1.0),
    ("denoising", "psnr", 3.0, 1.0),
    ("denoising", "ssim", 1e-9, 1.0),
    ("bias_field", "psnr", 1e-9, 1.0),
    ("bias_field", "ssim", 1e-9, 1.0),
)


def check_targets(rows: Sequence[dict[str, Any]], L: int = N_CONTEXTS) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` with the measured value (mean over draws at ``L``) and whether it is met."""
    by = {r["task"]: r for r in rows}
    out = []
    for task, metric, at_least, margin in TARGETS:
        p = by.get(task, {}).get("protocol", {}).get(str(L))
        if not p:
            continue
        m = p["model"][metric]["mean"]
        c = p["copy_prompt"][metric]["mean"]
        value = m - margin * c
        what = f"{metric} - copy" if margin else metric
        out.append({"task": task, "what": what, "wanted": f">= {at_least:g}" if at_least > 1e-6 else "> 0",
                    "measured": round(value, 4), "met": bool(value >= at_least)})
    return out


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = "| task | metric | L | model (mean ± std) | copy-the-prompt (mean ± std) | draws |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        for L, p in r["protocol"].items():
            for m, st in p["model"].items():
                c = p["copy_prompt"][m]
                lines.append(f"| {r['task']} | {m} | {L} | {st['mean']:.4f} ± {st['std']:.4f} | "
                             f"{c['mean']:.4f} ± {c['std']:.4f} | {len(st['values'])} |")
    return lines


def _figure(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One PNG: per task (rows) the target input, the reference, the prediction and copy-the-prompt (columns),
    a coronal mid-slice each, labels in red over the image."""
    from PIL import Image, ImageDraw

    from vicl_fast.data.io import atomic_write

    tiles = []
    for r in rows:
        f = r["figure"]
        img = f["input"]
        # Segmentation: the coronal slice showing most of the structure; generation: the middle one.
        z = int(np.argmax((f["reference"] > 0.5).sum((0, 2)))) if r["kind"] == "seg" else img.shape[1] // 2
        base = np.clip(np.rot90(img[:, z, :]), 0, 1)
        row = []
        for key in ("input", "reference", "prediction", "copy"):
            if r["kind"] == "seg" and key != "input":
                m = np.rot90(f[key][:, z, :]) > 0.5
                rgb = np.stack([base] * 3, -1)
                rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([1.0, 0.1, 0.1])
            else:
                rgb = np.stack([np.clip(np.rot90(f[key][:, z, :]), 0, 1)] * 3, -1)
            row.append((rgb * 255).astype(np.uint8))
        tiles.append(np.concatenate(row, axis=1))
    h, w = tiles[0].shape[:2]
    scale = max(1, 192 // h)
    label_w, head_h = 110, 18
    canvas = Image.new("RGB", (label_w + w * scale, head_h + h * scale * len(tiles)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(("input", "reference", "prediction", "copy-the-prompt")):
        draw.text((label_w + j * (w // 4) * scale + 4, 3), name, fill=(255, 255, 255))
    for i, (r, t) in enumerate(zip(rows, tiles)):
        im = Image.fromarray(t).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(im, (label_w, head_h + i * h * scale))
        draw.text((4, head_h + i * h * scale + h * scale // 2), r["task"], fill=(255, 255, 255))
    with atomic_write(path) as tmp:
        canvas.save(str(tmp), format="PNG")
    return path


def run(out: Path, *, quick: bool = False, device: str = "auto", retrain: bool = False,
        cache_dir: Path | None = None, recipe: Recipe | None = None, export: Path | None = None,
        max_train_minutes: float | None = None, full_protocol: bool = False, Ls: Sequence[int] | None = None,
        draws: int | None = None) -> dict[str, Any]:
    """The main job (see the module docstring); returns the summary also written to ``summary.json``."""
    import torch

    from vicl_fast.data.demo_data import load_demo_subjects

    t_start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MainJobError(f"--out {out} exists and is not a folder; choose a folder path", EXIT_OUTPUT)
    _check_writable(out, "output folder", "--out")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    try:
        _check_writable(cache, "cache folder", "--cache-dir")
    except MainJobError as exc:
        cache = Path(tempfile.mkdtemp(prefix="vicl_fast_cache_"))
        _say(f"warning: {exc}; the model is trained in {cache} and will NOT be reused next time")
    dev = _resolve_device(device)
    custom = recipe is not None
    recipe = recipe or (QUICK if quick else FULL)

    _say(f"vicl_fast main job{' (--quick)' if quick else ''}: in-context inference on the embedded real MRI")
    _say("  data: TWO real heads only (icbm152 = an average of 152 brains; colin27 = one person); every other "
         "'subject' is a warped copy of one of them. Training: icbm152 + warped copies. Target: colin27 "
         "(never seen in training; skull-stripped with its brain mask, as the training head has no skull). "
         f"Contexts: {N_CONTEXTS} other warped copies of icbm152. Far too few heads for a claim about "
         "generalisation: this shows the system working end to end.")
    _say(f"  device {dev}; outputs in {out}; model cache {cache}")
    _say("[1/3] model")
    ckpt, info = train_or_load(recipe, dev, cache, retrain=retrain, allow_shipped=not quick and not custom,
                               max_train_minutes=max_train_minutes)
    grid = int(info.get("grid", recipe.grid))
    if export is not None:
        _say(f"  exported the weights in bfloat16 to {export_bf16(ckpt, Path(export), info)}")

    from vicl_fast.inference import load_model

    Ls = tuple(Ls) if Ls else ((N_CONTEXTS,) if not full_protocol else FULL_PROTOCOL_L)
    draws = int(draws if draws is not None else (2 if quick else N_DRAWS))
    _say(f"[2/3] predicting {len(DEMO_TASKS)} tasks through vicl_fast.inference (the path of `vicl-fast "
         f"predict`) at {grid}^3 ({FOV_MM / grid:.2f} mm): {draws} random context draws for L in "
         f"{{{', '.join(map(str, Ls))}}} from {CONTEXT_POOL} warped icbm152 copies")
    model = load_model(ckpt, dev)
    target = load_demo_subjects(names=["colin27"], size=grid)[0]
    target = _normalised(dataclasses.replace(
        target, image=(target.image * target.masks["brain"]).astype(np.float32), has_skull=False))
    pool = [_normalised(s) for s in
            load_demo_subjects(names=["icbm152"], size=grid, n_augmented=max(CONTEXT_POOL, max(Ls)),
                               seed=CONTEXT_SEED)[1:]]
    rows = []
    for i, task in enumerate(DEMO_TASKS):
        r = _showcase(task, model, target, pool, grid, dev, out, seed=100 + i)
        t0 = time.perf_counter()
        r["protocol"] = evaluate_protocol(task, model, target, pool, grid, dev, Ls, draws, seed=100 + i)
        p = r["protocol"][str(Ls[0] if N_CONTEXTS not in Ls else N_CONTEXTS)]
        m = ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f} (copy {p['copy_prompt'][k]['mean']:.3f})"
                      for k, v in p["model"].items())
        _say(f"  {task.name:13s} {m}; {r['wall_s']:.2f} s per prediction, peak {r['peak_mem_mb']:.0f} MB; "
             f"protocol {time.perf_counter() - t0:.1f} s")
        rows.append(r)

    _say("[3/3] summary")
    figure = _figure(out / "figure.png", rows)
    for r in rows:
        r.pop("figure")
    targets = check_targets(rows) if str(N_CONTEXTS) in rows[0]["protocol"] else []
    lref = str(N_CONTEXTS) if str(N_CONTEXTS) in rows[0]["protocol"] else str(Ls[0])
    beats = [r["task"] for r in rows
             if all(v["mean"] > r["protocol"][lref]["copy_prompt"][k]["mean"] for k, v in r["protocol"][lref]["model"].items())]
    notes = [
        "Two real heads only: the target colin27 is a different person from the training/context head "
        "icbm152 (an average template), but one target is one data point.",
        f"Contexts: L warped copies of icbm152 (seed {CONTEXT_SEED}, not the training copies) drawn at random "
        f"from a pool of {CONTEXT_POOL}, {draws} draws per L (mean ± std over draws). The unwarped icbm152 is "
        "not a context: its AAL-derived labels (deep_grey) are colin27's own atlas read at the same MNI "
        "coordinates, so copying them would give Dice 1.0.",
        "copy-the-prompt = the first context's output used as the prediction (RandP Table 2).",
        "Generation metrics are on the percentile-normalised [0, 1] scale that `vicl-fast predict` uses.",
        f"Peak memory (showcase prediction): {rows[0]['peak_mem_kind']}." if rows else "",
        f"The model beats copy-the-prompt (mean, L = {lref}) on: {', '.join(beats) if beats else 'no task'}.",
    ]
    summary = {
        "quick": quick, "device": dev, "torch": torch.__version__, "grid": grid,
        "spacing_mm": FOV_MM / grid, "target": "colin27 (skull-stripped with its brain mask)",
        "contexts": [s.name for s in pool[:N_CONTEXTS]], "context_pool": [s.name for s in pool],
        "draws": draws, "L": list(Ls), "model": info, "tasks": rows, "targets": targets,
        "figure": str(figure.relative_to(out)), "notes": [n for n in notes if n],
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    lines = _table(rows)
    for ln in lines:
        _say("  " + ln)
    tlines = ["| target (L = 4, mean over draws) | wanted | measured | met |", "|---|---|---|---|"]
    tlines += [f"| {t['task']} {t['what']} | {t['wanted']} | {t['measured']:.4f} | {'yes' if t['met'] else 'NO'} |"
               for t in targets]
    if targets:
        for ln in tlines:
            _say("  " + ln)
    for n in summary["notes"]:
        _say("  - " + n)
    from vicl_fast.data.io import atomic_write

    with atomic_write(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = [f"# vicl_fast main job{' (quick)' if quick else ''}", "",
          f"Model: {info['source']} `{Path(info['path']).name}` ({info.get('trained_on', '')}, grid {grid}^3, "
          f"{info.get('steps', '?')} steps, {info.get('train_seconds', '?')} s training on "
          f"{info.get('device', '?')}{'; PARTIAL: stopped at the --max-train-minutes limit' if info.get('partial') else ''}"
          f"). Device: {dev}. Target: colin27; contexts: L of "
          f"{', '.join(summary['context_pool'])}.", "", *lines, "", *(tlines + [""] if targets else []),
          f"![predictions]({summary['figure']})", "", *[f"- {n}" for n in summary["notes"]], ""]
    with atomic_write(out / "summary.md") as tmp:
        Path(tmp).write_text("\n".join(md))
    _say(f"  wrote {out / 'summary.json'}, {out / 'summary.md'} and per-task NIfTI/PNG folders; "
         f"total {_fmt_s(summary['total_seconds'])}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vicl_fast.main_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--quick", action="store_true", help="tiny grid (32^3), a few training steps (seconds)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--retrain", action="store_true",
                   help="train the model again (ignore the shipped and the cached checkpoints)")
    p.add_argument("--cache-dir", default=None,
                   help="model cache (default $VICL_FAST_CACHE or ~/.cache/vicl_fast)")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="train with this recipe (keys of vicl_fast.main_job.Recipe), e.g. "
                        "train/configs/demo_gpu.yaml; the shipped checkpoint is then not used")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="also write the model's weights in bfloat16 to PATH (e.g. "
                        "vicl_fast/checkpoints/demo_neuroverse3d.safetensors to ship it)")
    p.add_argument("--max-train-minutes", type=float, default=None, metavar="M",
                   help="stop training after M minutes (checkpointed: the same command continues it); "
                        "the model so far is evaluated and exported, marked partial")
    p.add_argument("--full-protocol", action="store_true",
                   help=f"evaluate at every L in {FULL_PROTOCOL_L} (default: L = {N_CONTEXTS} only), "
                        f"{N_DRAWS} context draws each")
    p.add_argument("--draws", type=int, default=None, metavar="N",
                   help=f"random context draws per task and L (default {N_DRAWS}; --quick: 2)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok; errors print one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        print("vicl_fast.main_job: error: --max-train-minutes must be a positive number of minutes",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        recipe = load_recipe(args.recipe) if args.recipe else None
        run(Path(args.out), quick=args.quick, device=args.device, retrain=args.retrain,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None, recipe=recipe,
            export=Path(args.export) if args.export else None, max_train_minutes=args.max_train_minutes,
            full_protocol=args.full_protocol, draws=args.draws)
    except ViclFastError as exc:  # MainJobError and every error of the inference path, with its exit code
        print(f"vicl_fast.main_job: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vicl_fast.main_job: interrupted (an interrupted training run resumes next time)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if os.environ.get("VICL_FAST_DEBUG", "0") == "1":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"vicl_fast.main_job: error: {type(exc).__name__}: {first} (VICL_FAST_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
