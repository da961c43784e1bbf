"""Prompts for trained 2D vICL models (RandP Table 5): learned prompts and prompt selection.

* Learned prompts (:class:`LearnedPrompts`, :func:`fit_learned_prompts`): the
  trained model is frozen and each task gets its own learnable prompt pair,
  optimised with Adam at lr 1e-4 for a few epochs without warm-up (the paper:
  10 epochs). The pair lives in pixel space ``(T, C, H, W)``, the input of the
  patch embedding, so it works unchanged for every registered 2D model (ViT or
  U-Net). Initialise it from a real prompt pair per task (recommended) or from noise.
* Prompt selection (:class:`PromptSelector`): embed a pool of (image, label)
  pairs once, then give each query the pair whose image is most similar
  (cosine) to it, optionally restricted to the query's task. The default
  encoder is the model's own patch embedding, average-pooled to a small token
  grid (:class:`PatchEmbedEncoder`); any callable ``images -> (B, E)`` works
  (e.g. an external pretrained encoder, as in the paper).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.randp import randp_loss

__all__ = ["LearnedPrompts", "fit_learned_prompts", "PatchEmbedEncoder", "PixelEncoder", "PromptSelector"]


# ----------------------------------------------------------------------------- learned prompts

class LearnedPrompts(nn.Module):
    """One learnable prompt pair per task.

    Args:
        num_tasks: T.
        in_chans, img_size: shape of each prompt (C, H, W); ``img_size`` an int or (H, W).
        init_images, init_labels: optional (T, C, H, W) starting pairs (e.g. a
            random real pair per task); default: small noise around 0.5.
    Forward:
        task (B,) int64 -> (prompt_image (B, C, H, W), prompt_label (B, C, H, W)).
    """

    def __init__(self, num_tasks: int, in_chans: int = 3, img_size: int | tuple[int, int] = 256,
                 init_images: torch.Tensor | None = None, init_labels: torch.Tensor | None = None) -> None:
        super().__init__()
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        shape = (num_tasks, in_chans, H, W)
        for name, init in (("init_images", init_images), ("init_labels", init_labels)):
            if init is not None and tuple(init.shape) != shape:
                raise ValueError(f"{name} must be (T, C, H, W) = {shape}, got {tuple(init.shape)}")
        self.prompt_image = nn.Parameter(init_images.detach().clone().float() if init_images is not None
                                         else 0.5 + 0.01 * torch.randn(shape))
        self.prompt_label = nn.Parameter(init_labels.detach().clone().float() if init_labels is not None
                                         else 0.5 + 0.01 * torch.randn(shape))

    @property
    def num_tasks(self) -> int:
        return self.prompt_image.shape[0]

    def forward(self, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(task, torch.Tensor) or task.dim() != 1 or task.is_floating_point():
            raise ValueError("task must be a (B,) integer tensor of task ids")
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
            raise ValueError(f"task ids must be in [0, {self.num_tasks - 1}], got [{int(task.min())}, "
                             f"{int(task.max())}]")
        task = task.to(self.prompt_image.device).long()
        return self.prompt_image.index_select(0, task), self.prompt_label.index_select(0, task)


def fit_learned_prompts(model: nn.Module, prompts: LearnedPrompts,
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        epochs: int = 10, lr: float = 1e-4,
                        loss_fn: Callable[..., torch.Tensor] | None = None) -> list[float]:
    """Optimise ``prompts`` for a frozen ``model`` (Table 5's "Learned Prompt").

    The model is put in eval mode and its parameters are frozen for the
    duration (their ``requires_grad`` flags and the train/eval mode are
    restored afterwards); only the prompt pairs are updated, with Adam at
    ``lr`` and no warm-up.

    Args:
        model: a 2D vICL model ``(prompt_image, prompt_label, query_image) -> (B, 3, H, W)``.
        prompts: the per-task pairs to optimise.
        batches: a re-iterable of ``(query_image (B, C, H, W), query_label (B, 3, H, W), task (B,))``
            (e.g. a DataLoader), iterated once per epoch.
        epochs, lr: 10 and 1e-4 in the paper.
        loss_fn: ``(pred, target, logits, task) -> loss``; default :func:`randp_loss`
            (with the CE term when the model exposes task logits).
    Returns:
        mean loss of each epoch.
    """
    loss_fn = loss_fn or randp_loss
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(prompts.parameters(), lr=lr)
    history: list[float] = []
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for query_image, query_label, task in batches:
                pi, pl = prompts(task)
                pi, pl = pi.to(query_image.dtype), pl.to(query_image.dtype)
                if hasattr(model, "forward_with_logits"):
                    pred, logits = model.forward_with_logits(pi, pl, query_image)
                else:
                    pred, logits = model(pi, pl, query_image), None
                loss = loss_fn(pred, query_label, logits, None if logits is None else task.to(logits.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                n += 1
            history.append(total / max(n, 1))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return history


# ----------------------------------------------------------------------------- prompt selection

class PatchEmbedEncoder(nn.Module):
    """Image -> pooled patch-embedding descriptor (B, grid*grid*D).

    Uses a model's patch embedding (``model.fusion.patch_embed`` for RandP
    models, ``model.patch_embed`` for Painter, or any module
    ``(B, C, H, W) -> (B, N, D)`` / ``(B, D, h, w)``) and average-pools the
    token grid to ``grid x grid`` cells. ``grid=1`` is the plain mean patch
    embedding; note that, the patch embedding being linear, that is the
    embedding of the mean patch and is blind to anatomy layout, hence the
    default 4 x 4 grid.
    """

    def __init__(self, model_or_embed: nn.Module, grid: int = 4) -> None:
        super().__init__()
        m = model_or_embed
        if hasattr(m, "fusion") and hasattr(m.fusion, "patch_embed"):
            m = m.fusion.patch_embed
        elif hasattr(m, "patch_embed"):
            m = m.patch_embed
        self.embed = m
        self.grid = grid

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.embed(images)
        if z.dim() == 3:  # (B, N, D) row-major tokens -> (B, D, h, w)
            p = getattr(self.embed, "patch_size", None)
            h = images.shape[-2] // p if p else int(round(z.shape[1] ** 0.5))
            z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], h, -1)
        return F.adaptive_avg_pool2d(z.float(), self.grid).flatten(1)


class PixelEncoder(nn.Module):
    """Parameter-free descriptor: images average-pooled to ``size x size``, centred per image, (B, C*size*size)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)
        return x - x.mean(dim=1, keepdim=True)  # cosine of centred vectors = correlation


class PromptSelector:
    """Pick, for each query, the most similar prompt pair of a pool (cosine of encoder descriptors).

    Args:
        encoder: callable ``images (B, C, H, W) -> (B, E)``; default :class:`PixelEncoder`.
        batch_size: images per encoder call when indexing the pool.
    Usage:
        >>> sel = PromptSelector(PatchEmbedEncoder(model)).build(pool_images, pool_labels, pool_tasks)
        >>> prompt_image, prompt_label, idx = sel.select(query_image, task=task)
    """

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 64) -> None:
        self.encoder = encoder if encoder is not None else PixelEncoder()
        self.batch_size = batch_size
        self.images = self.labels = self.tasks = self.keys = None

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm float32 descriptors (B, E)."""
        outs = [self.encoder(images[i:i + self.batch_size]) for i in range(0, images.shape[0], self.batch_size)]
        return F.normalize(torch.cat(outs).float().flatten(1), dim=1)

    def build(self, images: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor | None = None) -> "PromptSelector":
        """Index a pool: images and labels (M, C, H, W), optional task ids (M,)."""
        if images.dim() != 4 or images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"pool images {tuple(images.shape)} and labels {tuple(labels.shape)} must be "
                             "(M, C, H, W) with the same M, H, W")
        if tasks is not None and tuple(tasks.shape) != (images.shape[0],):
            raise ValueError(f"pool tasks must be (M,) = ({images.shape[0]},), got {tuple(tasks.shape)}")
        self.images, self.labels, self.tasks = images, labels, tasks
        self.keys = self.embed(images)
        return self

    @torch.no_grad()
    def select(self, query_image: torch.Tensor, task: torch.Tensor | None = None, k: int = 1,
               exclude: torch.Tensor | None = None):
        """Most similar pool pairs for each query.

        Args:
            query_image: (B, C, H, W).
            task: optional (B,) ids; only pool pairs of the same task are eligible.
            k: pairs per query.
            exclude: optional (B,) pool index to skip per query (e.g. the query itself).
        Returns:
            (prompt_image, prompt_label, idx): (B, C, H, W) x2 and idx (B,) for
            k = 1; (B, k, C, H, W) x2 and (B, k) otherwise.
        """
        if self.keys is None:
            raise ValueError("call build(pool_images, pool_labels) before select()")
        sim = self.embed(query_image).to(self.keys.device) @ self.keys.T  # (B, M)
        if task is not None:
            if self.tasks is None:
                raise ValueError("task given but the pool was built without task ids")
            ok = task.to(self.tasks.device)[:, None] == self.tasks[None, :]
            sim = sim.masked_fill(~ok.to(sim.device), float("-inf"))
        if exclude is not None:
            sim = sim.scatter(1, exclude.long().view(-1, 1).to(sim.device), float("-inf"))
        if k > sim.shape[1]:
            raise ValueError(f"k={k} exceeds the pool size {sim.shape[1]}")
        val, idx = sim.topk(k, dim=1)
        if torch.isinf(val).any():
            raise ValueError("some query has fewer than k eligible pool pairs (check task ids / exclude)")
        idx_dev = idx.to(self.images.device)
        pi, pl = self.images[idx_dev], self.labels[idx_dev]
        if k == 1:
            return pi[:, 0], pl[:, 0], idx[:, 0]
        return pi, pl, idx
