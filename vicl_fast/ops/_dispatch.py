"""One backend dispatcher for every op that has more than one implementation.

In the style of xformers' ``memory_efficient_attention`` dispatch: each op has a
priority list of :class:`Backend` s; each backend states
``not_supported_reasons(**inputs)`` (an empty list: it can run these inputs on
this machine now); :func:`select` runs the first that fits and, when none fits,
raises :class:`NoBackendError` listing every backend with its reasons.
:func:`explain` (``vicl-fast info --explain``) prints the same table for every
op, so explaining a slow run means reading one report, not four files.

Ops and their backends, by priority (inputs are hashable descriptors, not tensors):

=====================  ========================================  ======================================
op                     backends                                  inputs
=====================  ========================================  ======================================
linear_sum_assignment  compiled, compiled-cpu-roundtrip, scipy   device
cosine_cost            cuda, reference                           device
gather_rows_add        cuda (scatter_rows_add backward),         device
                       reference
conv_fusion            onednn, reference                         device, dtype, grad_enabled,
                                                                 cpu_autocast
fusion_block           triton, onednn, reference                 device, dtype, weight_dtype,
                                                                 spatial_dims, grad_enabled,
                                                                 cpu_autocast
attention              xformers, sdpa, math                      device, dtype, fused
=====================  ========================================  ======================================

Environment variables (every one the package reads; ``ENV_VARS`` holds the same
table, and :func:`env` refuses a name that is not in it):

===========================  ==============  ==================================================================
variable                     read            effect on the dispatch
===========================  ==============  ==================================================================
VICL_FAST_LSA_BACKEND        each call       ``auto`` (default): priority order. ``scipy``: turns off
  =auto|compiled|scipy       (eager only)    linear_sum_assignment/compiled and /compiled-cpu-roundtrip.
                                             ``compiled``: turns off linear_sum_assignment/scipy (an error
                                             when no kernel fits). Ignored inside ``torch.compile``; any
                                             other value raises ``ValueError``.
VICL_FAST_DISABLE_TRITON=1   each call       turns off fusion_block/triton.
TRITON_INTERPRET=1           each call       fusion_block/triton also takes CPU tensors (triton's CPU
                                             interpreter: slow, for tests). Also read by triton itself.
VICL_FAST_DISABLE_MKLDNN=1   each call       turns off conv_fusion/onednn and fusion_block/onednn.
VICL_FAST_DISABLE_EXT=1      import          vicl_fast._C is not loaded: every compiled backend
                                             (linear_sum_assignment/compiled, /compiled-cpu-roundtrip,
                                             cosine_cost/cuda, gather_rows_add/cuda) says so.
VICL_FAST_NO_EXT=1           build           setup.py skips the extension: the same backends are off.
FORCE_CUDA=1                 build           setup.py builds the CUDA kernels without a visible GPU
                                             (needed by the /cuda backends and CUDA compiled LSA).
TORCH_CUDA_ARCH_LIST         build           GPU architectures of those kernels (default sm_90 without a
                                             visible GPU).
VICL_FAST_LSA_ISA            first CPU LSA   SIMD path inside linear_sum_assignment/compiled on CPU
  =scalar|avx2|avx512        call (C++)      (not a backend choice: identical answers).
VICL_FAST_TRITON_AUTOTUNE=0  each call       inside fusion_block/triton on a GPU: one heuristic config per
                                             shape instead of autotuning (not a backend choice).
VICL_FAST_CHECK_INDEX=1      import          gather_rows_add on CUDA checks index ranges (a host sync;
                                             ``set_index_checks`` changes it at run time). Not a backend.
===========================  ==============  ==================================================================

Other variables, unrelated to backends: ``VICL_FAST_CACHE`` (model cache
folder), ``VICL_FAST_DEBUG=1`` (tracebacks from the CLI), ``VICL_FAST_PROGRESS=1``
(progress bar off a terminal), ``VICL_FAST_RUNSLOW=1`` (slow tests).

Cost: :func:`select` caches its answer per (op, inputs, values of the op's
variables), so a call is a few dict lookups and ``os.environ`` reads; the
probes (extension kernels, triton import, oneDNN and xformers test runs) run
once per process, and only when every cheaper condition already holds, so a
CPU run never imports triton. Inside ``torch.compile`` the choice is made once
at trace time (as with :func:`torch.compiler.assume_constant_result`), outside the graph.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vicl_fast import _ext

__all__ = ["Backend", "EnvVar", "NoBackendError", "ENV_VARS", "ops", "backends", "select", "explain",
           "explain_all", "machine_status", "typical_inputs", "env", "env_flag", "clear_cache"]


# ============================================================================ environment table

@dataclass(frozen=True, eq=False)
class EnvVar:
    """One environment variable and what it does to the dispatch.

    ``disables`` maps a value to the ``"op/backend"`` names it turns off (the
    generic "disabled by NAME=value" reason); ``choices`` lists the accepted
    values of a choice variable (read stripped and lower-cased; anything else
    raises ``ValueError``); ``eager_only`` variables are ignored inside
    ``torch.compile``.
    """

    name: str
    read: str  # when: "each call", "import", "build", ...
    effect: str
    default: str = "0"
    disables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    choices: tuple[str, ...] = ()
    eager_only: bool = False
    backend: bool = True  # False: not about backends (listed for completeness)


_LSA = "linear_sum_assignment"

ENV_VARS: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("VICL_FAST_LSA_BACKEND", "each call (eager)", "force the assignment backend: auto|compiled|scipy",
           default="auto", choices=("auto", "compiled", "scipy"), eager_only=True,
           disables={"scipy": (f"{_LSA}/compiled", f"{_LSA}/compiled-cpu-roundtrip"),
                     "compiled": (f"{_LSA}/scipy",)}),
    EnvVar("VICL_FAST_DISABLE_TRITON", "each call", "1: turn off the Triton fusion-block kernel",
           disables={"1": ("fusion_block/triton",)}),
    EnvVar("TRITON_INTERPRET", "each call", "1: the Triton kernel also takes CPU tensors (CPU interpreter)"),
    EnvVar("VICL_FAST_DISABLE_MKLDNN", "each call", "1: turn off the oneDNN fused convolutions",
           disables={"1": ("conv_fusion/onednn", "fusion_block/onednn")}),
    EnvVar("VICL_FAST_DISABLE_EXT", "import", "1: do not load vicl_fast._C (every compiled backend off)"),
    EnvVar("VICL_FAST_NO_EXT", "build", "1: do not build vicl_fast._C"),
    EnvVar("FORCE_CUDA", "build", "1: build the CUDA kernels without a visible GPU"),
    EnvVar("TORCH_CUDA_ARCH_LIST", "build", "GPU architectures of the CUDA kernels", default=""),
    EnvVar("VICL_FAST_LSA_ISA", "first CPU call (C++)", "SIMD path of the CPU assignment kernel: "
           "scalar|avx2|avx512", default="auto"),
    EnvVar("VICL_FAST_TRITON_AUTOTUNE", "each call", "0: one heuristic Triton config per shape, no autotuning",
           default="1"),
    EnvVar("VICL_FAST_CHECK_INDEX", "import", "1: check gather indices on CUDA (a host sync)"),
    EnvVar("VICL_FAST_CACHE", "each use", "model cache folder", default="", backend=False),
    EnvVar("VICL_FAST_DEBUG", "on error", "1: the CLI prints tracebacks", backend=False),
    EnvVar("VICL_FAST_PROGRESS", "each run", "1: progress bar even off a terminal", backend=False),
    EnvVar("VICL_FAST_RUNSLOW", "test run", "1: run the slow tests", backend=False),
)}


def env(name: str) -> str:
    """Raw value of the documented variable ``name`` (its default when unset).

    Raises ``KeyError`` for a name missing from :data:`ENV_VARS`: every variable
    the package reads is in the table.
    """
    return os.environ.get(name, ENV_VARS[name].default)


def env_flag(name: str) -> bool:
    """Whether the documented flag ``name`` is set to exactly ``"1"``."""
    return env(name) == "1"


def _choice(var: EnvVar) -> str:
    """The normalised value of a choice variable; ``ValueError`` when it is not one of its choices."""
    value = env(var.name).strip().lower() or var.default
    if value not in var.choices:
        raise ValueError(f"{var.name}={value!r}: expected one of {', '.join(var.choices)}")
    return value


def _env_reasons(op: str, name: str, env_names: tuple[str, ...]) -> list[str]:
    """The reason ``disabled by VAR=value`` for each of the op's variables that turns ``op/name`` off."""
    target = f"{op}/{name}"
    reasons = []
    for var_name in env_names:
        var = ENV_VARS[var_name]
        if not var.disables or (var.eager_only and torch.compiler.is_compiling()):
            continue
        value = _choice(var) if var.choices else env(var_name)
        if target in var.disables.get(value, ()):
            reasons.append(f"disabled by {var_name}={value}")
    return reasons


# ============================================================================ registry

Check = Callable[..., None]  # check(reasons, **inputs): appends why the backend cannot run


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    Attributes:
        op: the op it implements (e.g. ``"fusion_block"``).
        name: its name within the op (``"triton"``, ``"onednn"``, ``"reference"``, ...).
        priority: 0 runs first; :func:`select` takes the first usable one.
        summary: one line, what it is.
    """

    op: str
    name: str
    priority: int
    summary: str
    _check: Check = field(repr=False, compare=False)
    _env: tuple[str, ...] = field(repr=False, compare=False, default=())

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        """Why this backend cannot run ``inputs`` on this machine now (each a short sentence); [] = usable.

        Environment reasons come first; expensive probes (imports, test runs) are
        only made when no other reason applies.
        """
        reasons = _env_reasons(self.op, self.name, self._env)
        self._check(reasons, **inputs)
        return reasons


@dataclass(eq=False)
class _Op:
    """An op: its backends by priority, the variables they read, and typical inputs for :func:`explain`."""

    name: str
    summary: str
    env: tuple[str, ...]  # the variables its backends read (part of select's cache key)
    typical: Callable[[], dict[str, Any]]  # explain's inputs when none are given
    backends: list[Backend] = field(default_factory=list)
    # The names as os.environ stores them on POSIX (None elsewhere: then os.environ.get is used).
    env_bytes: tuple[bytes, ...] | None = field(init=False)

    def __post_init__(self) -> None:
        self.env_bytes = tuple(os.fsencode(n) for n in self.env) if os.name == "posix" else None


_OPS: dict[str, _Op] = {}
_BY_NAME: dict[tuple[str, str], Backend] = {}


def _op(name: str, summary: str, typical: Callable[[], dict[str, Any]], env: tuple[str, ...] = ()) -> _Op:
    spec = _OPS[name] = _Op(name, summary, env, typical)
    return spec


def _backend(spec: _Op, name: str, summary: str) -> Callable[[Check], Check]:
    """Register the decorated check as the next backend (by priority) of ``spec``."""
    def deco(check: Check) -> Check:
        b = Backend(spec.name, name, len(spec.backends), summary, check, spec.env)
        spec.backends.append(b)
        _BY_NAME[spec.name, name] = b
        return check
    return deco


def ops() -> tuple[str, ...]:
    """Names of every dispatched op."""
    return tuple(_OPS)


def backends(op: str) -> tuple[Backend, ...]:
    """The backends of ``op``, by priority."""
    return tuple(_spec(op).backends)


def _spec(op: str) -> _Op:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; dispatched ops: {', '.join(_OPS)}") from None


# ============================================================================ probes (cached)

def _dev_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken package, or a stand-in module without __spec__
        return False


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return module in sys.modules or _find_spec(module)


@functools.lru_cache(maxsize=None)
def _missing_kernel(op: str, dispatch_key: str) -> str | None:
    """None when ``vicl_fast::op`` has a ``dispatch_key`` kernel, else why not."""
    return _ext.missing_kernel_reason(op, dispatch_key)


def _best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ============================================================================ the ops

# --------------------------------------------------------------------------- linear_sum_assignment
_lsa = _op(_LSA, "exact batched assignment (vicl_fast.ops.assignment)",
           typical=lambda: {"device": _best_device()}, env=("VICL_FAST_LSA_BACKEND",))


@_backend(_lsa, "compiled", "torch.ops.vicl_fast.linear_sum_assignment, the kernel of the input's device")
def _lsa_compiled(reasons: list[str], *, device: torch.device) -> None:
    key = "CUDA" if _dev_type(device) == "cuda" else "CPU"  # meta/fake tensors use the CPU registration
    why = _missing_kernel(_LSA, key)
    if why:
        reasons.append(f"no {key} kernel: {why}")


@_backend(_lsa, "compiled-cpu-roundtrip", "CUDA input solved by the C++ CPU kernel (copied to host and back)")
def _lsa_roundtrip(reasons: list[str], *, device: torch.device) -> None:
    dev = _dev_type(device)
    if dev != "cuda":
        reasons.append(f"needs a CUDA input (got {dev})")
    why = _missing_kernel(_LSA, "CPU")
    if why:
        reasons.append(f"no CPU kernel: {why}")


@_backend(_lsa, "scipy", "scipy.optimize.linear_sum_assignment per matrix over a thread pool (via the host)")
def _lsa_scipy(reasons: list[str], *, device: torch.device) -> None:
    if not _installed("scipy"):
        reasons.append("scipy not installed (pip install scipy)")


# --------------------------------------------------------------------------- RandP kernels
def _randp_cuda(kernels: tuple[str, ...]) -> Check:
    def check(reasons: list[str], *, device: torch.device) -> None:
        dev = _dev_type(device)
        if dev != "cuda":
            reasons.append(f"needs a CUDA tensor (got {dev})")
        for k in kernels:
            why = _missing_kernel(k, "CUDA")
            if why:
                reasons.append(f"no CUDA kernel vicl_fast::{k}: {why}")
                break  # the same cause for every kernel of the file
    return check


def _always(reasons: list[str], **inputs: Any) -> None:
    """The pure-PyTorch reference runs everything."""


_cos = _op("cosine_cost", "RandP cosine cost matrix (vicl_fast.ops.randp_kernels)",
           typical=lambda: {"device": _best_device()})
_backend(_cos, "cuda", "compiled CUDA kernel (fused normalise + matmul)")(_randp_cuda(("cosine_cost",)))
_backend(_cos, "reference", "cosine_cost_reference: normalize + bmm in float32")(_always)

_gather = _op("gather_rows_add", "RandP reorder-gather + add (vicl_fast.ops.randp_kernels)",
              typical=lambda: {"device": _best_device()})
_backend(_gather, "cuda", "compiled CUDA kernels (vectorised gather forward, deterministic scatter_rows_add "
         "backward)")(_randp_cuda(("gather_rows_add", "scatter_rows_add")))
_backend(_gather, "reference", "gather_rows_add_reference: torch.gather (autograd)")(_always)


# --------------------------------------------------------------------------- oneDNN conv fusions
def _cpu_inference_typical() -> dict[str, Any]:
    return {"device": torch.device("cpu"), "dtype": torch.float32, "grad_enabled": False, "cpu_autocast": False}


def _onednn(reasons: list[str], *, device: torch.device, dtype: torch.dtype, grad_enabled: bool,
            cpu_autocast: bool) -> None:
    dev = _dev_type(device)
    if dev != "cpu":
        reasons.append(f"needs a CPU tensor (got {dev})")
    if dtype != torch.float32:
        reasons.append(f"needs float32 (got {_dtype_name(dtype)})")
    if grad_enabled:
        reasons.append("inference only: autograd is recording (use torch.no_grad or torch.inference_mode)")
    if cpu_autocast:
        reasons.append("not under CPU autocast")
    if torch.compiler.is_compiling():  # inductor fuses on its own; these ops' fake kernels mispredict strides
        reasons.append("not inside torch.compile")


def _onednn_probe(reasons: list[str]) -> None:
    if not reasons:  # the probe runs convolutions: only when nothing else rules oneDNN out
        from vicl_fast.ops.fusion import mkldnn_fusion_available

        ok, why = mkldnn_fusion_available()
        if not ok:
            reasons.append(f"oneDNN fused convolutions unavailable ({why})")


_conv = _op("conv_fusion", "oneDNN post-op convolutions GELU(conv(x)), conv(x) + y (vicl_fast.ops.fusion)",
            typical=_cpu_inference_typical, env=("VICL_FAST_DISABLE_MKLDNN",))


@_backend(_conv, "onednn", "torch.ops.mkldnn._convolution_pointwise with a fused GELU / add post-op")
def _conv_onednn(reasons: list[str], **inputs: Any) -> None:
    _onednn(reasons, **inputs)
    _onednn_probe(reasons)


_backend(_conv, "reference", "plain PyTorch conv, then the GELU / add")(_always)


# --------------------------------------------------------------------------- fusion block
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_fusion = _op("fusion_block", "Neuroverse3D fusion GELU(x + conv1x1(x) + b + extra) (vicl_fast.ops.fusion)",
              typical=lambda: {"device": _best_device(), "dtype": torch.float32, "weight_dtype": torch.float32,
                               "spatial_dims": 3, "grad_enabled": False, "cpu_autocast": False},
              env=("VICL_FAST_DISABLE_TRITON", "TRITON_INTERPRET", "VICL_FAST_DISABLE_MKLDNN"))


@_backend(_fusion, "triton", "Triton kernel vicl_fast.kernels.fusion_conv (one pass, recomputing backward)")
def _fusion_triton(reasons: list[str], *, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype,
                   spatial_dims: int, grad_enabled: bool, cpu_autocast: bool) -> None:
    dev = _dev_type(device)
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"needs float32/float16/bfloat16 (got {_dtype_name(dtype)})")
    if dev != "cuda" and not (dev == "cpu" and env_flag("TRITON_INTERPRET")):
        reasons.append(f"needs a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1 (got {dev})")
    if not _installed("triton"):
        reasons.append("triton not installed (pip install triton)")
    elif not reasons:  # importing triton takes seconds: only when it would run
        from vicl_fast.ops.fusion import triton_fusion_available

        ok, why = triton_fusion_available()
        if not ok:
            reasons.append(f"the Triton kernel does not import ({why})")


@_backend(_fusion, "onednn", "one oneDNN 1x1 conv with a fused add post-op, then an in-place GELU")
def _fusion_onednn(reasons: list[str], *, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype,
                   spatial_dims: int, grad_enabled: bool, cpu_autocast: bool) -> None:
    _onednn(reasons, device=device, dtype=dtype, grad_enabled=grad_enabled, cpu_autocast=cpu_autocast)
    if spatial_dims not in (2, 3):
        reasons.append(f"needs 2 or 3 spatial dims (got {spatial_dims})")
    if weight_dtype != dtype:
        reasons.append(f"needs the weight in x's dtype (got {_dtype_name(weight_dtype)} and {_dtype_name(dtype)})")
    _onednn_probe(reasons)


_backend(_fusion, "reference", "fusion_block_reference: einsum + adds + GELU in plain PyTorch")(_always)


# --------------------------------------------------------------------------- attention (ViT)
_attn = _op("attention", "ViT multi-head self-attention (vicl_fast.models.vit.Attention)",
            typical=lambda: {"device": _best_device(), "dtype": torch.float32, "fused": True})


def _needs_fused(reasons: list[str], fused: bool) -> None:
    if not fused:
        reasons.append("fused_attn=False asks for the explicit maths")


@_backend(_attn, "xformers", "xformers.ops.memory_efficient_attention ((B, N, H, d) layout, no transpose)")
def _attn_xformers(reasons: list[str], *, device: torch.device, dtype: torch.dtype, fused: bool) -> None:
    _needs_fused(reasons, fused)
    dev = _dev_type(device)
    if dev != "cuda":
        reasons.append(f"needs a CUDA tensor (got {dev})")
    if not _installed("xformers"):
        reasons.append("xformers not installed (optional: pip install xformers)")
    elif not reasons:  # import and a test run on the GPU: only when it would run
        from vicl_fast.models import vit

        if not vit.xformers_available():
            reasons.append("xformers is installed but `import xformers.ops` fails")
        elif not vit.xformers_works(torch.device(device), dtype):
            reasons.append(f"xformers' kernel failed its test run for {_dtype_name(dtype)} on {dev} "
                           "(or was never run: it is not tried inside torch.compile)")


@_backend(_attn, "sdpa", "torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math)")
def _attn_sdpa(reasons: list[str], *, device: torch.device, dtype: torch.dtype, fused: bool) -> None:
    _needs_fused(reasons, fused)


_backend(_attn, "math", "softmax(q k^T / sqrt(d)) v written out (the reference)")(_always)


# Every variable that turns a backend off must be part of its op's cache key.
for _var in ENV_VARS.values():
    for _target in (t for targets in _var.disables.values() for t in targets):
        assert _var.name in _OPS[_target.split("/")[0]].env, (_var.name, _target)
        assert tuple(_target.split("/")) in _BY_NAME, _target
del _var, _target


# ============================================================================ selection

class NoBackendError(RuntimeError):
    """No backend of an op can run the given inputs; the message lists every backend with its reasons."""


_CHOICE: dict[tuple, Backend] = {}


_CACHED_PROBES = (_find_spec, _missing_kernel)  # the originals, even while a test patches the names


def clear_cache() -> None:
    """Forget the cached choices and probes (after changing what a probe depends on, e.g. in tests)."""
    _CHOICE.clear()
    for probe in _CACHED_PROBES:
        probe.cache_clear()


def _format_inputs(inputs: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return _dtype_name(v) if isinstance(v, torch.dtype) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in inputs.items())


def _set_env(spec: _Op) -> str:
    return ", ".join(f"{n}={os.environ[n]}" for n in spec.env if n in os.environ)


def _select_uncached(spec: _Op, inputs: dict[str, Any]) -> Backend:
    tried: list[tuple[Backend, list[str]]] = []
    for b in spec.backends:
        reasons = b.not_supported_reasons(**inputs)
        if not reasons:
            return b
        tried.append((b, reasons))
    env_set = _set_env(spec)
    lines = [f"no backend of `{spec.name}` can run ({_format_inputs(inputs)}"
             + (f"; {env_set}" if env_set else "") + "):"]
    lines += [f"  {b.name}: {'; '.join(r)}" for b, r in tried]
    lines.append("(`vicl-fast info --explain` lists every backend of every op)")
    raise NoBackendError("\n".join(lines))


def _env_key(spec: _Op) -> tuple:
    """The raw values of ``spec``'s variables, for the cache key.

    ``os.environ.get`` encodes the name and decodes the value on every call
    (microseconds); on POSIX the mapping keeps the raw bytes in ``_data``, which
    ``setenv``/``del`` update in place, so reading it directly is a dict lookup.
    """
    data = getattr(os.environ, "_data", None)
    if type(data) is dict and spec.env_bytes is not None:
        return tuple(map(data.get, spec.env_bytes))
    return tuple(map(os.environ.get, spec.env))


def _select_name_at_trace(op: str, items: tuple[tuple[str, Any], ...]) -> str:
    # Dynamo calls this eagerly while tracing and bakes the name into the graph:
    # the probes behind the choice (imports, C++ dispatcher queries) are not traceable.
    return _select_uncached(_OPS[op], dict(items)).name


# What torch.compiler.assume_constant_result(fn) does (it only sets this attribute), without the
# `import torch._dynamo` it starts with: that import takes seconds and imports triton, and CPU runs
# must not. tests/ops/test_dispatch.py checks that dynamo still honours the mark.
_select_name_at_trace._dynamo_marked_constant = True  # type: ignore[attr-defined]


def select(op: str, /, **inputs: Any) -> Backend:
    """The first backend of ``op`` (by priority) that can run ``inputs``.

    Args:
        op: one of :func:`ops`.
        **inputs: the op's inputs, all of them, as hashable descriptors (see the
            module docstring), e.g. ``select("fusion_block", device=x.device,
            dtype=x.dtype, weight_dtype=w.dtype, spatial_dims=3,
            grad_enabled=False, cpu_autocast=False)``.
    Returns:
        the :class:`Backend` to run. Cached per (op, inputs, values of the op's
        environment variables): a repeated call costs a few dict lookups.
    Raises:
        NoBackendError: none fits (the message lists every backend and why not).
        ValueError: an unknown op, or an invalid value of a choice variable
            (``VICL_FAST_LSA_BACKEND``).
    """
    if torch.compiler.is_compiling():
        return _BY_NAME[op, _select_name_at_trace(op, tuple(inputs.items()))]
    spec = _OPS.get(op) or _spec(op)
    key = (op, tuple(inputs.items()), _env_key(spec))
    b = _CHOICE.get(key)
    if b is None:
        b = _CHOICE[key] = _select_uncached(spec, inputs)
    return b


# ============================================================================ explain

def typical_inputs(op: str) -> dict[str, Any]:
    """Inputs :func:`explain` uses for ``op`` when none are given (the common case on this machine)."""
    return dict(_spec(op).typical())


def _versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ext = "loaded" if _ext.extension_loaded() else f"not loaded ({_ext.extension_error()})"
    return (f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, CUDA devices: {cuda}), "
            f"triton {version('triton')}, xformers {version('xformers')}, oneDNN "
            f"{'built in' if torch.backends.mkldnn.is_available() else 'absent'}; vicl_fast._C {ext}")


def _explain_op(spec: _Op, inputs: dict[str, Any]) -> list[str]:
    rows: list[tuple[Backend, list[str]]] = []
    for b in spec.backends:
        try:
            rows.append((b, b.not_supported_reasons(**inputs)))
        except ValueError as e:  # an invalid environment value: show it instead of failing the report
            rows.append((b, [str(e)]))
    chosen = next((b for b, r in rows if not r), None)
    head = f"{spec.name}  ({_format_inputs(inputs)}): "
    head += f"runs {chosen.name}" if chosen else "NO BACKEND FITS (select raises NoBackendError)"
    lines = [head]
    width = max(len(b.name) for b in spec.backends)
    for b, reasons in rows:
        mark = "*" if b is chosen else " "
        state = "usable" if not reasons else "no    "
        text = b.summary if not reasons else "; ".join(reasons)
        lines.append(f"  {mark} {b.priority + 1} {b.name:<{width}}  {state}  {text}")
    return lines


def explain(op: str | None = None, /, **inputs: Any) -> str:
    """A readable table of every backend of ``op`` (of every op when None): usable or not, and why.

    ``inputs`` override the op's :func:`typical_inputs` (with ``op=None``, each
    op takes the ones it has). The backend marked ``*`` is the one
    :func:`select` runs for those inputs. Probes run as for :func:`select` (a
    backend already ruled out is not probed).
    """
    names = [_spec(op).name] if op is not None else list(_OPS)
    known = {k for n in names for k in _OPS[n].typical()}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ValueError(f"unknown input(s) {', '.join(unknown)}; the inputs are {', '.join(sorted(known))}")
    lines = [f"vicl_fast backends: {_versions()}", "environment (docs: vicl_fast/ops/_dispatch.py):"]
    width = max(len(v.name) for v in ENV_VARS.values())
    for var in ENV_VARS.values():
        if var.backend:
            value = os.environ.get(var.name)
            lines.append(f"  {var.name:<{width}}  {'unset' if value is None else repr(value):<8}  "
                         f"[{var.read}] {var.effect}")
    for name in names:
        spec = _OPS[name]
        typical = spec.typical()
        lines.append("")
        lines += _explain_op(spec, {**typical, **{k: v for k, v in inputs.items() if k in typical}})
    return "\n".join(lines)


def explain_all() -> str:
    """:func:`explain` for every op with typical inputs: what ``vicl-fast info --explain`` prints."""
    return explain()


def machine_status(op: str, backend: str, **inputs: Any) -> tuple[bool, str]:
    """(usable, reasons or summary) of one backend with typical inputs (overridden by ``inputs``)."""
    b = _BY_NAME[op, backend]
    try:
        reasons = b.not_supported_reasons(**{**_OPS[op].typical(), **inputs})
    except ValueError as e:
        reasons = [str(e)]
    return not reasons, "; ".join(reasons) if reasons else b.summary
