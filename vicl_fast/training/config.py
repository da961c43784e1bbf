"""Typed training configuration, loaded from YAML and checked at start-up.

Every problem that would otherwise surface an hour into training stops the run
before the first step, with a message that names it: an unknown key (with the
keys that are allowed), a wrong type, a missing data folder, a dataset with no
usable image/label pairs, a task that no dataset can provide.

The layout of a config file (every section optional except ``model`` and
``data.datasets``; see ``train/configs/*.yaml`` and ``train/README.md``)::

    model:  {name: neuroverse3d, kwargs: {}}
    data:   {datasets: [{name: oasis, path: /data/oasis}], grid: [128, 128, 128],
             tasks: [{name: segmentation, rate: 2, weight: 50}, ...],
             context_phases: [{from_step: 0, min: 3, max: 3, mini_context: 3}, ...]}
    optim:  {lr: 1.0e-4, grad_clip: 0.25, schedule: plateau, ...}
    train:  {steps: 120000, batch_size: 1, val_every: 1200, ...}

Family defaults (:func:`family_defaults`) fill what a file leaves out, so a
Neuroverse3D config gets the paper's Table 3 task rates/weights, Adam at 1e-4,
clip 0.25 and ReduceLROnPlateau x0.5 / patience 20 evaluations; a RandP config
gets warm-up + cosine at 1e-3 and its 2D tasks.

Task names, their dimensionality and the default rates/weights come from
:mod:`vicl_fast.data.task_registry` (one name per task for 2D and 3D). RandP's
former names ``denoising`` / ``synthesis`` still load, as ``gaussian_noise`` /
``modality_transform``, with one :class:`~vicl_fast.data.task_registry.DeprecatedTaskNameWarning`
per config naming every alias used.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vicl_fast.data.task_registry import TASKS, canonical_names, family_dims, get_task, task_names

__all__ = [
    "Config", "ModelConfig", "DatasetConfig", "TaskConfig", "ContextPhase", "DataConfig",
    "OptimConfig", "TrainConfig", "ConfigError", "load_config", "config_from_dict", "config_to_dict",
    "family_of", "family_defaults", "family_task_names",
]


class ConfigError(ValueError):
    """A config problem found at start-up; the message names the key, file or folder."""


def family_task_names(family: str) -> list[str]:
    """The task names a model family trains on (``"neuroverse3d"``: the 3D tasks, else the 2D ones),
    in registry order (for RandP: the task-head ids)."""
    return list(task_names(family_dims(family)))


def _check_task_name(name: str, family: str, where: str) -> None:
    known = family_task_names(family)
    if name in known:
        return
    hint = ""
    if name in TASKS:  # a registered task of the other dimensionality
        hint = (" (a 3D-only Neuroverse3D task: RandP models train on the 2D tasks of "
                "vicl_fast.data.task_registry)")
    raise ConfigError(f"{where}: unknown task {name!r} for the {family} family{hint}; "
                      f"known: {', '.join(known)}")


def _canonical_task_names(cfg: Config) -> None:
    """Replace deprecated task names (in data.tasks and data.datasets[].tasks) by the registry's, in
    place, with ONE warning for the whole config."""
    used = sorted({t.name for t in cfg.data.tasks or []}
                  | {n for ds in cfg.data.datasets for n in ds.tasks or []})
    new = dict(zip(used, canonical_names(used, where="config")))
    for t in cfg.data.tasks or []:
        t.name = new[t.name]
    for ds in cfg.data.datasets:
        if ds.tasks is not None:
            ds.tasks = [new[n] for n in ds.tasks]


# --------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    """Which model: any name of ``vicl_fast.models.list_models()``."""

    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: Literal["auto", "neuroverse3d", "randp"] = "auto"  # "auto": from the name


@dataclass
class DatasetConfig:
    """One dataset: a folder of NIfTI pairs (``images/``, ``labels/``, optional ``masks/``,
    ``targets/``) or ``path: demo`` for the embedded demo MRI."""

    name: str = ""
    path: str = ""
    tasks: list[str] | None = None  # restrict the tasks drawn from this dataset
    max_subjects: int | None = None
    augmented: int = 0  # demo only: derived (warped) variants of the real heads added to the pool


@dataclass
class TaskConfig:
    """One task with its sampling rate and loss weight (defaults: ``task_registry.default_tasks``,
    Neuroverse3D Table 3 in 3D)."""

    name: str = ""
    rate: float = 1.0
    weight: float = 1.0
    dice_weight: float = 0.0  # Neuroverse3D segmentation: + dice_weight x soft Dice (0: the paper's Eq. 6)


@dataclass
class ContextPhase:
    """From ``from_step`` on, draw the context size L uniformly in [min, max] per step;
    ``mini_context`` is the APSP mini-context size l (None: all L at once)."""

    from_step: int = 0
    min: int = 1
    max: int = 1
    mini_context: int | None = None


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    tasks: list[TaskConfig] | None = None  # None: the registry's defaults, filtered to what the data provides
    grid: list[int] | None = None  # 3D: (D, H, W) multiple of 16; 2D: (H, W)
    spacing: float | None = 1.0  # mm; resampling before fitting into the grid
    context_phases: list[ContextPhase] | None = None
    val_fraction: float = 0.1  # subjects held out per dataset (validation targets)
    val_episodes: int = 8  # fixed validation episodes, evaluated every val_every steps
    val_context_size: int = 3
    num_workers: int = 0
    cache: bool = True  # keep preprocessed volumes in memory (per worker)
    augment: bool = True  # the papers' image/task augmentation
    random_foreground_p: float = 0.5  # Neuroverse3D: group k random classes into one foreground
    crop: list[int] | None = None  # Neuroverse3D: train on random windows of the grid (fully convolutional)
    normalize: bool = False  # percentile-normalise every input and generation output as inference does
    spatial_augment: bool = True  # the papers' spatial augmentation (off: intensity augmentation only)


@dataclass
class OptimConfig:
    lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global L2 norm; None: no clipping
    schedule: Literal["auto", "plateau", "cosine", "constant"] = "auto"
    warmup_steps: int | None = None  # cosine: linear warm-up from 0
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 20  # in evaluations (the paper: 20 x 1.2K steps)
    ce_weight: float = 0.1  # RandP: smoothL1 + 0.1 CE(task)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1  # per process
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "none"] = "auto"  # "auto": bf16 autocast on CUDA, none on CPU
    apsp_mode: Literal["scaled", "exact", "full"] = "scaled"
    val_every: int = 100
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    out_dir: str = "runs/train"
    resume: str = "auto"  # "auto" (latest in out_dir if any), "none", or a checkpoint folder
    # Weights to start from when nothing is resumed (fine-tuning; a second training phase): a vicl_fast
    # checkpoint file (.safetensors) or a training checkpoint folder. Optimizer and schedule start fresh.
    init_from: str | None = None
    # init_from holds a narrower Neuroverse3D (fewer channels per stage): widen it to the configured
    # channels, computing the same function (vicl_fast.models.neuroverse3d.widen); with init_freeze the
    # weights it brings stay fixed and only the entries that widening added learn.
    init_widen: bool = False
    init_freeze: bool = False
    # Exponential moving average of the weights (decay per step, e.g. 0.998; 0: off). Validation, best/
    # and the exported model use the average: it smooths the step-to-step noise of small batches.
    ema: float = 0.0
    progress: bool = True
    tensorboard: bool = True  # used when the tensorboard package is installed
    find_unused_parameters: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def spatial_dims(self) -> int:
        return len(self.data.grid or ())

    def task_names(self) -> list[str]:
        return [t.name for t in self.data.tasks or []]


# ------------------------------------------------------------------- parsing
def family_of(model: ModelConfig) -> str:
    """``"neuroverse3d"`` or ``"randp"`` (every 2D prompt/query model)."""
    if model.family != "auto":
        return model.family
    return "neuroverse3d" if model.name.lower().startswith("neuroverse") else "randp"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string: accept it if it parses
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; allowed keys{' in ' + where if where else ''}: "
                          f"{', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def family_defaults(cfg: Config) -> Config:
    """Fill what the file left out with the family's paper settings (returns a copy)."""
    cfg = copy.deepcopy(cfg)
    fam = cfg.family
    nv = fam == "neuroverse3d"
    o, d = cfg.optim, cfg.data
    if o.lr is None:
        o.lr = 1e-4 if nv else 1e-3  # Neuroverse3D C.1 / RandP Sec. 4 ("maximum learning rate 1e-3")
    if o.schedule == "auto":
        o.schedule = "plateau" if nv else "cosine"
    if o.grad_clip is None and nv:
        o.grad_clip = 0.25  # official code
    if o.warmup_steps is None:
        o.warmup_steps = 0 if nv else max(1, cfg.train.steps // 20)
    if d.grid is None:
        d.grid = [128, 128, 128] if nv else [256, 256]
    if d.context_phases is None:
        if nv:  # C.1: L = l = 3 for the first 100K of 120K steps, then L ~ U{1..8}
            switch = max(1, int(round(cfg.train.steps * 100 / 120)))
            d.context_phases = [ContextPhase(0, 3, 3, 3), ContextPhase(switch, 1, 8, 3)]
        else:  # RandP: one prompt pair
            d.context_phases = [ContextPhase(0, 1, 1, None)]
    return cfg


def _check_model_name(name: str) -> None:
    """A model name of the registry, or a ConfigError naming the closest ones (before any data is read)."""
    import difflib

    from vicl_fast.models import list_models

    known = list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"model.name: unknown model {name!r}{hint} (known: {', '.join(known)})")


def validate(cfg: Config) -> None:
    """Checks that need no data on disk (those that do are in :mod:`.datasets`)."""
    if not cfg.model.name:
        raise ConfigError("model.name is missing; e.g. 'neuroverse3d', 'neuroverse3d_tiny', 'randp_vit_b'")
    _check_model_name(cfg.model.name)
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty; list at least one {name, path} (path: demo for the "
                          "embedded demo MRI)")
    seen = set()
    for i, ds in enumerate(cfg.data.datasets):
        if not ds.name:
            raise ConfigError(f"data.datasets[{i}].name is missing")
        if not ds.path:
            raise ConfigError(f"data.datasets[{i}] ({ds.name!r}): path is missing (a folder, or 'demo')")
        if ds.name in seen:
            raise ConfigError(f"data.datasets: the name {ds.name!r} is used twice")
        seen.add(ds.name)
        for t in ds.tasks or []:
            _check_task_name(t, cfg.family, f"data.datasets[{i}] ({ds.name!r}).tasks")
    names = [t.name for t in cfg.data.tasks or []]
    for i, t in enumerate(cfg.data.tasks or []):
        _check_task_name(t.name, cfg.family, f"data.tasks[{i}]")
        if t.name in names[:i]:
            raise ConfigError(f"data.tasks[{i}]: task {t.name!r} is listed twice")
        if t.rate <= 0 or t.weight <= 0:
            raise ConfigError(f"data.tasks[{i}] ({t.name}): rate and weight must be > 0")
        if t.dice_weight < 0:
            raise ConfigError(f"data.tasks[{i}] ({t.name}).dice_weight must be >= 0 (0: no Dice term)")
        if t.dice_weight and (cfg.family != "neuroverse3d" or get_task(t.name).kind != "seg"):
            raise ConfigError(f"data.tasks[{i}] ({t.name}).dice_weight: a Dice term is for Neuroverse3D "
                              "segmentation tasks only (remove the key)")
    grid = cfg.data.grid or []
    want = 3 if cfg.family == "neuroverse3d" else 2
    if len(grid) != want or any(g <= 0 for g in grid):
        raise ConfigError(f"data.grid must list {want} positive sizes for the {cfg.family} family, got {grid}")
    if cfg.family == "neuroverse3d" and any(g % 16 for g in grid):
        raise ConfigError(f"data.grid {grid}: Neuroverse3D needs multiples of 16 (e.g. 32, 64, 128)")
    crop = cfg.data.crop
    if crop is not None:
        if cfg.family != "neuroverse3d":
            raise ConfigError("data.crop is for Neuroverse3D (3D) training only; remove it for 2D models")
        if len(crop) != 3 or any(c <= 0 or c % 16 for c in crop) or any(c > g for c, g in zip(crop, grid)):
            raise ConfigError(f"data.crop {crop}: give 3 multiples of 16 no larger than data.grid {grid}")
    if cfg.family == "randp" and (grid[0] != grid[1] or grid[0] % 16):
        raise ConfigError(f"data.grid {grid}: RandP episodes are square slices (vicl_fast.data.tasks2d) at "
                          "the patch size 16: use [S, S] with S a multiple of 16 (32 for SwinUNETR), e.g. [256, 256]")
    phases = cfg.data.context_phases or []
    if not phases or phases[0].from_step != 0:
        raise ConfigError("data.context_phases must start with from_step: 0")
    for i, p in enumerate(phases):
        if not 1 <= p.min <= p.max:
            raise ConfigError(f"data.context_phases[{i}]: need 1 <= min <= max, got min={p.min} max={p.max}")
        if p.mini_context is not None and p.mini_context < 1:
            raise ConfigError(f"data.context_phases[{i}].mini_context must be >= 1 or null")
        if i and p.from_step <= phases[i - 1].from_step:
            raise ConfigError("data.context_phases: from_step must increase")
    if cfg.family == "randp" and any(p.max != 1 for p in phases):
        raise ConfigError("data.context_phases: RandP models take one prompt pair; use min: 1, max: 1")
    if not 0.0 <= cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema: {cfg.train.ema} is not a decay in [0, 1) (e.g. 0.998; 0 turns it off)")
    init = cfg.train.init_from
    if init is not None and not Path(init).exists():
        raise ConfigError(f"train.init_from: {init} does not exist; give a vicl_fast checkpoint file "
                          "(.safetensors) or a training checkpoint folder (.../checkpoints/step_*), or remove it")
    if (cfg.train.init_widen or cfg.train.init_freeze) and (init is None or Path(init).is_dir()):
        raise ConfigError("train.init_widen / init_freeze need train.init_from: a vicl_fast checkpoint file "
                          "(.safetensors) of a narrower model of the same kind")
    if cfg.train.init_freeze and not cfg.train.init_widen:
        raise ConfigError("train.init_freeze keeps init_from's weights fixed while the channels that "
                          "widening adds learn: it needs train.init_widen: true")
    if cfg.train.init_freeze and cfg.optim.weight_decay:
        raise ConfigError("train.init_freeze: optim.weight_decay would still shrink the frozen weights; "
                          "set it to 0")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    t = cfg.train
    for k in ("steps", "batch_size", "val_every", "log_every", "ckpt_every", "keep_last"):
        if getattr(t, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.optim.warmup_steps is not None and cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.optim.ce_weight < 0:
        raise ConfigError(f"optim.ce_weight must be >= 0 (RandP: 0.1), got {cfg.optim.ce_weight}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, got {cfg.optim.betas}")


def config_from_dict(raw: dict, *, base_dir: str | Path | None = None) -> Config:
    """Build, default-fill and validate a :class:`Config` from a plain mapping.

    Relative dataset paths are resolved against ``base_dir`` (the YAML file's folder).
    """
    cfg = _build(Config, raw, "")
    if base_dir is not None:
        for ds in cfg.data.datasets:
            if ds.path and ds.path != "demo" and not Path(ds.path).expanduser().is_absolute():
                ds.path = str((Path(base_dir) / ds.path).resolve())
    if not cfg.model.name:
        raise ConfigError("model.name is missing; e.g. 'neuroverse3d', 'neuroverse3d_tiny', 'randp_vit_b'")
    _canonical_task_names(cfg)
    cfg = family_defaults(cfg)
    validate(cfg)
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config; ``overrides`` are ``"section.key=value"`` strings (value parsed as YAML)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping (model:, data:, optim:, train:)")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: use section.key=value, e.g. train.steps=100")
        k, v = ov.split("=", 1)
        _set_dotted(raw, k.strip(), yaml.safe_load(v))
    try:
        return config_from_dict(raw, base_dir=p.parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain (YAML/JSON-able) mapping of a config, e.g. to store with a checkpoint."""
    return dataclasses.asdict(cfg)
