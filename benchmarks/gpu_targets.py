"""The GPU targets of the project, measured in one short run (GPU pass stage 6).

    python benchmarks/gpu_targets.py --device cuda --json bench.json --md bench.md
    python benchmarks/gpu_targets.py --device cpu --tiny      # the same code at toy sizes (dry run)

Sections, in priority order, each written to the JSON as soon as it is done (a kill at the
deadline keeps the finished ones); a section that fails records its error and the next runs:

- ``ceilings``: device-to-device copy bandwidth (bytes read + written) and a bf16 matrix product's
  rate, to read every other figure against.
- ``solver``: exact assignment, B=64 cosine costs, N=256 and 1024: vicl_fast CUDA vs
  torch-linear-assignment (CUDA) vs SciPy and the vicl_fast CPU kernel, one run; CUDA answers
  compared bit for bit with the CPU kernel's, totals with SciPy's.
- ``fusion``: the Neuroverse3D fusion block per U-Net stage of a 128^3 input (C=32..512), L=8,
  bf16 (every stage) and fp32 (stages 0 and 2): the Triton kernel (``fused``, W_t t included) vs
  the PyTorch composite (``reference``).
- ``neuroverse3d``: 128^3, L in {1, 8, 32}, l in {1, 4}, fast vs reference path, bf16 autocast
  (and fp32 at L=8, l=1): ms and peak memory.
- ``randp``: RandP ViT-L vs Painter ViT-L at batch 16, fp32 and bf16 weights, inference:
  ms / image and peak memory (``max_memory_allocated`` of each model alone), calls interleaved.

Times: CUDA events around each call after warm-up, median of the repeats (CPU: perf_counter).
Every figure is a single run on whatever machine this is; the JSON carries device and versions.
The ``targets`` list states each target, the measured value and whether it is met (None when the
figure could not be measured, e.g. on the CPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the bench_* modules' case builders


class Run:
    def __init__(self, device: str, tiny: bool, deadline: float, json_path: Path | None):
        self.device, self.tiny, self.deadline, self.json_path = device, tiny, deadline, json_path
        self.cuda = device == "cuda"
        self.data: dict = {"meta": _meta(device, tiny), "sections": {}, "targets": []}
        self.current = ""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    def peak_bytes(self, fn: Callable[[], object]) -> tuple[int | None, int | None]:
        """(max_memory_allocated during fn, that minus what was allocated before): CUDA only."""
        if not self.cuda:
            return None, None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        return peak, peak - base

    def section_result(self, out: dict) -> dict:
        """Register ``out`` as the running section's result now, so every save (and a kill in the
        middle of the section) keeps the cells done so far."""
        self.data["sections"][self.current] = {"status": "running", "result": out}
        return out

    def target(self, tid: str, what: str, target: str, measured: str, met: bool | None) -> None:
        self.data["targets"] = [t for t in self.data["targets"] if t["id"] != tid]
        self.data["targets"].append(dict(id=tid, what=what, target=target, measured=measured, met=met))

    def save(self) -> None:
        if self.json_path:
            tmp = self.json_path.with_name(self.json_path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            tmp.replace(self.json_path)


def _meta(device: str, tiny: bool) -> dict:
    m = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "tiny": tiny, "torch": torch.__version__,
         "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
         "threads": torch.get_num_threads()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, sm_count=p.multi_processor_count, cuda=torch.version.cuda,
                 capability=f"{p.major}.{p.minor}")
    try:
        import triton
        m["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        m["triton"] = None
    from vicl_fast.ops.fusion import triton_fusion_available
    m["triton_fusion"] = triton_fusion_available()
    if device == "cuda":
        from vicl_fast.models.vit import xformers_works
        m["xformers_attention_fp32"] = xformers_works(torch.device("cuda"), torch.float32)
        m["xformers_attention_bf16"] = xformers_works(torch.device("cuda"), torch.bfloat16)
    return m


def _require_triton(r: "Run") -> None:
    """On CUDA the fused paths must be the Triton kernel: a silent fallback would time the PyTorch
    composite under the kernel's name."""
    ok, why = r.data["meta"]["triton_fusion"]
    if r.cuda and not ok:
        raise RuntimeError(f"the Triton fusion kernel is unavailable ({why}): nothing to measure")


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2 ** 30, 3)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections

def sec_ceilings(r: Run) -> dict:
    n = (2 ** 28 if r.cuda else 2 ** 22)  # 1 GiB of fp32 on the GPU
    x = torch.randn(n, device=r.device)
    y = torch.empty_like(x)
    ms = r.median_ms(lambda: y.copy_(x), reps=20 if r.cuda else 3)
    bw = 2 * x.numel() * 4 / ms / 1e6  # GB/s, bytes read + written
    k = 8192 if r.cuda else 256
    dt = torch.bfloat16 if r.cuda else torch.float32
    a, b = torch.randn(k, k, device=r.device, dtype=dt), torch.randn(k, k, device=r.device, dtype=dt)
    ms_mm = r.median_ms(lambda: a @ b, reps=10 if r.cuda else 3)
    x = y = a = b = None  # free before the next section (the closures above are done)
    _free()
    return {"copy_gb_per_s": round(bw, 1), "matmul_tflops": round(2 * k ** 3 / ms_mm / 1e9, 1),
            "matmul": f"{k}^3 {str(dt).replace('torch.', '')} random"}


def sec_solver(r: Run) -> dict:
    import numpy as np
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    from bench_assignment import make_costs
    from vicl_fast import _ext

    try:
        import torch_linear_assignment as tla
    except ImportError:
        tla = None
    op = torch.ops.vicl_fast.linear_sum_assignment if _ext.has_kernel("linear_sum_assignment", "CPU") else None
    out: dict = r.section_result({"tla": getattr(tla, "__version__", "present") if tla else None, "cells": []})
    B = 4 if r.tiny else 64
    for N in ((32,) if r.tiny else (256, 1024)):
        if r.left() < 20:
            out["cells"].append({"N": N, "skipped": "out of time"})
            continue
        cost = make_costs("cosine", B, N)
        arr = cost.double().numpy()
        cell: dict = {"B": B, "N": N}
        t0 = time.perf_counter()
        ref = [scipy_lsa(c) for c in arr]
        totals = np.array([c[i, j].sum() for c, (i, j) in zip(arr, ref)])
        cell["scipy_ms_per_matrix"] = 1e3 * (time.perf_counter() - t0) / B  # float64 input, one call
        if r.left() > 30:
            cell["scipy_ms_per_matrix"] = r.median_ms(lambda: [scipy_lsa(c) for c in cost.numpy()],
                                                      reps=1 if N >= 1024 else 3, warmup=0) / B
        if op is not None:
            # interleave nothing here: the CPU kernel runs on the host while the GPU idles
            cell["vicl_cpu_ms_per_matrix"] = r.median_ms(lambda: op(cost, False), reps=3) / B
            r_cpu, c_cpu, _ = op(cost, False)
        if r.cuda:
            dev = cost.cuda()
            if _ext.has_kernel("linear_sum_assignment", "CUDA"):
                ms = r.median_ms(lambda: torch.ops.vicl_fast.linear_sum_assignment(dev, False), reps=50, warmup=3)
                cell["vicl_cuda_us_per_matrix"] = 1e3 * ms / B
                r_gpu, c_gpu, s_gpu = torch.ops.vicl_fast.linear_sum_assignment(dev, False)
                got = np.array([c[i, j].sum() for c, i, j in zip(arr, r_gpu.cpu().numpy(), c_gpu.cpu().numpy())])
                cell["vicl_cuda_max_total_diff_vs_scipy"] = float(np.abs(got - totals).max())
                if op is not None:
                    cell["vicl_cuda_identical_to_cpu"] = bool(torch.equal(r_gpu.cpu(), r_cpu)
                                                              and torch.equal(c_gpu.cpu(), c_cpu))
            if tla is not None and r.left() > 20:
                ms = r.median_ms(lambda: tla.batch_linear_assignment(dev), reps=10 if N <= 256 else 1, warmup=1)
                cell["tla_cuda_us_per_matrix"] = 1e3 * ms / B
                m = tla.batch_linear_assignment(dev).cpu().numpy()  # (B, N): column of each row
                got = np.array([c[np.arange(N), mi].sum() for c, mi in zip(arr, m)])
                cell["tla_max_total_diff_vs_scipy"] = float(np.abs(got - totals).max())
        out["cells"].append(cell)
        r.save()
    c256 = next((c for c in out["cells"] if c.get("N") == (32 if r.tiny else 256) and "B" in c), {})
    us = c256.get("vicl_cuda_us_per_matrix")
    r.target("solver_us", "vicl_fast CUDA solver, B=64 N=256 cosine, us per matrix", "<= 10",
             f"{us:.2f}" if us else "unmeasured", None if us is None else us <= 10)
    ident = [c.get("vicl_cuda_identical_to_cpu") for c in out["cells"] if "vicl_cuda_identical_to_cpu" in c]
    r.target("solver_identical", "CUDA answers bit-identical to the CPU kernel", "all sizes",
             str(ident) if ident else "unmeasured", all(ident) if ident else None)
    t_v, t_t = c256.get("vicl_cuda_us_per_matrix"), c256.get("tla_cuda_us_per_matrix")
    r.target("solver_vs_tla", "vicl_fast CUDA vs torch-linear-assignment, same run (N=256)", "faster",
             f"{t_t / t_v:.2f}x" if t_v and t_t else "unmeasured", None if not (t_v and t_t) else t_v < t_t)
    return out


def sec_fusion(r: Run) -> dict:
    from bench_fusion import STAGES, forms, make_case

    L = 2 if r.tiny else 8
    # bf16 at every stage, fp32 at two (each cell autotunes ~9 configs: compile time is the cost here)
    cases = [(torch.float32, (0, 8, 8))] if r.tiny else (
        [(torch.bfloat16, st) for st in STAGES] + [(torch.float32, STAGES[0]), (torch.float32, STAGES[2])])
    _require_triton(r)
    out: dict = r.section_result({"L": L, "cells": []})
    if r.cuda:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    else:
        def bench(fn):
            return r.median_ms(fn, reps=3)
    for dt, (stage, C, side) in cases:
        if r.left() < 10:
            out["cells"].append({"stage": stage, "skipped": "out of time"})
            continue
        fs = forms(*make_case(C, side, L, dt, r.device))
        cell = {"stage": stage, "C": C, "side": side, "dtype": str(dt).replace("torch.", "")}
        with torch.inference_mode():
            y, ref = fs["fused"]().float(), fs["reference"]().float()  # the autotuned kernel's answer
            cell["fused_max_rel_err"] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            del y, ref
            for name in ("fused", "reference", "fused_kernel", "authors"):
                fs[name]()
                cell[f"{name}_ms"] = bench(fs[name])
        cell["speedup_fused_vs_reference"] = cell["reference_ms"] / cell["fused_ms"]
        out["cells"].append(cell)
        del fs
        _free()
        r.save()
    errs = [c["fused_max_rel_err"] for c in out["cells"] if "fused_max_rel_err" in c]
    if errs:
        r.target("fusion_correct", "autotuned Triton block vs PyTorch composite, max relative error", "<= 2e-2",
                 f"{max(errs):.2e}", max(errs) <= 2e-2)
    sp = [c["speedup_fused_vs_reference"] for c in out["cells"] if "speedup_fused_vs_reference" in c]
    if r.cuda and sp:
        g = math.exp(statistics.mean(math.log(s) for s in sp))
        r.target("fusion_speedup", "Triton fusion block vs PyTorch composite (geo-mean of stages, L=8)",
                 ">= 1.5x", f"{g:.2f}x (min {min(sp):.2f}x)", g >= 1.5)
    else:
        r.target("fusion_speedup", "Triton fusion block vs PyTorch composite", ">= 1.5x", "unmeasured (no GPU)",
                 None)
    return out


def sec_neuroverse3d(r: Run) -> dict:
    from bench_neuroverse3d import _inputs
    from vicl_fast.models.neuroverse3d import Neuroverse3D

    _require_triton(r)
    side = 16 if r.tiny else 128
    cells = [(1, 1), (2, 1)] if r.tiny else [(1, 1), (8, 1), (8, 4), (32, 1), (32, 4)]
    torch.manual_seed(0)
    kw = {"channels": (4, 8, 8, 8, 8)} if r.tiny else {}
    m = Neuroverse3D(check_finite=False, **kw).to(r.device).eval()
    if r.cuda:
        m = m.to(memory_format=torch.channels_last_3d)
    out: dict = r.section_result({"side": side, "channels": list(getattr(m, "channels", []) or []), "cells": []})
    runs = [(L, l, "bf16") for L, l in cells] + ([] if r.tiny else [(8, 1, "fp32")])
    for L, l, dt in runs:
        t, ci, co = _inputs(side, L, r.device)
        cell: dict = {"L": L, "l": l, "dtype": dt}
        amp = torch.autocast(r.device, dtype=torch.bfloat16, enabled=dt == "bf16" and r.cuda)
        for path in ("fast", "reference"):
            if r.left() < 15:
                cell[path] = "skipped: out of time"
                continue

            def call(fast=path == "fast"):
                with amp:
                    m.predict(t, ci, co, l, fast=fast)

            call()  # warm-up: cuDNN algorithm choice, allocator growth
            peak, above = r.peak_bytes(call)
            cell[f"{path}_ms"] = r.median_ms(call, reps=3 if not r.tiny else 1, warmup=0)
            cell[f"{path}_peak_gib"], cell[f"{path}_peak_above_resident_gib"] = _gib(peak), _gib(above)
        if "fast_ms" in cell and "reference_ms" in cell:
            cell["speedup"] = cell["reference_ms"] / cell["fast_ms"]
        out["cells"].append(cell)
        t = ci = co = None
        _free()
        r.save()

    def find(L, l, dt="bf16"):
        return next((c for c in out["cells"] if (c["L"], c["l"], c["dtype"]) == (L, l, dt)), {})

    c8 = find(8, 1)
    sp = c8.get("speedup")
    r.target("nv3d_speedup", "Neuroverse3D 128^3 L=8 l=1 bf16: fast vs reference path", ">= 2x",
             f"{sp:.2f}x ({c8.get('fast_ms', 0):.1f} ms vs {c8.get('reference_ms', 0):.1f} ms)" if sp else "unmeasured",
             None if sp is None else sp >= 2)
    pk = c8.get("fast_peak_gib")
    r.target("nv3d_peak_l1", "Neuroverse3D 128^3 L=8 l=1 bf16 peak memory (fast; weights + inputs included)",
             "<= 3 GB", f"{pk:.2f} GiB" if pk is not None else "unmeasured",
             None if pk is None else pk * 2 ** 30 <= 3e9)
    a, b = find(1, 1).get("fast_peak_above_resident_gib"), find(32, 1).get("fast_peak_above_resident_gib")
    r.target("nv3d_flat", "Neuroverse3D 128^3 l=1 peak above resident, L=32 / L=1 (fast, bf16)", "<= 1.15",
             f"{b / a:.2f} ({a:.2f} -> {b:.2f} GiB)" if a and b else "unmeasured",
             None if not (a and b) else b / a <= 1.15)
    m = None
    _free()
    return out


def sec_randp(r: Run) -> dict:
    from vicl_fast.models import create_model

    names = ("randp_vit_tiny", "painter_vit_tiny") if r.tiny else ("randp_vit_l", "painter_vit_l")
    batch, reps = (2, 2) if r.tiny else (16, 10)
    out: dict = r.section_result({"batch": batch, "cells": []})
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if r.left() < 60 and not r.tiny:
            out["cells"].append({"dtype": dt_name, "skipped": "out of time"})
            continue
        models, inputs = {}, {}
        for name in names:
            torch.manual_seed(0)
            models[name] = create_model(name).to(r.device, dt).eval()
            size = models[name].img_size
            g = torch.Generator().manual_seed(0)
            inputs[name] = [torch.rand(batch, 3, size, size, generator=g).to(r.device, dt) for _ in range(3)]
        cell: dict = {"dtype": dt_name}
        times: dict[str, list[float]] = {n: [] for n in names}
        with torch.inference_mode():
            for name in names:
                models[name](*inputs[name])  # warm-up
                models[name](*inputs[name])
            for _ in range(reps):  # interleaved: both models see the same machine state
                for name in names:
                    times[name].append(r.median_ms(lambda n=name: models[n](*inputs[n]), reps=1, warmup=0))
            for name in names:
                own = sum(p.numel() * p.element_size() for p in models[name].parameters())
                own += sum(b.numel() * b.element_size() for b in models[name].buffers())
                own += sum(x.numel() * x.element_size() for x in inputs[name])
                _, above = r.peak_bytes(lambda n=name: models[n](*inputs[n]))
                cell[name] = {"ms_per_image": statistics.median(times[name]) / batch,
                              "peak_gib": _gib(None if above is None else own + above)}
        out["cells"].append(cell)
        models = inputs = None
        _free()
        r.save()
    rn, pn = names
    for c in out["cells"]:
        if rn not in c:
            continue
        ratio_t = c[rn]["ms_per_image"] / c[pn]["ms_per_image"]
        r.target(f"randp_time_{c['dtype']}", f"RandP ViT-L / Painter ms per image, batch {batch}, {c['dtype']}",
                 "<= 0.5", f"{ratio_t:.2f} ({c[rn]['ms_per_image']:.2f} vs {c[pn]['ms_per_image']:.2f} ms)",
                 ratio_t <= 0.5 if r.cuda else None)
        if c[rn]["peak_gib"] is not None:
            ratio_m = c[rn]["peak_gib"] / c[pn]["peak_gib"]
            r.target(f"randp_mem_{c['dtype']}", f"RandP ViT-L / Painter peak memory, batch {batch}, {c['dtype']}",
                     "<= 0.7", f"{ratio_m:.2f} ({c[rn]['peak_gib']:.2f} vs {c[pn]['peak_gib']:.2f} GiB)",
                     ratio_m <= 0.7)
        else:
            r.target(f"randp_mem_{c['dtype']}", f"RandP / Painter peak memory, {c['dtype']}", "<= 0.7",
                     "unmeasured (no GPU)", None)
    return out


SECTIONS = {"ceilings": sec_ceilings, "solver": sec_solver, "fusion": sec_fusion,
            "neuroverse3d": sec_neuroverse3d, "randp": sec_randp}


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"## GPU targets ({m.get('gpu', m['device'])}, torch {m['torch']}, triton {m.get('triton')}, "
             f"{m['date']}{', TINY sizes' if m['tiny'] else ''})", "",
             "| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['what']} | {t['target']} | {t['measured']} | "
                     f"{ {True: 'yes', False: 'NO', None: '-'}[t['met']] } |")
    for name, sec in data["sections"].items():
        lines += ["", f"### {name}: {sec.get('status')} ({sec.get('seconds', 0):.0f} s)", "",
                  "```", json.dumps(sec.get("result", sec.get("error")), indent=1, default=str)[:4000], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the dry run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--deadline-seconds", type=float, default=300)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_targets: no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    r = Run(a.device, a.tiny, time.monotonic() + a.deadline_seconds, a.json)
    failed = False
    for name in [s for s in a.sections.split(",") if s]:
        t0 = time.monotonic()
        r.current = name
        try:
            res = SECTIONS[name](r)
            r.data["sections"][name] = {"status": "done", "result": res}
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            failed = True
            r.data["sections"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
            print(traceback.format_exc(), file=sys.stderr)
            _free()
        r.data["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"gpu_targets: {name}: {r.data['sections'][name]['status']} "
              f"({r.data['sections'][name]['seconds']} s)", flush=True)
        r.save()
    md = markdown(r.data)
    if a.md:
        a.md.write_text(md)
    print(md.split("\n### ")[0])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
