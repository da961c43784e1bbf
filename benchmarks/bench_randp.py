"""RandP paper, Table 2 cost columns: MACs / FLOPs, ms per image, peak memory, Hungarian share.

Runs:
    pytest benchmarks/bench_randp.py --benchmark-only               # MACs of all models + reduced time set
    pytest benchmarks/bench_randp.py --benchmark-only --bench-full  # every model x fp32/bf16 x inference/train
    VICL_FAST_RANDP_MD=table.md pytest ...                          # also write the markdown table

Models: randp_vit_l, painter_vit_l, promptgip_vit_l, mae_vqgan_vit_l,
randp_swinunetr, randp_uxnet, randp_restormer (256 x 256 images, random
weights and inputs; the costs do not depend on the values).

Columns:

- **MACs** (per image, inference): shape-only count on the ``meta`` device
  (:func:`vicl_fast.flops.count_macs_meta`, ~1 s per model on one core),
  FLOPs = 2 x MACs, and the split into matrix products / convolutions
  (:func:`vicl_fast.flops.macs_by_kind`; the paper's 429 G for Painter is the
  matrix-product MACs of one stream + the head Linear, its 258 G for RandP is
  2 x the matrix-product MACs: see benchmarks/RESULTS.md, "RandP Table 2").
  Asserted: RandP / Painter MACs <= 0.62, Painter within 3% of 429 G.
- **ms / image**: best round / batch. GPU: batch 16, CUDA-synchronised, 10
  rounds after 3 warm-up calls. CPU: batch ``VICL_FAST_RANDP_CPU_BATCH``
  (default 1), 2 rounds after 1 warm-up call; only randp_vit_l,
  painter_vit_l and randp_uxnet in fp32 inference unless ``--bench-full``.
- **peak memory** of one call (inference forward, or one training step:
  forward + loss + backward + AdamW step, optimizer state already allocated),
  as tensor bytes on both devices (see :class:`_Peak`). GPU:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  CPU: resident tensors (weights, buffers, gradients, AdamW state, inputs)
  + the peak of the tensor bytes live during the call, from the
  ``torch.profiler`` memory events (the CPU has no allocator statistics; the
  process RSS would mix in library caches and freed-but-kept pages). The
  resident part is also reported on its own.
- **dtypes**: fp32; bf16 = bfloat16 weights for inference (deployment),
  ``torch.autocast(bfloat16)`` over fp32 master weights for training.
- **Hungarian share**: time of RandP's matching step (cosine cost + batched
  exact assignment, :func:`vicl_fast.ops.retrieve.match_tokens`) on the
  forward's own (B, 256, 1024) tokens, divided by the whole forward's time,
  same device / batch / dtype, best of several calls each. Target (paper): under 2%.

Training steps per model: RandP models ``randp_loss`` (smooth-L1 + 0.1 CE);
Painter its masked smooth-L1 (``training_loss``, block masking); PromptGIP /
MAE-VQGAN their MIM objectives (``forward_mim``).
"""
from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from vicl_fast.flops import count_macs_meta, macs_by_kind, meta_model
from vicl_fast.models import create_model
from vicl_fast.models.randp import randp_loss

MODELS = ("randp_vit_l", "painter_vit_l", "promptgip_vit_l", "mae_vqgan_vit_l",
          "randp_swinunetr", "randp_uxnet", "randp_restormer")
PAPER = {  # Table 2 (RTX 3090): "FLOPs" (G), ms / image, GB at batch 16
    "randp_vit_l": (258, 14.4, 10.7), "painter_vit_l": (429, 30.6, 15.5),
    "promptgip_vit_l": (670, 33.1, 18.8), "mae_vqgan_vit_l": (664, 33.2, 20.5),
}
CPU_DEFAULT = {("randp_vit_l", "fp32", "inference"), ("painter_vit_l", "fp32", "inference"),
               ("randp_uxnet", "fp32", "inference")}
SIZE = 256
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = 16 if CUDA else int(os.environ.get("VICL_FAST_RANDP_CPU_BATCH", "1"))

_ROWS: dict[str, dict] = {}
_EXTRA: dict[str, object] = {}


# ----------------------------------------------------------------------------- helpers

class _Peak:
    """Peak tensor memory of one call, the same quantity on both devices.

    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    (everything allocated: weights, optimizer state, inputs, activations).
    CPU: the tensor bytes resident before the call (``resident``: weights,
    buffers, gradients, optimizer state, inputs) plus the peak of the live
    tensor bytes allocated during the call, replayed from the allocation /
    free events of ``torch.profiler`` (``profile_memory=True``). Library
    caches (oneDNN scratchpads, glibc arenas) are not tensors and are not
    counted, as on the GPU. Frees of blocks allocated before the call (the
    previous step's gradients, freed by ``zero_grad``) are not in the events;
    that is why the resident part excludes gradients.
    """

    def __init__(self, resident: int) -> None:
        self.resident = resident

    def run(self, fn) -> int:
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return self.resident + peak


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _inputs(n: int = 4, batch: int = BATCH, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(batch, 3, SIZE, SIZE, generator=g).to(DEVICE, dtype) for _ in range(n)]


_MODEL: dict[str, object] = {}


def _model(name: str) -> torch.nn.Module:
    """One full-size model alive at a time (a ViT-L is 1.3-1.6 GB in fp32)."""
    if _MODEL.get("name") != name:
        _MODEL.clear()
        gc.collect()
        torch.manual_seed(0)
        _MODEL.update(name=name, model=create_model(name).to(DEVICE))
    return _MODEL["model"]


def _row(name: str) -> dict:
    return _ROWS.setdefault(name, {})


def _train_step_fn(name: str, model: torch.nn.Module, x: list[torch.Tensor], autocast: bool):
    """One training step (forward + loss + backward + AdamW) of the model's own objective."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pi, pl, qi, ql = x
    task = torch.arange(pi.shape[0], device=pi.device) % 4

    def loss_fn() -> torch.Tensor:
        if hasattr(model, "forward_mim"):          # PromptGIP / MAE-VQGAN
            return model.forward_mim(pi, pl, qi, ql)["loss"]
        if hasattr(model, "training_loss"):        # Painter
            return model.training_loss(pi, pl, qi, ql)
        pred, logits = model.forward_with_logits(pi, pl, qi)
        return randp_loss(pred, ql, logits, task % logits.shape[1] if logits is not None else None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        opt.step()
        _sync()

    step()  # allocates gradients and AdamW state before anything is measured
    return step, opt


def _state_bytes(model: torch.nn.Module, opt=None) -> int:
    """Weights, buffers and optimizer state. Not the gradients: each step frees them first
    (``zero_grad(set_to_none=True)``) and allocates them again, so they are part of the step's peak."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    if opt is not None:
        for st in opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if not _ROWS:
        return
    md = _markdown()
    print("\n" + md)
    path = os.environ.get("VICL_FAST_RANDP_MD")
    if path:
        Path(path).write_text(md + "\n")


def _markdown() -> str:
    env = (f"device: {torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine()} "
           f"({'batch 16' if CUDA else f'CPU, {torch.get_num_threads()} threads, batch {BATCH}'}); "
           f"torch {torch.__version__}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out = [env, ""]
    out.append("| model | params (M) | GMACs | GFLOPs | matmul GMACs | conv GMACs | paper G |")
    out.append("|---|---|---|---|---|---|---|")
    for name in MODELS:
        r = _ROWS.get(name, {})
        if "gmacs" not in r:
            continue
        paper = PAPER.get(name, ("-",))[0]
        out.append(f"| {name} | {r['params_m']:.1f} | {r['gmacs']:.2f} | {2 * r['gmacs']:.2f} | "
                   f"{r['matmul_gmacs']:.2f} | {r['conv_gmacs']:.2f} | {paper} |")
    cells = [(n, k) for n in MODELS for k in sorted(_ROWS.get(n, {})) if k.startswith("time:")]
    if cells:
        mem = "peak GiB (max_memory_allocated)" if CUDA else "peak GiB (resident + live tensor peak)"
        out += ["", f"| model | dtype | mode | ms / image | {mem} | of which resident (GiB) |",
                "|---|---|---|---|---|---|"]
        for n, k in cells:
            _, dtype, mode = k.split(":")
            c = _ROWS[n][k]
            out.append(f"| {n} | {dtype} | {mode} | {c['ms']:.1f} | {c['peak_gib']:.2f} | {c['resident_gib']:.2f} |")
    for k, v in _EXTRA.items():
        out.append(f"\n{k}: {v}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- MACs (always, shape-only)

@pytest.mark.parametrize("name", MODELS)
def test_macs(benchmark, name):
    shapes = [(1, 3, SIZE, SIZE)] * 3

    def count():
        return count_macs_meta(lambda: create_model(name).eval(), *shapes)

    rep = benchmark.pedantic(count, rounds=1, iterations=1)
    kinds = macs_by_kind(rep)
    params = sum(p.numel() for p in meta_model(lambda: create_model(name)).parameters())
    r = _row(name)
    r.update(gmacs=rep.macs / 1e9, matmul_gmacs=kinds["matmul"] / 1e9, conv_gmacs=kinds["conv"] / 1e9,
             params_m=params / 1e6)
    benchmark.extra_info.update(gmacs=r["gmacs"], gflops=2 * r["gmacs"], matmul_gmacs=r["matmul_gmacs"])
    assert rep.macs > 0


def test_macs_targets(benchmark):
    """RandP / Painter <= 0.62 (paper 258 / 429) and Painter ~429 G, counted in one run."""
    shapes = [(1, 3, SIZE, SIZE)] * 3

    def both():
        return (count_macs_meta(lambda: create_model("randp_vit_l").eval(), *shapes),
                count_macs_meta(lambda: create_model("painter_vit_l").eval(), *shapes))

    randp, painter = benchmark.pedantic(both, rounds=1, iterations=1)
    ratio = randp.macs / painter.macs
    paper_randp = 2 * macs_by_kind(randp)["matmul"] / 1e9  # the paper's convention for its RandP figure
    _EXTRA["RandP / Painter MACs"] = f"{ratio:.3f} (target <= 0.62; paper 258 / 429 = 0.601)"
    _EXTRA["RandP matmul FLOPs (2 x matmul MACs)"] = f"{paper_randp:.1f} G (paper: 258)"
    benchmark.extra_info.update(ratio=ratio, painter_gmacs=painter.macs / 1e9, randp_gmacs=randp.macs / 1e9)
    assert ratio <= 0.62
    assert abs(painter.macs / 429e9 - 1) < 0.03
    assert abs(paper_randp / 258 - 1) < 0.01


# ----------------------------------------------------------------------------- time and memory

def _cells():
    for name in MODELS:
        for dtype in ("fp32", "bf16"):
            for mode in ("inference", "train"):
                slow = not CUDA and (name, dtype, mode) not in CPU_DEFAULT
                yield pytest.param(name, dtype, mode, marks=[pytest.mark.slow] if slow else [],
                                   id=f"{name}-{dtype}-{mode}")


@pytest.mark.parametrize("name, dtype, mode", list(_cells()))
def test_time_memory(benchmark, name, dtype, mode):
    model = _model(name)
    bf16 = dtype == "bf16"
    rounds, warmup = (10, 3) if CUDA else (2, 1)
    if mode == "inference":
        model.eval().to(torch.bfloat16 if bf16 else torch.float32)
        x = _inputs(3, dtype=torch.bfloat16 if bf16 else torch.float32)

        def call() -> None:
            with torch.inference_mode():
                model(*x)
            _sync()

        opt = None
    else:
        model.train().float()
        x = _inputs(4)
        call, opt = _train_step_fn(name, model, x, autocast=bf16)
        warmup = max(warmup - 1, 0)  # _train_step_fn already ran one step
    for _ in range(warmup):
        call()
    resident = _state_bytes(model, opt) + sum(t.numel() * t.element_size() for t in x)
    peak = _Peak(resident).run(call)
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    ms = 1e3 * benchmark.stats.stats.min / BATCH
    _row(name)[f"time:{dtype}:{mode}"] = dict(ms=ms, peak_gib=peak / 2 ** 30, resident_gib=resident / 2 ** 30)
    benchmark.extra_info.update(ms_per_image=ms, peak_gib=peak / 2 ** 30, batch=BATCH, device=DEVICE)
    if opt is not None:  # give the optimizer state back before the next cell
        del opt
        model.zero_grad(set_to_none=True)
        gc.collect()


# ----------------------------------------------------------------------------- Hungarian share

def _best_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)  # least disturbed by other load on a shared machine


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=[] if CUDA else [pytest.mark.slow])])
def test_hungarian_share(benchmark, dtype):
    from vicl_fast.ops.assignment import matching_permutation
    from vicl_fast.ops.randp_kernels import cosine_cost
    from vicl_fast.ops.retrieve import match_tokens

    wdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = _model("randp_vit_l").eval().to(wdtype)
    x = _inputs(3, dtype=wdtype)
    n = 10 if CUDA else 3
    with torch.inference_mode():
        model(*x)  # warm-up
        x_pi, _, x_qi, _ = model.fusion.encode(*model.fusion.embed(*x))  # the forward's own (B, 256, D) tokens
        t_forward = _best_time(lambda: model(*x), n)
        t_match = _best_time(lambda: match_tokens(x_pi, x_qi, "hungarian"), 5 * n)
        cost = cosine_cost(x_pi, x_qi)
        t_solver = _best_time(lambda: matching_permutation(cost, check=not CUDA), 5 * n)
        benchmark.pedantic(lambda: match_tokens(x_pi, x_qi, "hungarian"), rounds=n, iterations=1)
    share = t_match / t_forward
    _EXTRA[f"Hungarian share ({dtype}, {DEVICE}, batch {BATCH})"] = (
        f"{100 * share:.3f}% of the forward (match {1e3 * t_match:.2f} ms incl. cosine cost, solver alone "
        f"{1e3 * t_solver:.2f} ms; forward {1e3 * t_forward:.1f} ms); target < 2%")
    benchmark.extra_info.update(share=share, match_ms=1e3 * t_match, solver_ms=1e3 * t_solver,
                                forward_ms=1e3 * t_forward)
    assert share < 0.02
