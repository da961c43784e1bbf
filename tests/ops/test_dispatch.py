"""The backend dispatcher (vicl_fast/ops/_dispatch.py).

- select() takes the first usable backend by priority, caches it, and raises an
  error listing every backend with its reasons when none fits;
- the environment variables turn backends off with a "disabled by VAR=value" reason;
- the choice equals the ad-hoc checks it replaced, for every combination of
  inputs, variables and machine facts (the old checks are transcribed below as
  the oracle; the probes are patched, so GPU-machine cases run on a CPU);
- explain() lists every backend of every op; every variable the package reads is
  in the documented table.
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vicl_fast import _ext
from vicl_fast.models import vit
from vicl_fast.ops import _dispatch as d
from vicl_fast.ops import fusion
from vicl_fast.ops import randp_kernels as rk
from vicl_fast.ops.assignment import lsa_backend

ROOT = Path(__file__).resolve().parents[2]
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
BACKEND_VARS = [v.name for v in d.ENV_VARS.values() if v.backend]


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    """Every test starts and ends with an empty cache, with no backend variable set."""
    for name in BACKEND_VARS:
        monkeypatch.delenv(name, raising=False)
    d.clear_cache()
    yield
    d.clear_cache()  # before monkeypatch restores the probes: nothing patched stays cached


class _Toy:
    """A throw-away op "toy": backends fast/medium/slow need level >= 3/2/1; ``calls`` records the
    checks run; ``checks[name]`` may be replaced by a test."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.checks = {name: self._needs(need) for name, need in (("fast", 3), ("medium", 2), ("slow", 1))}

    def _needs(self, need: int):
        def check(reasons, *, level):
            self.calls.append(need)
            if level < need:
                reasons.append(f"needs level >= {need} (got {level})")
        return check


@pytest.fixture
def toy_op():
    toy = _Toy()
    spec = d._op("toy", "a test op", typical=lambda: {"level": 2}, env=("VICL_FAST_DISABLE_TRITON",))
    for name in toy.checks:
        d._backend(spec, name, f"the {name} one")(lambda reasons, n=name, **inputs: toy.checks[n](reasons, **inputs))
    yield toy
    del d._OPS["toy"]
    for name in toy.checks:
        del d._BY_NAME["toy", name]


# ----------------------------------------------------------------------------- the mechanism

def test_registry_ops_and_priorities():
    assert d.ops() == ("linear_sum_assignment", "cosine_cost", "gather_rows_add", "conv_fusion",
                       "fusion_block", "attention")
    names = {op: [b.name for b in d.backends(op)] for op in d.ops()}
    assert names == {
        "linear_sum_assignment": ["compiled", "compiled-cpu-roundtrip", "scipy"],
        "cosine_cost": ["cuda", "reference"],
        "gather_rows_add": ["cuda", "reference"],
        "conv_fusion": ["onednn", "reference"],
        "fusion_block": ["triton", "onednn", "reference"],
        "attention": ["xformers", "sdpa", "math"],
    }
    for op in d.ops():
        assert [b.priority for b in d.backends(op)] == list(range(len(d.backends(op))))
        assert all(b.op == op and b.summary for b in d.backends(op))
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        d.select("nope", device=CPU)


def test_select_takes_first_usable_and_caches(toy_op, monkeypatch):
    assert d.select("toy", level=3).name == "fast"
    assert d.select("toy", level=2).name == "medium"
    assert d.select("toy", level=1).name == "slow"
    assert toy_op.calls == [3, 3, 2, 3, 2, 1]  # stops at the first usable backend
    toy_op.calls.clear()
    assert d.select("toy", level=2).name == "medium"
    assert toy_op.calls == []  # cached: no check runs again
    monkeypatch.setenv("VICL_FAST_DISABLE_TRITON", "1")  # one of the op's variables: a new cache key
    assert d.select("toy", level=2).name == "medium"
    assert toy_op.calls == [3, 2]
    assert d.backends("toy")[0].not_supported_reasons(level=0) == ["needs level >= 3 (got 0)"]


def test_no_backend_error_lists_every_backend(toy_op):
    with pytest.raises(d.NoBackendError) as info:
        d.select("toy", level=0)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert msg.startswith("no backend of `toy` can run (level=0):")
    for name, need in (("fast", 3), ("medium", 2), ("slow", 1)):
        assert f"  {name}: needs level >= {need} (got 0)" in msg
    assert "vicl-fast info --explain" in msg


def test_choice_is_made_at_trace_time_under_compile(toy_op):
    """Inside torch.compile the probes run eagerly once (they are not traceable: here an import and
    a C++ dispatcher query); the graph holds the chosen branch only."""
    seen = []

    def untraceable(reasons, *, level):
        seen.append(torch.compiler.is_compiling())
        __import__("json")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::add.Tensor", "CPU") or level < 5:
            reasons.append("never")

    toy_op.checks["fast"] = untraceable

    def f(x):
        name = d.select("toy", level=2).name
        return x + 1 if name == "medium" else x - 1

    torch._dynamo.reset()
    try:
        out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3))
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, torch.ones(3))
    assert seen and all(seen)
    # The dispatcher sets the mark by hand (importing torch._dynamo would import triton): still the same mark.
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), "_dynamo_marked_constant", False)


def test_import_does_not_import_dynamo_or_triton():
    code = ("import sys, torch, vicl_fast\n"
            "from vicl_fast.ops import _dispatch\n"
            "from vicl_fast.models import vit\n"
            "_dispatch.explain_all()\n"
            "vit.Attention(8, 2)(torch.randn(1, 3, 8))\n"
            "bad = [m for m in ('triton', 'torch._dynamo', 'xformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- environment variables

def test_env_vars_disable_backends_with_reasons(monkeypatch):
    monkeypatch.setattr(fusion, "mkldnn_fusion_available", lambda: (True, ""))
    cpu_inf = dict(device=CPU, dtype=F32, grad_enabled=False, cpu_autocast=False)
    fb = dict(cpu_inf, weight_dtype=F32, spatial_dims=3)
    assert d.select("conv_fusion", **cpu_inf).name == "onednn"
    assert d.select("fusion_block", **fb).name == "onednn"
    monkeypatch.setenv("VICL_FAST_DISABLE_MKLDNN", "1")
    assert d.select("conv_fusion", **cpu_inf).name == "reference"
    assert d.select("fusion_block", **fb).name == "reference"
    assert d.backends("conv_fusion")[0].not_supported_reasons(**cpu_inf) == [
        "disabled by VICL_FAST_DISABLE_MKLDNN=1"]
    assert d.backends("fusion_block")[1].not_supported_reasons(**fb) == ["disabled by VICL_FAST_DISABLE_MKLDNN=1"]

    monkeypatch.setattr(fusion, "triton_fusion_available", lambda: (True, ""))  # no triton import here
    monkeypatch.setattr(d, "_installed", lambda module: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert d.select("fusion_block", **fb).name == "triton"
    monkeypatch.setenv("VICL_FAST_DISABLE_TRITON", "1")
    assert d.backends("fusion_block")[0].not_supported_reasons(**fb) == ["disabled by VICL_FAST_DISABLE_TRITON=1"]
    assert d.select("fusion_block", **fb).name == "reference"


def test_lsa_backend_variable(monkeypatch):
    monkeypatch.setattr(d, "_missing_kernel", lambda op, key: None)  # every kernel present
    assert lsa_backend("cpu") == "compiled"
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", " SciPy ")  # read stripped and lower-cased, as before
    assert lsa_backend("cpu") == lsa_backend("cuda") == "scipy"
    compiled = d.backends("linear_sum_assignment")[0]
    assert compiled.not_supported_reasons(device=CPU) == ["disabled by VICL_FAST_LSA_BACKEND=scipy"]
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VICL_FAST_LSA_BACKEND='nonsense': expected one of auto, compiled, scipy"):
        lsa_backend("cpu")
    assert "expected one of" in d.explain("linear_sum_assignment")  # the report shows it instead of failing
    # compiled forced and no kernel: an error that names every backend and why
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", "compiled")
    monkeypatch.setattr(d, "_missing_kernel", lambda op, key: "extension not built")
    with pytest.raises(RuntimeError) as info:
        lsa_backend("cpu")
    msg = str(info.value)
    assert "VICL_FAST_LSA_BACKEND=compiled" in msg
    assert "  compiled: no CPU kernel: extension not built" in msg
    assert "  compiled-cpu-roundtrip: needs a CUDA input (got cpu); no CPU kernel: extension not built" in msg
    assert "  scipy: disabled by VICL_FAST_LSA_BACKEND=compiled" in msg


def test_env_table_documents_every_variable():
    """Every variable named in the package, setup.py and csrc is in ENV_VARS and in the module docstring."""
    doc = d.__doc__
    for name in d.ENV_VARS:
        assert name in doc, f"{name} missing from the table in vicl_fast/ops/_dispatch.py's docstring"
    found = set()
    files = [*(ROOT / "vicl_fast").rglob("*.py"), ROOT / "setup.py",
             *(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h"))]
    for path in files:
        found |= set(re.findall(r"\bVICL_FAST_[A-Z0-9_]+", path.read_text(errors="replace")))
    found -= {"VICL_FAST_WITH_CUDA"}  # a C macro set by setup.py, not an environment variable
    missing = sorted(found - set(d.ENV_VARS))
    assert not missing, f"add {missing} to ENV_VARS and the table in vicl_fast/ops/_dispatch.py"
    with pytest.raises(KeyError):
        d.env("VICL_FAST_UNDOCUMENTED")


# ----------------------------------------------------------------------------- same choices as before

def _old_lsa(device: torch.device, want: str | None, kernels: set[str]) -> str:
    """assignment.lsa_backend before the dispatcher."""
    want = (want if want is not None else "auto").strip().lower() or "auto"
    if want not in ("auto", "compiled", "scipy"):
        raise ValueError(want)
    if want == "scipy":
        return "scipy"
    key = "CUDA" if device.type == "cuda" else "CPU"
    if key in kernels:
        return "compiled"
    if key == "CUDA" and "CPU" in kernels:
        return "compiled-cpu-roundtrip"
    if want == "compiled":
        raise RuntimeError(want)
    return "scipy"


def _old_use_triton(device, dtype, disable, interpret, triton_ok) -> bool:
    """fusion._use_triton before the dispatcher."""
    if disable == "1" or dtype not in (F32, F16, BF16):
        return False
    if not (device.type == "cuda" or (device.type == "cpu" and interpret == "1")):
        return False
    return triton_ok


def _old_use_mkldnn(device, dtype, grad, autocast, disable, mkldnn_ok) -> bool:
    """fusion.use_mkldnn_fusion before the dispatcher (outside torch.compile)."""
    return device.type == "cpu" and dtype == F32 and not grad and not autocast and disable != "1" and mkldnn_ok


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture
def env_restored():
    saved = {n: os.environ.get(n) for n in BACKEND_VARS}
    yield
    for n, v in saved.items():
        _set(n, v)


@pytest.mark.usefixtures("env_restored")
def test_lsa_and_randp_match_the_old_checks(monkeypatch):
    for kernels in (set(), {"CPU"}, {"CUDA"}, {"CPU", "CUDA"}):
        monkeypatch.setattr(d, "_missing_kernel", lambda op, key, k=kernels: None if key in k else "not built")
        d.clear_cache()
        for device, want in itertools.product((CPU, CUDA, META), (None, "auto", "compiled", "scipy", " Scipy ", "")):
            _set("VICL_FAST_LSA_BACKEND", want)
            try:
                expected = _old_lsa(device, want, kernels)
            except RuntimeError:
                with pytest.raises(d.NoBackendError):
                    lsa_backend(device)
                continue
            assert lsa_backend(device) == expected, (kernels, device, want)
        for device in (CPU, CUDA, META):
            old = "cuda" if device.type == "cuda" and "CUDA" in kernels else "reference"
            t = torch.empty(1, 1, 1, device="meta") if device.type != "cpu" else torch.empty(1, 1, 1)
            assert d.select("cosine_cost", device=device).name == old
            assert d.select("gather_rows_add", device=device).name == old
            if device.type == "cpu":
                assert rk._use_cuda_kernel("cosine_cost", t) is False


@pytest.mark.usefixtures("env_restored")
def test_fusion_matches_the_old_checks(monkeypatch):
    monkeypatch.setattr(d, "_installed", lambda module: True)
    flags = (None, "1", "0")
    for triton_ok, mkldnn_ok in itertools.product((True, False), (True, False)):
        monkeypatch.setattr(fusion, "triton_fusion_available", lambda ok=triton_ok: (ok, "" if ok else "E: x"))
        monkeypatch.setattr(fusion, "mkldnn_fusion_available", lambda ok=mkldnn_ok: (ok, "" if ok else "E: x"))
        d.clear_cache()
        for dis_t, interp, dis_m in itertools.product(flags, flags, flags):
            _set("VICL_FAST_DISABLE_TRITON", dis_t)
            _set("TRITON_INTERPRET", interp)
            _set("VICL_FAST_DISABLE_MKLDNN", dis_m)
            for device, dtype, wdtype, nsp, grad, autocast in itertools.product(
                    (CPU, CUDA), (F32, F16, BF16, F64), (F32, F64), (1, 2, 3), (False, True), (False, True)):
                use_mk = _old_use_mkldnn(device, dtype, grad, autocast, dis_m, mkldnn_ok)
                if _old_use_triton(device, dtype, dis_t, interp, triton_ok):
                    old = "triton"
                elif 2 <= nsp <= 3 and use_mk and wdtype == dtype:
                    old = "onednn"
                else:
                    old = "reference"
                inputs = dict(device=device, dtype=dtype, grad_enabled=grad, cpu_autocast=autocast)
                got = d.select("fusion_block", weight_dtype=wdtype, spatial_dims=nsp, **inputs).name
                assert got == old, (triton_ok, mkldnn_ok, dis_t, interp, dis_m, inputs, wdtype, nsp)
                assert (d.select("conv_fusion", **inputs).name == "onednn") == use_mk


def test_attention_matches_the_old_check(monkeypatch):
    for installed, importable, works in itertools.product((False, True), repeat=3):
        monkeypatch.setattr(d, "_installed", lambda module, i=installed: i)
        monkeypatch.setattr(vit, "xformers_available", lambda i=installed and importable: i)
        monkeypatch.setattr(vit, "xformers_works", lambda dev, dt, w=installed and importable and works: w)
        d.clear_cache()
        for device, dtype, fused in itertools.product((CPU, CUDA), (F32, BF16), (False, True)):
            xf = installed and importable and works  # old: xformers_works() is False unless importable
            old = "xformers" if fused and device.type == "cuda" and xf else ("sdpa" if fused else "math")
            assert d.select("attention", device=device, dtype=dtype, fused=fused).name == old


def test_this_machine_picks_what_the_old_code_picked(monkeypatch):
    """Unpatched probes: the choices on this machine, as measured before the dispatcher."""
    has_cpu = _ext.has_kernel("linear_sum_assignment", "CPU")
    has_cuda = _ext.has_kernel("linear_sum_assignment", "CUDA")
    assert lsa_backend("cpu") == ("compiled" if has_cpu else "scipy")
    assert lsa_backend("cuda") == ("compiled" if has_cuda else "compiled-cpu-roundtrip" if has_cpu else "scipy")
    x = torch.randn(1, 2, 4, 3, 3, 3)
    assert not rk._use_cuda_kernel("cosine_cost", x) and not rk._use_cuda_kernel("gather_rows_add", x)
    assert not fusion._use_triton(x)  # a CPU tensor without TRITON_INTERPRET
    assert not fusion.use_mkldnn_fusion(x)  # autograd recording
    with torch.no_grad():
        assert fusion.use_mkldnn_fusion(x) == fusion.mkldnn_fusion_available()[0]
        assert not fusion.use_mkldnn_fusion(x.double())
    attn = vit.Attention(8, 2)
    assert d.select("attention", device=CPU, dtype=F32, fused=attn.fused_attn).name == "sdpa"
    assert d.select("attention", device=CPU, dtype=F32, fused=False).name == "math"
    with torch.no_grad():  # the three attention paths still agree
        t = torch.randn(2, 5, 8)
        ref = vit.Attention(8, 2, fused_attn=False)
        ref.load_state_dict(attn.state_dict())
        torch.testing.assert_close(attn(t), ref(t), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- explain

def test_explain_lists_every_backend_of_every_op():
    text = d.explain_all()
    for op in d.ops():
        assert f"\n{op}  (" in text
        block = text.split(f"\n{op}  (", 1)[1].split("\n\n", 1)[0]
        for b in d.backends(op):
            assert re.search(rf"^  [* ] {b.priority + 1} {re.escape(b.name)} +(usable|no) ", block, re.M), (op, b.name)
        assert block.count("\n  * ") <= 1  # one chosen backend (or none, said in the header)
    for name in BACKEND_VARS:
        assert name in text
    assert "runs reference" in text.split("\ncosine_cost  (", 1)[1].split("\n", 1)[0] or torch.cuda.is_available()


def test_explain_inputs_override_typical(monkeypatch):
    monkeypatch.setattr(fusion, "mkldnn_fusion_available", lambda: (True, ""))
    text = d.explain("fusion_block", device=CPU, grad_enabled=True)
    assert "grad_enabled=True" in text and "runs reference" in text
    assert "inference only: autograd is recording" in text
    assert "\nattention" not in text  # one op only
    assert "fused=False" in d.explain(fused=False)  # op=None: each op takes the inputs it has
    with pytest.raises(ValueError, match="unknown input"):
        d.explain("attention", spatial_dims=3)
    ok, why = d.machine_status("conv_fusion", "onednn")
    assert ok and why == d.backends("conv_fusion")[0].summary
