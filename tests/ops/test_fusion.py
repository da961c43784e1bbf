"""Tests of the Neuroverse3D fusion block ``GELU(x + conv1x1(x) + b + extra)``.

- The reference equals the authors' ``c + Conv1x1(concat[c, t])`` form (the
  algebraic split W = [W_c | W_t]), in float64, with an independent erf GELU.
- The Triton kernel (run by triton's CPU interpreter, ``TRITON_INTERPRET=1``,
  at tiny odd shapes) equals the reference: values and the gradients of x,
  weight, bias and extra; extra broadcast over L (and B) or not; 2D and 3D;
  contiguous, channels-last and strided layouts; fp32 tightly, bf16 by the
  flash-attention rule.
- GPU versions at realistic sizes (C = 32..512, 32^3) are marked ``gpu``.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set by the user for the whole run

from vicl_fast.ops import fusion  # noqa: E402
from vicl_fast.ops.fusion import conv1x1, fusion_block, fusion_block_reference  # noqa: E402


def _gelu_np(v: np.ndarray) -> np.ndarray:
    """Exact GELU in float64 via SciPy's erf (independent of torch's F.gelu)."""
    return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Authors' 1x1 conv on (N, C, *S) with a (Cout, Cin, 1, ...) weight."""
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, w, b)


# --------------------------------------------------------------------------- reference

@pytest.mark.parametrize("spatial", [(3, 5, 7), (6, 5)])
def test_reference_equals_concat_conv(spatial):
    """GELU(c + Conv1x1(concat[c, t])) per context == fusion_block(c, W_c, b, W_t t)."""
    B, L, C = 2, 3, 6
    nd = len(spatial)
    c = torch.randn(B, L, C, *spatial, dtype=torch.float64)
    t = torch.randn(B, C, *spatial, dtype=torch.float64)
    w_full = torch.randn(C, 2 * C, *([1] * nd), dtype=torch.float64) / math.sqrt(2 * C)
    bias = torch.randn(C, dtype=torch.float64)

    # The authors' computation: concatenate [context, target] per context, conv, residual, GELU.
    t_rep = t.unsqueeze(1).expand(B, L, C, *spatial)
    cat = torch.cat([c, t_rep], dim=2).reshape(B * L, 2 * C, *spatial)
    pre = c.reshape(B * L, C, *spatial) + _conv(cat, w_full, bias)
    expected = _gelu_np(pre.numpy()).reshape(B, L, C, *spatial)

    # Ours: W_t t once per stage, broadcast over L.
    extra = _conv(t, w_full[:, C:]).unsqueeze(1)  # (B, 1, C, *S)
    got = fusion_block(c, w_full[:, :C], bias, extra)
    got_ref = fusion_block_reference(c, w_full[:, :C].reshape(C, C), bias, extra)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_ref.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    C = 3
    args = (torch.randn(1, 2, C, 2, 3, 2, dtype=torch.float64, requires_grad=True),
            torch.randn(C, C, 1, 1, 1, dtype=torch.float64, requires_grad=True),
            torch.randn(C, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 1, C, 2, 3, 2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fusion_block_reference, args)


def test_conv1x1_matches_einsum():
    x = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    w = torch.randn(7, 5, 1, 1, 1, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    want = np.einsum("oc,bcdhw->bodhw", w.reshape(7, 5).numpy(), x.numpy()) + b.numpy()[:, None, None, None]
    np.testing.assert_allclose(conv1x1(x, w, b).numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv1x1(x[..., 0], w.reshape(7, 5), b).numpy(), want[..., 0],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="conv1x1: weight"):
        conv1x1(x, torch.randn(7, 4))


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 4, 5)), "at least one spatial dim"),
    (dict(weight=torch.randn(4, 5)), "weight must be"),
    (dict(weight=torch.randn(4, 4, 3, 3, 3)), "weight must be"),
    (dict(bias=torch.randn(5)), "bias must be"),
    (dict(extra=torch.randn(1, 2, 4, 3, 3, 3)), "extra must broadcast"),
    (dict(extra=torch.randn(1, 1, 4, 3, 3)), "extra must broadcast"),
])
def test_bad_input_errors(bad, match):
    args = dict(x=torch.randn(1, 3, 4, 3, 3, 3), weight=torch.randn(4, 4), bias=torch.randn(4),
                extra=torch.randn(1, 1, 4, 3, 3, 3))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fusion_block(**args)
    with pytest.raises(TypeError, match="floating point"):
        fusion_block(torch.ones(1, 1, 4, 2, 2, dtype=torch.long), torch.randn(4, 4), None)


def test_import_does_not_import_triton():
    """`import vicl_fast` and the CPU path of fusion_block never import triton."""
    code = ("import sys, torch, vicl_fast\n"
            "from vicl_fast.ops.fusion import fusion_block\n"
            "fusion_block(torch.randn(1, 1, 4, 2, 2, 2), torch.randn(4, 4), None)\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- oneDNN (CPU inference)

needs_mkldnn = pytest.mark.skipif(not fusion.mkldnn_fusion_available()[0],
                                  reason=f"oneDNN fusions unavailable: {fusion.mkldnn_fusion_available()[1]}")


def _ref_conv64(x, w, b, padding=0, stride=1):
    """float64 conv (torch's own float64 kernel: no oneDNN involved)."""
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    return conv(x.double(), w.double(), None if b is None else b.double(), stride=stride, padding=padding)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)


@needs_mkldnn
@pytest.mark.parametrize("spatial", [(6, 5, 4), (7, 6)])
@pytest.mark.parametrize("batch", [1, 3])
def test_mkldnn_conv_ops_match_float64(spatial, batch):
    """conv_mkldnn (1x1, 3x3, 4^d stride 2), conv_gelu, conv_add vs float64 convs and SciPy's erf,
    channels-last in -> channels-last out (also a (1, C, ...) view with an odd batch stride)."""
    nd = len(spatial)
    C, Co = 5, 6
    x = _cl(torch.randn(batch, C, *[2 * s for s in spatial]))
    w1 = torch.randn(Co, C, *([1] * nd)) / math.sqrt(C)
    w3 = torch.randn(Co, C, *([3] * nd)) / math.sqrt(27 * C)
    w3s = torch.randn(Co, Co, *([3] * nd)) / math.sqrt(27 * Co)
    w4 = torch.randn(Co, C, *([4] * nd)) / math.sqrt(64 * C)
    b = torch.randn(Co)
    fmt = torch.channels_last_3d if nd == 3 else torch.channels_last
    with torch.no_grad():
        cases = [
            (fusion.conv_mkldnn(x, w1, b), _ref_conv64(x, w1, b)),
            (fusion.conv_mkldnn(x, w4, b, 1, 2), _ref_conv64(x, w4, b, 1, 2)),
            (fusion.conv_gelu(x, w3, b, 1),
             torch.from_numpy(_gelu_np(_ref_conv64(x, w3, b, 1).numpy()))),
        ]
        h = cases[-1][0]
        cases.append((fusion.conv_add(h, x[:, :1].expand(-1, Co, *x.shape[2:]).contiguous(memory_format=fmt),
                                      w3s, b, 1),
                      _ref_conv64(h, w3s, b, 1) + x[:, :1].double()))
        # a (1, 1, C, ...) channels-last view flattened to (1, C, ...) keeps batch stride C
        x6 = x[:1].unsqueeze(1)
        xf = x6.reshape(1, C, *x.shape[2:])
        cases.append((fusion.conv_mkldnn(xf, w1, b), _ref_conv64(x[:1], w1, b)))
    for i, (got, want) in enumerate(cases):
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=fmt), f"case {i}: channels-last lost"
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-5 * max(1.0, want.abs().max().item()), (i, err)


@needs_mkldnn
@pytest.mark.parametrize("spatial, extra_L, layout", [
    ((3, 5, 7), 1, "channels_last"), ((3, 5, 7), "L", "contiguous"),
    ((5, 6), 1, "contiguous"), ((4, 4, 4), None, "channels_last")])
def test_mkldnn_fusion_block_matches_reference(monkeypatch, spatial, extra_L, layout):
    """CPU fp32 without a graph goes through oneDNN (checked with a spy) and equals the float64 reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b, e = _make_inputs(2, 3, 12, spatial, extra_L, torch.float32, layout=layout)
    x, w, b = x.detach(), w.detach(), b.detach()
    e = e.detach() if e is not None else None
    calls = []
    orig = fusion._fusion_block_mkldnn
    monkeypatch.setattr(fusion, "_fusion_block_mkldnn", lambda *a: calls.append(1) or orig(*a))
    with torch.inference_mode():
        y = fusion_block(x, w, b, e)
    assert calls == [1]
    want = fusion_block_reference(*[t.double() if t is not None else None for t in (x, w, b, e)])
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    if layout == "channels_last":
        assert y.stride(2) == 1, "channels-last kept"
    # with a graph, or when disabled: the plain reference
    with torch.no_grad():
        monkeypatch.setenv("VICL_FAST_DISABLE_MKLDNN", "1")
        y2 = fusion_block(x, w, b, e)
    assert calls == [1]
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    fusion_block(x, w.requires_grad_(), b, e)
    assert calls == [1]


# --------------------------------------------------------------------------- Triton kernel checks

def _make_inputs(B, L, C, spatial, extra_L, dtype, device="cpu", layout="contiguous", bias=True):
    """Random inputs (values at the scale of real features) with requires_grad."""
    nd = len(spatial)
    x = torch.randn(B, L, C, *spatial, device=device)
    if layout == "channels_last":
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)  # C contiguous per voxel
    elif layout == "strided":
        big = torch.randn(B, L, C, *spatial[:-1], 2 * spatial[-1], device=device)
        x = big[..., ::2]  # spatial dims not flattenable: exercises the copy path
    x = x.to(dtype).requires_grad_()
    w = (torch.randn(C, C, *([1] * nd), device=device) / math.sqrt(C)).to(dtype).requires_grad_()
    b = torch.randn(C, device=device).to(dtype).requires_grad_() if bias else None
    e = None
    if extra_L is not None:
        eB = B if extra_L != "B1" else 1
        eL = 1 if extra_L in (1, "B1") else L
        e = torch.randn(eB, eL, C, *spatial, device=device).to(dtype).requires_grad_()
    return x, w, b, e


def _run(fn, x, w, b, e, go):
    y = fn(x, w, b, e)
    inputs = [t for t in (x, w, b, e) if t is not None]
    grads = torch.autograd.grad(y, inputs, go)
    return [y.detach()] + [g.detach() for g in grads]


def _check(fn, x, w, b, e, fp32: bool):
    """Compare fn's output and gradients with the float64 reference (and, for low precision,
    with the reference computed in the low precision by plain torch)."""
    torch.manual_seed(1)
    go = torch.randn(x.shape, device=x.device).to(x.dtype)
    got = _run(fn, x, w, b, e, go)

    def up(t):
        return t.detach().double().requires_grad_() if t is not None else None

    ref = _run(fusion_block_reference, up(x), up(w), up(b), up(e), go.double())
    names = ["out", "grad_x", "grad_w", "grad_b", "grad_extra"][: len(got)]
    if not fp32:
        low = _run(fusion_block_reference, *[t.detach().requires_grad_() if t is not None else None
                                             for t in (x, w, b, e)], go)
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        assert g.shape == r.shape, name
        assert g.dtype == x.dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item()
        scale = r.abs().max().item()
        if fp32:
            assert err <= 1e-5 * max(1.0, scale), f"{name}: max err {err:.3e} (scale {scale:.3e})"
        else:  # flash-attention rule: within 2x of plain torch in the same precision
            err_low = (low[i].double() - r).abs().max().item()
            assert err <= 2 * err_low + 1e-2 * max(1.0, scale), \
                f"{name}: max err {err:.3e} vs torch-lowprec {err_low:.3e} (scale {scale:.3e})"


@pytest.mark.usefixtures("triton_interp")
class TestTritonInterpreter:
    """Kernel vs reference through triton's CPU interpreter (tiny sizes: it is slow)."""

    @pytest.fixture(scope="class")
    @classmethod
    def triton_interp(cls):
        """Set TRITON_INTERPRET=1 for this class only; poison kernel outputs with NaN."""
        mp = pytest.MonkeyPatch()
        mp.setenv("TRITON_INTERPRET", "1")  # before triton's first import, where possible
        mp.delenv("VICL_FAST_DISABLE_TRITON", raising=False)
        try:
            import triton  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            mp.undo()
            pytest.skip(f"triton is not importable: {e}")
        import vicl_fast.kernels.fusion_conv as fc
        reloaded = type(fc._fusion_block_forward_kernel).__name__ != "InterpretedFunction"
        if reloaded:  # imported earlier for a GPU: the @triton.jit must be re-made interpreted
            fc = importlib.reload(fc)
        orig_empty = fc._empty_like_layout

        def poisoned(x, dtype=None):  # every output element must be written by the kernel
            return orig_empty(x, dtype).fill_(float("nan"))

        mp.setattr(fc, "_empty_like_layout", poisoned)
        try:
            fc.fusion_block_forward(torch.randn(1, 1, 4, 2, 2), torch.randn(4, 4), None, None)
        except Exception as e:  # pragma: no cover
            mp.undo()
            pytest.skip(f"the Triton CPU interpreter cannot run the kernel here: {type(e).__name__}: {e}")
        yield fc
        mp.undo()
        if not _INTERPRET_AT_IMPORT:
            # Always re-make the kernel compiled: whether the module was first imported here (then its
            # @triton.jit is interpreted) or earlier for a GPU, later tests must see the GPU kernel.
            importlib.reload(fc)
        _assert_kernel_compiled()

    @pytest.mark.parametrize("C", [4, 8, 16])
    @pytest.mark.parametrize("spatial", [(3, 5, 7), (5, 6)])
    @pytest.mark.parametrize("extra_L", [1, "L", None])
    def test_fp32(self, C, spatial, extra_L):
        x, w, b, e = _make_inputs(1, 3, C, spatial, extra_L, torch.float32)
        assert fusion._use_triton(x)
        _check(fusion_block, x, w, b, e, fp32=True)

    def test_fp32_several_tiles(self):
        """C=40: 3 output-channel tiles, 3 reduction steps with a masked tail (16-wide tiles)."""
        x, w, b, e = _make_inputs(2, 2, 40, (3, 4, 5), "L", torch.float32, layout="channels_last")
        _check(fusion_block, x, w, b, e, fp32=True)

    @pytest.mark.parametrize("C, spatial, extra_L",
                             [(16, (3, 5, 7), 1), (8, (5, 6), "L"), (20, (2, 3, 5), 1)])
    def test_bf16(self, C, spatial, extra_L):
        x, w, b, e = _make_inputs(1, 3, C, spatial, extra_L, torch.bfloat16)
        _check(fusion_block, x, w, b, e, fp32=False)

    def test_fp16(self):
        x, w, b, e = _make_inputs(1, 2, 8, (3, 5, 7), 1, torch.float16)
        _check(fusion_block, x, w, b, e, fp32=False)

    @pytest.mark.parametrize("layout", ["channels_last", "strided"])
    def test_layouts(self, layout):
        x, w, b, e = _make_inputs(2, 2, 8, (3, 4, 5), 1, torch.float32, layout=layout)
        y = fusion_block(x, w, b, e)
        if layout == "channels_last":
            assert y.stride(2) == 1, "output keeps x's channels-last layout"
        _check(fusion_block, x, w, b, e, fp32=True)

    def test_channels_last_3d_view_and_2d_weight(self):
        """A (B*L, C, D, H, W) channels_last_3d tensor viewed as 6D, weight given as (C, C)."""
        C = 12
        x5 = torch.randn(4, C, 3, 4, 5).to(memory_format=torch.channels_last_3d)
        x = x5.view(2, 2, C, 3, 4, 5).requires_grad_()
        w = (torch.randn(C, C) / math.sqrt(C)).requires_grad_()
        b = torch.randn(C, requires_grad=True)
        e = torch.randn(2, 1, C, 3, 4, 5, requires_grad=True)
        _check(fusion_block, x, w, b, e, fp32=True)

    def test_no_bias_extra_broadcast_over_b(self):
        x, w, _, e = _make_inputs(2, 3, 8, (3, 5), "B1", torch.float32, bias=False)
        assert e.shape[:2] == (1, 1)
        _check(fusion_block, x, w, None, e, fp32=True)

    def test_partial_requires_grad(self):
        x, w, b, e = _make_inputs(1, 2, 8, (3, 5), 1, torch.float32)
        w = w.detach()
        e = e.detach()
        y = fusion_block(x, w, b, e)
        gx, gb = torch.autograd.grad(y.sum(), (x, b))
        yr = fusion_block_reference(x, w, b, e)
        rx, rb = torch.autograd.grad(yr.sum(), (x, b))
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)

    def test_autocast_bf16(self):
        """Under CPU autocast the Triton path computes in bf16; grads come back in fp32."""
        x, w, b, e = _make_inputs(1, 2, 16, (3, 5), 1, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fusion_block(x, w, b, e)
        assert y.dtype == torch.bfloat16
        gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
        assert gx.dtype == torch.float32 and gw.dtype == torch.float32
        r = fusion_block_reference(x.double(), w.double(), b.double(), e.double())
        assert (y.double() - r).abs().max() < 0.05 * r.abs().max()

    def test_inference_mode(self):
        x, w, b, e = _make_inputs(1, 2, 8, (3, 4, 5), 1, torch.float32)
        with torch.inference_mode():
            y = fusion_block(x, w, b, e)
        assert not y.requires_grad
        torch.testing.assert_close(y, fusion_block_reference(x, w, b, e).detach(), rtol=1e-5, atol=1e-5)

    def test_disable_env_takes_reference(self, monkeypatch):
        x, w, b, e = _make_inputs(1, 2, 4, (2, 3), 1, torch.float32)
        calls = []

        def spy(*a):
            calls.append(1)
            return fusion_block_reference(*a)

        monkeypatch.setattr(fusion, "fusion_block_reference", spy)
        fusion_block(x, w, b, e)
        assert calls == [], "Triton path expected under TRITON_INTERPRET=1"
        monkeypatch.setenv("VICL_FAST_DISABLE_TRITON", "1")
        fusion_block(x, w, b, e)
        assert calls == [1]


def test_triton_interpret_not_leaked():
    """The interpreter class restores the environment: later tests (and files) see the GPU dispatch rules."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1" or _INTERPRET_AT_IMPORT
    assert not fusion._use_triton(torch.randn(1, 1, 4, 2, 2)) or _INTERPRET_AT_IMPORT


def _assert_kernel_compiled() -> None:
    """The imported kernel is a compiled @triton.jit, not the CPU interpreter's stand-in (unless the
    user set TRITON_INTERPRET=1 for the whole run)."""
    import sys as _sys

    fc = _sys.modules.get("vicl_fast.kernels.fusion_conv")
    if fc is None or _INTERPRET_AT_IMPORT:
        return
    kind = type(fc._fusion_block_forward_kernel).__name__
    assert kind != "InterpretedFunction", "fusion_conv left interpreted: GPU tests would run the interpreter"


def test_prune_and_size_bucket(monkeypatch):
    """Autotune configs: too-wide tiles and configs over the shared-memory limit of the dtype are
    pruned (fp32 needs twice bf16's bytes); the volume size bucket steps every 8x in voxels."""
    pytest.importorskip("triton")
    fc = importlib.import_module("vicl_fast.kernels.fusion_conv")
    configs = fc.gpu_configs()
    monkeypatch.setattr(fc, "_SMEM_FALLBACK", 232448)  # H100/H200 opt-in limit, for a CPU tensor
    big = [fc.config_tuple(c) for c in configs if fc._config_smem(c, 4) > 232448]
    assert (256, 64, 64, 8, 3) in big  # 3 x (256*64 + 64*64) x 4 B x 1.1 = 270 KB
    fp32 = fc._prune_configs(configs, {"C": 512, "x_ptr": torch.empty(1)})
    bf16 = fc._prune_configs(configs, {"C": 512, "x_ptr": torch.empty(1, dtype=torch.bfloat16)})
    assert all(fc._config_smem(c, 4) <= 232448 for c in fp32)
    assert len(bf16) > len(fp32) and {id(c) for c in fp32} < {id(c) for c in bf16}
    narrow = fc._prune_configs(configs, {"C": 32, "x_ptr": torch.empty(1)})
    assert narrow and all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 32 for c in narrow)
    monkeypatch.setattr(fc, "_SMEM_FALLBACK", 1000)  # nothing fits: the smallest config, not none
    assert len(fc._prune_configs(configs, {"C": 64, "x_ptr": torch.empty(1)})) == 1
    assert [fc.size_bucket(s ** 3) for s in (8, 16, 32, 64, 128)] == [3, 4, 5, 6, 7]
    assert fc.size_bucket(100 ** 3) == 6 and fc.size_bucket(2 * 128 ** 3) == 7
    assert fc.size_bucket(0) == 0


# --------------------------------------------------------------------------- GPU (realistic sizes)

@pytest.mark.gpu
@pytest.mark.parametrize("C", [4, 32, 64, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gpu_matches_reference(C, dtype, layout):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("GPU test must run compiled, not interpreted")
    if not fusion.triton_fusion_available()[0]:
        pytest.skip(f"triton unavailable: {fusion.triton_fusion_available()[1]}")
    S = (32, 32, 32) if C <= 256 else (16, 16, 16)
    x, w, b, e = _make_inputs(1, 2, C, S, 1, dtype, device="cuda", layout=layout)
    assert fusion._use_triton(x)
    importlib.import_module("vicl_fast.kernels.fusion_conv")
    _assert_kernel_compiled()
    _check(fusion_block, x, w, b, e, fp32=dtype == torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_every_config(dtype):
    """Each autotuning candidate (tails in every tile dimension: C=80, odd volume), forward and
    backward, against the reference; configs over the shared-memory limit for the dtype are the
    pruned ones and are skipped the same way."""
    if not fusion.triton_fusion_available()[0]:
        pytest.skip("triton unavailable")
    fc = importlib.import_module("vicl_fast.kernels.fusion_conv")
    _assert_kernel_compiled()
    x, w, b, e = _make_inputs(1, 2, 80, (9, 10, 11), 1, dtype, device="cuda", layout="channels_last")
    kept = {fc.config_tuple(c) for c in fc._prune_configs(fc.gpu_configs(), {"C": 80, "x_ptr": x})}
    assert kept
    from triton.runtime.errors import OutOfResources

    ran, too_big = [], []
    for cfg in fc._GPU_CONFIGS:
        if cfg not in kept:
            continue
        with fc.forced_config(cfg):
            try:
                _check(fusion_block, x, w, b, e, fp32=dtype == torch.float32)
                ran.append(cfg)
            except OutOfResources:  # the autotuner skips such a config; the estimate should have pruned it
                too_big.append(cfg)
    assert ran, f"no config could run: {too_big}"
    if too_big:
        warnings.warn(f"_config_smem under-estimates: {too_big} ran out of resources", stacklevel=1)


@pytest.mark.gpu
def test_gpu_extra_per_context_2d():
    if not fusion.triton_fusion_available()[0]:
        pytest.skip("triton unavailable")
    x, w, b, e = _make_inputs(2, 3, 64, (48, 40), "L", torch.bfloat16, device="cuda",
                              layout="channels_last")
    importlib.import_module("vicl_fast.kernels.fusion_conv")
    _assert_kernel_compiled()
    _check(fusion_block, x, w, b, e, fp32=False)
