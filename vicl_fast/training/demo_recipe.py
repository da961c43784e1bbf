"""The demo model: its training recipe, the held-out training data, training with a cache, export.

The main job (:mod:`vicl_fast.main_job`) uses the checkpoint shipped with the package when there is
one; else it trains a small Neuroverse3D with the package's trainer (:mod:`vicl_fast.training`) on
``icbm152`` and warped copies of it only (``colin27`` stays the unseen target), cached under a key
that hashes the :class:`Recipe`, the embedded data and the code that turns them into training pairs.
:func:`export_bf16` writes a checkpoint to ship, with the preprocessing it was trained with
(:data:`vicl_fast.checkpoint.PREPROCESSING_KEY`), which :mod:`vicl_fast.inference` predicts with.
Recipes as YAML: ``train/configs/demo_cpu.yaml`` (the shipped model), ``demo_gpu.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence


from vicl_fast.data.task_registry import default_tasks
from vicl_fast.errors import UsageError, ViclFastError
from vicl_fast.training.datasets import SubjectSource

__all__ = ["Recipe", "FULL", "QUICK", "FOV_MM", "data_digest", "load_recipe", "recipe_doc", "recipe_key", "train_or_load",
           "run_folder", "run_folder_grid", "export_bf16", "preprocessing_metadata", "training_subjects", "normalised"]

#: Bump when the meaning of a recipe changes (invalidates every cached model).
RECIPE_VERSION = 1
FOV_MM = 216.0  # the embedded data's field of view (96 voxels of 2.25 mm)
_META_KEY = "vicl_fast.demo"


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
    normalize: bool = False  # percentile-normalise inputs and generation outputs as inference does
    spatial_augment: bool = True  # per-episode spatial augmentation (off: the warped copies are the variety)
    seg_dice_weight: float = 0.0  # segmentation loss: Eq. 6 + this x soft Dice (0: the paper's Eq. 6)
    ema: float = 0.0  # decay of the weights' moving average that is validated and exported (0: off)
    # Weights to start from (a second training phase): a vicl_fast .safetensors file; relative paths in a
    # recipe file are relative to that file. Keys and metadata carry its name and SHA-256, not its path.
    init_from: str | None = None
    init_widen: bool = False  # init_from has fewer channels: widened to ``channels`` (same function)
    init_freeze: bool = False  # with init_widen: only the added channels' weights learn
    # Inference, not training (so not part of the recipe's key): the checkpoint's metadata that
    # :class:`vicl_fast.inference.Predictor` predicts with by default (its ``scales`` and ``mirror``).
    segmentation_scales: tuple[float, ...] = (1.0,)
    mirror_tta: bool = False  # average each prediction with that of the left-right mirror image

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


def data_digest() -> str:
    """Hash of the embedded heads and of the code that turns them into training pairs (a change of the
    augmentation or the task synthesis changes what a recipe trains on, so it invalidates the cache)."""
    h = hashlib.sha256()
    files = resources.files("vicl_fast.data")
    for name in ("demo_icbm152.npz", "demo_colin27.npz", "demo_data.py", "augment.py", "tasks3d.py",
                 "task_registry.py", "resample.py"):
        h.update((files / name).read_bytes())
    return h.hexdigest()


def recipe_doc(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON, ``init_from`` as ``"<file name> sha256:<digest>"`` (what the weights are, not
    where this machine keeps them)."""
    from vicl_fast.training.checkpointing import _sha256

    doc = dataclasses.asdict(recipe)
    for k in ("init_widen", "init_freeze"):  # fields added later: absent when off, so older keys stay valid
        if not doc[k]:
            del doc[k]
    for k in ("segmentation_scales", "mirror_tta"):  # how the weights are used, not how they were made
        del doc[k]
    if recipe.init_from is not None:
        f = Path(recipe.init_from)
        if not f.is_file():
            raise UsageError(f"recipe init_from: {f} is not a file; give the .safetensors weights to start from")
        doc["init_from"] = f"{f.name} sha256:{_sha256(f)}"
    return doc


def recipe_key(recipe: Recipe) -> str:
    """16 hex digits identifying ``recipe`` + the embedded data + :data:`RECIPE_VERSION`."""
    doc = {"recipe": recipe_doc(recipe), "version": RECIPE_VERSION, "data": data_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A :class:`Recipe` from a YAML file whose keys are its fields (e.g. ``train/configs/demo_gpu.yaml``);
    missing keys take :data:`FULL`'s values. ``tasks`` is a list of ``{name, rate, weight}``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--recipe {p}: file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--recipe {p} is not valid YAML: {exc}") from None
    names = [f.name for f in dataclasses.fields(Recipe)]
    if not isinstance(raw, dict) or any(k not in names for k in raw):
        bad = [k for k in raw if k not in names] if isinstance(raw, dict) else raw
        raise UsageError(f"--recipe {p}: unknown key(s) {bad}; allowed: {', '.join(names)}")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "tasks":
            v = tuple((str(t["name"]), float(t.get("rate", 1.0)), float(t.get("weight", 1.0))) for t in v)
        elif isinstance(v, list):
            v = tuple(v)
        elif k == "init_from" and v is not None:
            v = str((p.parent / str(v)).resolve())
        kw[k] = v
    r = dataclasses.replace(FULL, **kw)
    if r.grid <= 0 or r.grid % 16:
        raise UsageError(f"--recipe {p}: grid must be a positive multiple of 16, got {r.grid}")
    return r


def preprocessing_metadata(recipe: Recipe, key: str) -> dict[str, Any]:
    """How the demo model's training data were prepared (:data:`vicl_fast.checkpoint.PREPROCESSING_KEY`):
    what :class:`vicl_fast.inference.Predictor` predicts with by default."""
    ch = f"channels {'..'.join(map(str, (recipe.channels[0], recipe.channels[-1])))}" if recipe.channels else "tiny"
    return {
        "grid": [recipe.grid] * 3,
        "spacing": [round(recipe.spacing, 6)] * 3,
        "crop": True,  # real scans: fit the head's bounding box (the training heads fill the field of view)
        "segmentation_scales": [float(v) for v in recipe.segmentation_scales],
        "mirror_tta": bool(recipe.mirror_tta),
        "intensity": "percentiles 0.02 / 0.98 -> [0, 1], clipped",
        "expects": "brain-extracted (skull-stripped) T1-weighted MRI, like its training head",
        "description": f"Neuroverse3D ({recipe.model}, {ch}) trained by vicl_fast's trainer",
        "tasks": [{"name": n, "rate": r, "weight": w} for n, r, w in recipe.tasks],
        "segmentation_structures": list(recipe.seg_masks),
        "training_data": f"icbm152 + {recipe.train_variants} warped copies (embedded demo MRI, brain-extracted "
                         "T1, MNI space)",
        "recipe": recipe_doc(recipe),
        "recipe_hash": key,
        "data_licence": "derived from the MNI ICBM152 2009 template; notice in vicl_fast/data/LICENSE-DATA.txt",
    }


def export_bf16(ckpt: Path, dest: Path, info: dict[str, Any], preprocessing: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt``'s weights in bfloat16 (half the bytes; ``vicl-fast predict`` computes in float32)
    to ``dest`` atomically, with the demo metadata and the preprocessing it was trained with (or
    ``preprocessing``), e.g. as ``vicl_fast/checkpoints/demo_neuroverse3d.safetensors`` (the checkpoint
    shipped with the package)."""
    import torch

    from vicl_fast.checkpoint import PREPROCESSING_KEY, load_checkpoint, read_metadata, save_checkpoint

    model = load_checkpoint(ckpt)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {k: v for k, v in info.items() if k not in ("source", "path")}
    meta["dtype"] = "bfloat16"
    extra = {_META_KEY: json.dumps(meta, default=str)}
    # _train writes the preprocessing into every model it saves
    pre = json.dumps(preprocessing) if preprocessing is not None else read_metadata(ckpt).get(PREPROCESSING_KEY)
    if pre:
        extra[PREPROCESSING_KEY] = pre
    save_checkpoint(sd, dest, model_name="neuroverse3d", config=model.config, extra_metadata=extra)
    return dest




def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"




def normalised(subject):
    """The subject with its image percentile-normalised exactly as ``vicl-fast predict`` does."""
    from vicl_fast.data.preprocess import normalize_intensity

    return dataclasses.replace(subject, image=normalize_intensity(subject.image)[0])


def training_subjects(recipe: Recipe) -> list:
    """icbm152 and ``train_variants`` warped copies of it (seed 0), on the recipe grid, with only the
    recipe's segmentation masks and no label maps (so segmentation tasks are drawn from those)."""
    from vicl_fast.data.demo_data import load_demo_subjects

    subs = load_demo_subjects(names=["icbm152"], size=recipe.grid, n_augmented=recipe.train_variants,
                              seed=recipe.seed, masks=recipe.seg_masks)
    return [normalised(s) for s in subs]


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
            "tasks": [{"name": n, "rate": r, "weight": w,
                       **({"dice_weight": recipe.seg_dice_weight} if n == "segmentation" else {})}
                      for n, r, w in recipe.tasks],
            "context_phases": [{"from_step": 0, "min": cmin, "max": cmax, "mini_context": mini}],
            "crop": [recipe.crop] * 3 if recipe.crop else None,
            "normalize": recipe.normalize,
            "spatial_augment": recipe.spatial_augment,
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
                  "out_dir": str(out_dir), "resume": "auto", "progress": False, "tensorboard": False,
                  "ema": recipe.ema, "init_from": recipe.init_from, "init_widen": recipe.init_widen,
                  "init_freeze": recipe.init_freeze},
    }
    return config_from_dict(raw)


def _read_demo_meta(path: Path) -> dict[str, Any]:
    from vicl_fast.checkpoint import read_metadata

    try:
        return json.loads(read_metadata(path).get(_META_KEY, "{}"))
    except (OSError, ValueError) as exc:
        raise ViclFastError(f"checkpoint {path} cannot be read ({exc}); delete it or pass --retrain") from None


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
    from vicl_fast.inference import default_model_path

    shipped = default_model_path() if allow_shipped and not retrain else None
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


def run_folder(cache_dir: Path, recipe: Recipe, key: str) -> Path:
    """Where a training run of ``recipe`` keeps its checkpoints, logs and ``snapshots/``."""
    return cache_dir / "runs" / f"demo_{recipe.grid}_{key}"


def run_folder_grid(run_dir: Path) -> int:
    """The grid a run of :func:`run_folder` trained at, read from its name ``demo_<grid>_<key>``."""
    prefix, grid, *_ = Path(run_dir).name.split("_", 2) + ["", ""]
    if prefix != "demo" or not grid.isdigit():
        raise UsageError(f"{run_dir} is not a demo run folder (demo_<grid>_<run>)")
    return int(grid)


def _train(recipe: Recipe, device: str, cache_dir: Path, ckpt: Path, key: str, fresh: bool,
           max_minutes: float | None = None) -> tuple[Path, dict[str, Any]]:
    import torch

    from vicl_fast.checkpoint import save_checkpoint
    from vicl_fast.training.trainer import Trainer

    run_dir = run_folder(cache_dir, recipe, key)
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
            save_checkpoint(trainer.eval_model, snapshots / f"step_{trainer.step:06d}.safetensors", model_name="neuroverse3d")
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
    meta = {"key": key, "recipe": recipe_doc(recipe), "grid": recipe.grid, "steps": trainer.step,
            "train_seconds": round(train_s, 1), "device": device, "final_loss": result.get("loss"),
            "val_on_held_out_icbm152_copies": val, "trained_on": f"icbm152 + {recipe.train_variants} warped copies",
            "date": time.strftime("%Y-%m-%d %H:%M"), "partial": partial}
    from vicl_fast.checkpoint import PREPROCESSING_KEY

    save_checkpoint(trainer.eval_model, ckpt, model_name="neuroverse3d",  # atomic: temp file + rename
                    extra_metadata={_META_KEY: json.dumps(meta),
                                    PREPROCESSING_KEY: json.dumps(preprocessing_metadata(recipe, key))})
    if not partial:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep only the CSV logs of the run
    _say(f"  trained in {_fmt_s(train_s)}; {'saved (partial)' if partial else 'cached'} as {ckpt}")
    return ckpt, {"source": "trained", "path": str(ckpt), **meta}


