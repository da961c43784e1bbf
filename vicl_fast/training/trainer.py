"""The training loop for both model families (Neuroverse3D, every RandP / 2D vICL model).

Per step (``train.batch_size`` episodes per process):

- Neuroverse3D: context size L and mini-context size l from the phase in force
  (paper C.1: L = l = 3 for the first 100K of 120K steps, then L ~ U{1..8});
  ``model(target, contexts, labels, l, apsp_mode=...)`` with APSP ``scaled``
  (the paper: random mini-context order, last one with graph, gradient x n) or
  ``exact`` (full-context gradient at one mini-context's memory); contexts stay
  on the host and are streamed; loss = task weight x (Eq. 6 modified smooth-L1
  for segmentation | Eq. 7 smooth-L1 + intensity-difference loss for
  generation), weights of Table 3 (segmentation 50 = the official "50 x").
- RandP (2D): ``model(prompt_image, prompt_label, query_image)``; the query
  label is never an input (training-inference aligned masking: the whole query
  label is the model's [MASK] token); episodes from :mod:`vicl_fast.data.tasks2d`
  (segmentation, denoising, super-resolution, synthesis; task id = index of the
  task head); loss = smoothL1 + 0.1 CE(task logits) (``optim.ce_weight``).
- Adam, global-norm gradient clipping, bf16 autocast on CUDA (loss in float32),
  LR: ReduceLROnPlateau on the validation loss (x0.5, patience in evaluations)
  or linear warm-up + cosine decay per step.
- Every ``val_every`` steps: fixed validation episodes (targets from held-out
  subjects), loss, Dice (segmentation, threshold 0.5) and PSNR (generation), and
  SSIM (generation) for RandP, the metrics of each paper.
- Checkpoints (:mod:`.checkpointing`) every ``ckpt_every`` steps, at the end
  and at every new best validation; resume restores model, optimizer,
  scheduler, RNG and step, and the data of step s depends only on (seed, s),
  so a killed-and-resumed run equals an uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vicl_fast.training import distributed as D
from vicl_fast.training.checkpointing import (
    CheckpointError, capture_rng, latest_checkpoint, load_training_checkpoint, prune_checkpoints,
    restore_rng, save_training_checkpoint, update_best,
)
from vicl_fast.data.task_registry import family_dims, get_task
from vicl_fast.training.config import Config, ModelConfig, config_to_dict, family_of
from vicl_fast.training.datasets import (
    EpisodeDataset, StepBatchSampler, build_sources, context_size_for_step, make_loader, resolve_tasks,
)
from vicl_fast.training.logging import RunLogger, log, setup_console_logging

__all__ = ["Trainer", "WarmupCosine", "seed_everything", "build_model"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _subseed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class WarmupCosine:
    """LR(step) = base * step/warmup during warm-up, then cosine from base to ``min_lr`` at ``total``.

    Stateless apart from ``base_lrs`` (a pure function of the step), so resuming is exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int, min_lr: float = 0.0):
        self.optimizer, self.warmup, self.total, self.min_lr = optimizer, int(warmup), int(total), float(min_lr)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def lr_at(self, step: int, base: float) -> float:
        """LR used for the update of step ``step`` (0-based)."""
        if self.warmup > 0 and step < self.warmup:
            return base * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, step: int) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(step, base)

    def state_dict(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "total": self.total, "min_lr": self.min_lr, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.base_lrs = [float(x) for x in sd["base_lrs"]]


def build_model(cfg: Config, n_tasks: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``create_model(cfg.model.name, **kwargs)``; RandP models get ``num_tasks`` (and ``img_size`` for
    square grids) unless the config sets them. Returns ``(model, kwargs used)``."""
    from vicl_fast.models import create_model

    kw = dict(cfg.model.kwargs)
    if cfg.family == "randp":
        extra = {"num_tasks": n_tasks}
        g = cfg.data.grid or []
        if len(g) == 2 and g[0] == g[1]:
            extra["img_size"] = g[0]
        full = {**extra, **kw}
        try:
            return create_model(cfg.model.name, **full), full
        except TypeError as exc:  # a 2D model without these arguments
            log.info("model %s does not take %s (%s); building it with the config kwargs only",
                     cfg.model.name, sorted(extra), exc)
    return create_model(cfg.model.name, **kw), kw


class Trainer:
    """Build data, model, optimizer and logs from a :class:`Config`; :meth:`fit` trains.

    Args:
        cfg: a validated config (:func:`vicl_fast.training.config.load_config`).
        env: distributed environment (default: detected from torchrun's variables).
        sources: subject pools to train on instead of ``build_sources(cfg)`` (one per entry of
            ``cfg.data.datasets``, same order), e.g. a hand-picked split of the demo heads
            (``vicl_fast.main_job`` trains on one head and predicts the other).
    """

    def __init__(self, cfg: Config, env: D.DistEnv | None = None, sources: list | None = None):
        self.cfg = cfg
        self.env = env or D.init_distributed(cfg.train.device)
        setup_console_logging(self.env.is_main)
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(t.seed)
        self.family = cfg.family
        self.device = self.env.device
        # ---- data (every start-up check happens here, before the model is built)
        self.sources = build_sources(cfg) if sources is None else list(sources)
        self.tasks, self.providers = resolve_tasks(cfg, self.sources)
        self.dims = family_dims(self.family)
        task_defs = [get_task(tk.name) for tk in self.tasks]  # vicl_fast.data.task_registry
        self.task_kinds = [t.kind for t in task_defs]
        self.task_losses = [t.loss(self.dims) for t in task_defs]  # Neuroverse3D: Eq. 6 or Eq. 7
        self.dice_weights = [tk.dice_weight for tk in self.tasks]  # + soft Dice (a config option)
        self.task_metrics = [t.metrics(self.dims) for t in task_defs]
        self.train_ds = EpisodeDataset(cfg, self.sources, self.tasks, self.providers, "train")
        self.val_ds = EpisodeDataset(cfg, self.sources, self.tasks, self.providers, "val")
        if not self.val_ds.has_val():
            log.warning("no held-out subjects (val_fraction=%s, datasets of < 3 subjects): validation uses "
                        "training subjects as targets", cfg.data.val_fraction)
            self.val_ds.val_idx = [list(range(len(s))) for s in self.sources]
        # ---- model
        seed_everything(t.seed)  # identical initial weights on every rank and every (re)start
        self.model, self.model_kwargs = build_model(cfg, len(self.tasks))
        self.model.to(self.device)
        if t.init_freeze:  # before DDP and the optimizer: the old entries' gradients are zero from step 1
            self._freeze_old_entries()
        self.ddp = D.wrap_model(self.model, self.env, t.find_unused_parameters)
        # The average of the weights (train.ema), updated after every optimizer step; a library class
        # (torch.optim.swa_utils) so that its update rule is torch's, not ours.
        self.ema: AveragedModel | None = None
        if t.ema > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True)
        # ---- optimisation
        o = cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay)
        if o.schedule == "plateau":
            self.scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=o.plateau_factor, patience=o.plateau_patience,
                min_lr=o.min_lr)
        elif o.schedule == "cosine":
            self.scheduler = WarmupCosine(self.optimizer, o.warmup_steps or 0, t.steps, o.min_lr)
        else:
            self.scheduler = None
        amp = t.amp
        self.amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and self.device.type == "cuda")) \
            else None
        self.step = 0
        self.best: float = math.inf
        self.last_val: dict[str, float] = {}
        self.out_dir = Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self._resume()

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        r = self.cfg.train.resume
        path = None
        if r == "none":
            if latest_checkpoint(self.ckpt_dir) is not None:
                log.warning("train.resume=none but %s holds checkpoints: they will be overwritten as the "
                            "new run reaches their steps", self.ckpt_dir)
        else:
            path = latest_checkpoint(self.ckpt_dir) if r == "auto" else Path(r)
        if path is not None:
            self.load_checkpoint(path)
            log.info("resumed from %s (step %d)", path, self.step)
        elif self.cfg.train.init_from:  # nothing resumed: a new run, from the given weights
            self.init_weights(self.cfg.train.init_from)

    def init_weights(self, path: str | Path) -> None:
        """Start from the weights of ``path`` (a vicl_fast ``.safetensors`` checkpoint or a training
        checkpoint folder) with a fresh optimizer and schedule: ``train.init_from``."""
        from vicl_fast.checkpoint import _NAME_KEY, load_state_dict_file, read_metadata

        p = Path(path)
        if p.is_dir():
            doc, weights, _ = load_training_checkpoint(p, map_location=self.device)
            name = doc.get("model")
        else:
            try:
                name = read_metadata(p).get(_NAME_KEY)
                weights = load_state_dict_file(p, self.device)
            except Exception as exc:  # noqa: BLE001 (safetensors raises its own SafetensorError)
                raise CheckpointError(f"train.init_from {p} cannot be read ({exc}); give a vicl_fast "
                                      "checkpoint file or a training checkpoint folder") from None
        if name is not None and family_of(ModelConfig(name=name)) != self.family:
            raise CheckpointError(f"train.init_from {p} holds a {name!r} model, the config builds "
                                  f"{self.cfg.model.name!r}; give a checkpoint of the same model")
        if self.cfg.train.init_widen:
            weights = self._widened(weights, p)
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"train.init_from {p} does not fit the configured model (model.kwargs "
                                  f"differ?): {first[1].strip() if len(first) > 1 else first[0]}") from None
        self._reset_ema()
        log.info("initialised the weights from %s", p)

    def _narrow_channels(self) -> tuple[list[int], list[int]]:
        """``(init_from's channels per stage, the configured model's)`` for ``train.init_widen``."""
        import json

        from vicl_fast.checkpoint import _CONFIG_KEY, read_metadata

        p = self.cfg.train.init_from
        old = json.loads(read_metadata(p).get(_CONFIG_KEY, "{}")).get("channels")
        new = getattr(self.model, "config", {}).get("channels")
        if old is None or new is None:
            raise CheckpointError(f"train.init_widen: {p} or the configured model has no channel list "
                                  "(only Neuroverse3D checkpoints written by vicl_fast can be widened)")
        return list(old), list(new)

    def _widened(self, weights: dict[str, torch.Tensor], p: Path) -> dict[str, torch.Tensor]:
        """init_from's weights placed in the configured, wider model (fresh init for the new channels)."""
        from vicl_fast.models.neuroverse3d.widen import widen_state_dict

        old, new = self._narrow_channels()
        try:
            wide, _ = widen_state_dict(weights, old, new, self.model.state_dict())
        except ValueError as exc:
            raise CheckpointError(f"train.init_widen: {p}: {exc}") from None
        log.info("widened the weights of %s from channels %s to %s", p, old, new)
        return wide

    def _freeze_old_entries(self) -> None:
        """Gradient hooks that zero the entries init_from brings (``train.init_freeze``): Adam then never
        moves them. Derived from the two channel lists alone, so a resumed run freezes the same entries."""
        from vicl_fast.models.neuroverse3d.widen import old_entries

        old, new = self._narrow_channels()
        with torch.device("meta"):  # shapes only: no weights allocated
            narrow = type(self.model)(**{**self.model.config, "channels": old})
        was_old = old_entries({k: v.shape for k, v in narrow.state_dict().items()}, old, new,
                              {k: v.shape for k, v in self.model.state_dict().items()})
        for name, param in self.model.named_parameters():
            keep = (~was_old[name]).to(param.device, param.dtype)
            param.register_hook(lambda g, keep=keep: g * keep)
        log.info("train.init_freeze: %d of %d weights learn", sum(int((~m).sum()) for m in was_old.values()),
                 sum(m.numel() for m in was_old.values()))

    def _reset_ema(self) -> None:
        """The average restarts from the current weights (nothing averaged yet)."""
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
            self.ema.n_averaged.zero_()

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model that is validated and exported: the weights' average with ``train.ema``, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG and step from a checkpoint folder."""
        doc, weights, states = load_training_checkpoint(path, map_location=self.device)
        if doc.get("model") != self.cfg.model.name:
            raise CheckpointError(f"checkpoint {path} holds model {doc.get('model')!r}, the config builds "
                                  f"{self.cfg.model.name!r}; point train.out_dir to a new folder or fix model.name")
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not fit the configured model "
                                  f"(model.kwargs changed?): missing {missing[:4]}, unexpected {unexpected[:4]}")
        self.optimizer.load_state_dict(states["optimizer"])
        if self.scheduler is not None and states.get("scheduler") is not None:
            self.scheduler.load_state_dict(states["scheduler"])
        if self.ema is not None:
            if states.get("ema") is not None:
                self.ema.load_state_dict(states["ema"])
            else:  # a run that had no average: it starts here
                self._reset_ema()
        restore_rng(states["rng"])
        self.step = int(doc["step"])
        self.best = float(doc["meta"].get("best", math.inf))

    def save_checkpoint(self, improved: bool) -> Path | None:
        """Rank 0 writes ``checkpoints/step_<step>`` (and ``best/``); all ranks wait for it."""
        path = None
        if self.env.is_main:
            states = {"optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                      "ema": self.ema.state_dict() if self.ema is not None else None,
                      "rng": capture_rng()}
            meta = {"best": self.best, "val": self.last_val, "config": config_to_dict(self.cfg),
                    "tasks": [t.name for t in self.tasks]}
            path = save_training_checkpoint(self.ckpt_dir, self.step, self.model, model_name=self.cfg.model.name,
                                            model_kwargs=self.model_kwargs, states=states, meta=meta)
            if improved:
                update_best(self.ckpt_dir, path)
            prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
        D.barrier(self.env)
        return path

    # ------------------------------------------------------------------- steps
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward_loss(self, batch: dict[str, Any], step: int, *, train: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted mean loss, per-sample (unweighted) losses (B,), and predictions."""
        dev = self.device
        task = batch["task"].to(dev)
        w = batch["weight"].to(dev)
        net = self.ddp if train else self.eval_model
        if self.family == "neuroverse3d":
            target = batch["target_in"].to(dev, non_blocking=True)
            ci, co = batch["context_in"], batch["context_out"]  # stay on the host: APSP streams them
            y = batch["target_out"].to(dev, non_blocking=True)
            if train:
                l = context_size_for_step(self.cfg, step)[1]
                gen = torch.Generator().manual_seed(_subseed(self.cfg.train.seed, 3, step, self.env.rank))
                with self._autocast():
                    pred = net(target, ci, co, l, apsp_mode=self.cfg.train.apsp_mode, generator=gen)
            else:
                l = self.cfg.data.context_phases[-1].mini_context
                with self._autocast():
                    pred = net(target, ci, co, l)
            pred = pred.float()
            per = self._nv_per_sample(pred, y, task)
            return (w * per).mean(), per, pred
        pi, pl, qi = (batch[k].to(dev, non_blocking=True) for k in ("prompt_image", "prompt_label", "query_image"))
        y = batch["query_label"].to(dev, non_blocking=True)
        with self._autocast():
            # Training-inference aligned masking (RandP Sec. 3, Fig. 2 (d)): the prompt pair and the
            # query image are never masked and the query label is never an input; the model puts its
            # learnable [MASK] token in the whole query-label quadrant, in training as at inference.
            pred = net(pi, pl, qi)
        logits = getattr(self.model if train else self.eval_model, "last_task_logits", None)
        pred = pred.float()
        per = F.smooth_l1_loss(pred, y, reduction="none", beta=1.0).flatten(1).mean(1)
        loss = (w * per).mean()
        if logits is not None:
            if logits.shape[-1] != len(self.tasks):
                raise ValueError(f"model {self.cfg.model.name!r} has a task head of {logits.shape[-1]} classes but "
                                 f"the run trains {len(self.tasks)} tasks ({', '.join(t.name for t in self.tasks)}); "
                                 "remove num_tasks from model.kwargs (the trainer sets it)")
            ce = F.cross_entropy(logits.float(), task)
            # ce_weight 0 still keeps the head in the graph (DDP expects a gradient for every parameter)
            loss = loss + self.cfg.optim.ce_weight * ce
        return loss, per, pred

    def _nv_per_sample(self, pred: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Unweighted per-sample losses (B,): each sample by its task's loss (the registry's key)."""
        from vicl_fast.losses import LOSSES, soft_dice_loss

        keys = [self.task_losses[i] for i in task.tolist()]
        per = torch.zeros(pred.shape[0], device=pred.device, dtype=pred.dtype)
        for key in sorted(set(keys)):
            idx = torch.tensor([b for b, k in enumerate(keys) if k == key], device=pred.device)
            per = per.index_put((idx,), LOSSES[key](pred[idx], y[idx], "none"))
        dw = torch.tensor([self.dice_weights[i] for i in task.tolist()], device=pred.device, dtype=pred.dtype)
        if bool((dw > 0).any()):
            per = per + dw * soft_dice_loss(pred, y, "none")
        return per

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One optimisation step on ``batch``; returns loss, grad norm and LR."""
        self.model.train()
        if isinstance(self.scheduler, WarmupCosine):
            self.scheduler.apply(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self._forward_loss(batch, step, train=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        # After DDP's all-reduce every rank has the same gradients, hence the same norm: the skip
        # decision below is identical on every process.
        if torch.isfinite(norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        else:
            log.warning("step %d: non-finite gradient norm (%s): update skipped", step, float(norm))
        return {"loss": float(loss.detach()), "grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, Dice and PSNR on the fixed validation episodes (sharded over processes)."""
        from vicl_fast.data.metrics import dice, psnr, ssim

        self.eval_model.eval()
        T = len(self.tasks)
        # loss_sum, metric_sum, count, metric_count, ssim_sum, ssim_count (SSIM: RandP's generation metric)
        acc = torch.zeros(T, 6, dtype=torch.float64)
        wloss = torch.zeros(2, dtype=torch.float64)
        mine = [i for i in range(self.cfg.data.val_episodes) if i % self.env.world_size == self.env.rank]
        sampler = [[(0, i)] for i in mine]
        loader = make_loader(self.val_ds, sampler, self.cfg.data.num_workers, self.cfg.train.seed,
                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            loss, per, pred = self._forward_loss(batch, 0, train=False)
            y = batch["target_out"] if self.family == "neuroverse3d" else batch["query_label"]
            p = pred.cpu().numpy()
            yy = y.cpu().numpy()
            for b, ti in enumerate(batch["task"].tolist()):
                acc[ti, 0] += float(per[b])
                acc[ti, 2] += 1
                if self.task_kinds[ti] == "seg":
                    if self.family == "randp":
                        m = dice(p[b].mean(0) > 0.5, yy[b].mean(0) > 0.5)
                    else:
                        m = dice(p[b] > 0.5, yy[b] > 0.5)
                else:
                    m = psnr(np.clip(p[b], 0, 1), yy[b], data_range=1.0)
                    if self.family == "randp":  # (3, S, S): SSIM averaged over the channels
                        acc[ti, 4] += float(ssim(np.clip(p[b], 0, 1)[None], yy[b][None], 1.0, spatial_dims=2)[0])
                        acc[ti, 5] += 1
                if math.isfinite(m):
                    acc[ti, 1] += m
                    acc[ti, 3] += 1
                wloss[0] += float(batch["weight"][b]) * float(per[b])
                wloss[1] += 1
        if self.env.distributed:  # one all-reduce; NCCL needs device tensors
            dev = self.device if self.env.backend == "nccl" else torch.device("cpu")
            buf = D.all_reduce_sum(torch.cat([acc.flatten(), wloss]).to(dev), self.env).cpu()
            acc, wloss = buf[: T * 6].view(T, 6), buf[T * 6:]
        self.model.train()
        row: dict[str, float] = {"loss": float(wloss[0] / max(1.0, float(wloss[1])))}
        seg = [i for i in range(T) if self.task_kinds[i] == "seg" and acc[i, 3] > 0]
        gen = [i for i in range(T) if self.task_kinds[i] == "gen" and acc[i, 3] > 0]
        row["dice"] = float(acc[seg, 1].sum() / acc[seg, 3].sum()) if seg else float("nan")
        row["psnr"] = float(acc[gen, 1].sum() / acc[gen, 3].sum()) if gen else float("nan")
        if self.family == "randp":
            sg = [i for i in range(T) if acc[i, 5] > 0]
            row["ssim"] = float(acc[sg, 4].sum() / acc[sg, 5].sum()) if sg else float("nan")
        for i, tk in enumerate(self.tasks):
            metric = "dice" if self.task_kinds[i] == "seg" else "psnr"
            row[f"{tk.name}/loss"] = float(acc[i, 0] / acc[i, 2]) if acc[i, 2] else float("nan")
            row[f"{tk.name}/{metric}"] = float(acc[i, 1] / acc[i, 3]) if acc[i, 3] else float("nan")
            if self.family == "randp" and self.task_kinds[i] == "gen":
                row[f"{tk.name}/ssim"] = float(acc[i, 4] / acc[i, 5]) if acc[i, 5] else float("nan")
        return row

    def val_metric_names(self) -> dict[str, list[str]]:
        """Per task, the validation metrics of the papers: Dice (segmentation), PSNR (generation),
        and SSIM for RandP's generation tasks."""
        return {tk.name: list(m) for tk, m in zip(self.tasks, self.task_metrics)}

    # --------------------------------------------------------------------- fit
    def fit(self, max_steps: int | None = None, deadline: float | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``max_steps`` more steps: to simulate a kill in tests).

        ``deadline`` (a ``time.monotonic()`` value): stop at the first step that ends after it and
        write a checkpoint there, so a time-boxed run (a lent GPU's minutes) resumes exactly.

        Returns ``{"step", "loss" (last train loss), "best", "val" (last validation row), "out_dir",
        "stopped_at_deadline"}``.
        """
        t = self.cfg.train
        stop = t.steps if max_steps is None else min(t.steps, self.step + max_steps)
        logger = RunLogger(self.out_dir, [tk.name for tk in self.tasks], enabled=self.env.is_main,
                           total=t.steps, initial=self.step, progress=t.progress, tensorboard=t.tensorboard,
                           val_metrics=self.val_metric_names())
        if self.env.is_main and self.step == 0:
            n_par = sum(p.numel() for p in self.model.parameters())
            logger.write(f"{self.cfg.model.name}: {n_par:,} parameters, {self.env.world_size} process(es) on "
                         f"{self.device}, {t.steps} steps of {t.batch_size} x {self.env.world_size} episodes; "
                         f"tasks {', '.join(tk.name for tk in self.tasks)}; logs in {self.out_dir}")
        sampler = StepBatchSampler(self.step, stop, t.batch_size, self.env.rank)
        loader = make_loader(self.train_ds, sampler, self.cfg.data.num_workers, t.seed,
                             pin_memory=self.device.type == "cuda")
        last: dict[str, float] = {}
        stopped = False
        tic = time.perf_counter()
        try:
            for batch in loader:
                step = self.step
                last = self.train_step(batch, step)
                self.step = step + 1
                s = self.step
                L, l = context_size_for_step(self.cfg, step)
                if s % t.log_every == 0 or s == stop:
                    now = time.perf_counter()
                    names = sorted({self.tasks[i].name for i in batch["task"].tolist()})
                    logger.log_train({"step": s, **last, "context_size": L, "mini_context": l,
                                      "tasks": "+".join(names), "sec_per_step": (now - tic) / t.log_every})
                    tic = now
                logger.update(1, loss=last["loss"], lr=last["lr"])
                improved = False
                if s % t.val_every == 0 or s == t.steps:
                    val = self.validate()
                    self.last_val = val
                    logger.log_val({"step": s, **val})
                    if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        self.scheduler.step(val["loss"])
                    if val["loss"] < self.best:
                        self.best, improved = val["loss"], True
                late = False
                if deadline is not None and s < stop and (not self.env.distributed or s % t.log_every == 0):
                    # rank 0's clock decides, so every process stops at the same step
                    late = D.broadcast_flag(time.monotonic() >= deadline, self.env)
                if s % t.ckpt_every == 0 or s == t.steps or improved or late:
                    self.save_checkpoint(improved)
                if late:
                    stopped = True
                    break
        finally:
            logger.close()
        return {"step": self.step, "loss": last.get("loss", float("nan")), "best": self.best,
                "val": self.last_val, "out_dir": str(self.out_dir), "stopped_at_deadline": stopped}
