"""Evaluation of an in-context model on the embedded held-out head (colin27): the main job's protocol.

Tasks (:data:`DEMO_TASKS`, synthesised by :mod:`vicl_fast.data.tasks3d` as in training): white
matter, deep grey matter, hippocampus and cerebellum segmentation; Gaussian denoising and bias-field
correction. Contexts are warped copies of icbm152 (a pool of :data:`CONTEXT_POOL`, not the training
copies); for every L, :data:`N_DRAWS` random draws of L contexts give the mean and std of Dice or
PSNR/SSIM for the model and for copy-the-prompt (RandP Table 2: the first context's output used as
the prediction). Every prediction goes through :class:`vicl_fast.inference.Predictor`, the path of
``vicl-fast predict``. :data:`TARGETS` are the shipped model's targets; :func:`figure` draws input,
reference, prediction and copy-the-prompt per task; :func:`peak_memory` measures a block's peak.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vicl_fast.errors import UsageError
from vicl_fast.training.demo_recipe import FOV_MM

__all__ = ["DemoTask", "DEMO_TASKS", "N_CONTEXTS", "CONTEXT_SEED", "CONTEXT_POOL", "N_DRAWS", "FULL_PROTOCOL_L",
           "demo_target", "context_pool", "context_draw", "showcase", "evaluate_protocol", "TARGETS", "check_targets", "table", "figure",
           "peak_memory", "learning_curve"]


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


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, Any]]:
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




def demo_target(grid: int):
    """colin27 on ``grid``^3, skull-stripped with its brain mask and percentile-normalised: the held-out
    target of every demo task (the training head, icbm152, has no skull)."""
    import dataclasses

    from vicl_fast.data.demo_data import load_demo_subjects
    from vicl_fast.training.demo_recipe import normalised

    t = load_demo_subjects(names=["colin27"], size=grid)[0]
    return normalised(dataclasses.replace(t, image=(t.image * t.masks["brain"]).astype(np.float32),
                                          has_skull=False))


def context_pool(grid: int, size: int = CONTEXT_POOL) -> list:
    """The first ``size`` warped copies of icbm152 (seed :data:`CONTEXT_SEED`) on ``grid``^3, normalised,
    with only the masks the demo tasks read (their structures; head and brain for the generation tasks'
    region): the same volumes as with every mask, loaded in a fraction of the time."""
    from vicl_fast.data.demo_data import load_demo_subjects
    from vicl_fast.training.demo_recipe import normalised

    masks = ["head", "brain"] + [t.params["name"] for t in DEMO_TASKS if t.params.get("source") == "mask"]
    return [normalised(s) for s in load_demo_subjects(names=["icbm152"], size=grid, n_augmented=size,
                                                      seed=CONTEXT_SEED, masks=masks)[1:]]


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
        raise UsageError(f"L = {L} contexts but the context pool holds {pool}")
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


def showcase(task: DemoTask, model, target, pool: Sequence[Any], grid: int, device: str, out: Path,
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
    with peak_memory(device) as mem:
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
                      Ls: Sequence[int], draws: int, seed: int, showcase_prediction: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Model and copy-the-prompt over ``draws`` random context draws per L (mean, std, values).

    ``showcase_prediction``: the prediction :func:`showcase` made with the same ``seed``, used as draw 0
    at L = :data:`N_CONTEXTS` (the same contexts and inputs) instead of predicting it again.
    """
    res: dict[str, Any] = {}
    for L in Ls:
        model_vals: dict[str, list[float]] = {}
        copy_vals: dict[str, list[float]] = {}
        for d in range(draws):
            ctx_subjects = [pool[i] for i in context_draw(L, d, len(pool))]
            (tin, tref), ctx = _demo_pairs(task, target, ctx_subjects, seed + 7919 * d)
            if d == 0 and L == N_CONTEXTS and showcase_prediction is not None:
                pred = showcase_prediction
            else:
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


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = "| task | metric | L | model (mean ± std) | copy-the-prompt (mean ± std) | draws |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        for L, p in r["protocol"].items():
            for m, st in p["model"].items():
                c = p["copy_prompt"][m]
                lines.append(f"| {r['task']} | {m} | {L} | {st['mean']:.4f} ± {st['std']:.4f} | "
                             f"{c['mean']:.4f} ± {c['std']:.4f} | {len(st['values'])} |")
    return lines


def figure(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
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




def learning_curve(path: Path, panels: Sequence[tuple[str, dict[str, Sequence[tuple[float, float]]]]],
                   xlabel: str = "training step") -> Path:
    """A PNG of line plots, one panel per ``(title, {series name: [(x, y), ...]})``, side by side
    (Pillow only: the package does not depend on matplotlib)."""
    from PIL import Image, ImageDraw

    from vicl_fast.data.io import atomic_write

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
               (140, 86, 75), (127, 127, 127)]
    pw, ph, m = 420, 300, 48
    img = Image.new("RGB", (pw * len(panels), ph), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = k * pw + m, 24, (k + 1) * pw - 12, ph - m + 8
        pts = [p for s in series.values() for p in s]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ylo, yhi = min(ys), max(ys)
        pad = 0.05 * (yhi - ylo or 1.0)
        ylo, yhi = ylo - pad, yhi + pad

        def at(x: float, y: float) -> tuple[float, float]:
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text((x0, 6), title, fill=(0, 0, 0))
        for t in range(5):  # ticks
            yv = ylo + (yhi - ylo) * t / 4
            draw.text((k * pw + 2, at(xlo, yv)[1] - 6), f"{yv:.3g}", fill=(80, 80, 80))
            xv = xlo + (xhi - xlo) * t / 4
            draw.text((at(xv, ylo)[0] - 12, y1 + 4), f"{xv:.0f}", fill=(80, 80, 80))
        draw.text(((x0 + x1) // 2 - 30, ph - 16), xlabel, fill=(0, 0, 0))
        for j, (name, s) in enumerate(series.items()):
            c = colours[j % len(colours)]
            line = [at(x, y) for x, y in sorted(s)]
            if len(line) > 1:
                draw.line(line, fill=c, width=2)
            for q in line:
                draw.ellipse((q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2), fill=c)
            draw.text((x0 + 6, y0 + 4 + 12 * j), name, fill=c)
    path = Path(path)
    with atomic_write(path) as tmp:
        img.save(str(tmp), format="PNG")
    return path
