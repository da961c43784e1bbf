"""setup.py's CUDA arch default, tested without running setup().

setup.py calls setup() at import, so its module body is executed from its
syntax tree without the two statements that build the extension and call
setup(); setup._extensions() then runs against a stand-in torch.
"""
from __future__ import annotations

import ast
import os
import sys
import types
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "setup.py"
MESSAGE = "TORCH_CUDA_ARCH_LIST"


def _calls(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names for n in ast.walk(node))


def _load_setup_defs() -> dict:
    """setup.py's module body without the statements that build or call setup()."""
    tree = ast.parse(SETUP.read_text(), filename=str(SETUP))
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) or not _calls(n, {"setup", "_extensions"})]
    ns: dict = {"__file__": str(SETUP), "__name__": "vicl_fast_setup_under_test"}
    exec(compile(tree, str(SETUP), "exec", dont_inherit=True), ns)
    assert "_extensions" in ns and "ext_modules" not in ns  # setup() itself was not run
    return ns


@pytest.fixture(scope="module")
def setup_defs():
    return _load_setup_defs()


def test_default_applied_when_cuda_no_gpu_no_arch_list(setup_defs):
    f = setup_defs["_cuda_arch_default"]
    env = {"FORCE_CUDA": "1"}
    arch, msg = f(env, False, True)
    assert arch == "9.0"
    assert "FORCE_CUDA=1" in msg and "sm_90" in msg and MESSAGE in msg and "\n" not in msg
    assert env == {"FORCE_CUDA": "1"}  # pure: the mapping is not touched
    # An empty TORCH_CUDA_ARCH_LIST is "unset" for torch too (it would raise the same way).
    assert f({"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": " "}, False, True)[0] == "9.0"
    # CUDA build chosen because torch is a CUDA build (no FORCE_CUDA): same failure, same default.
    arch, msg = f({}, False, True)
    assert arch == "9.0" and "FORCE_CUDA" not in msg


@pytest.mark.parametrize("user_list", ["8.0", "9.0a", "8.0;9.0+PTX", "Hopper", "native"])
def test_never_overrides_user_arch_list(setup_defs, user_list):
    f = setup_defs["_cuda_arch_default"]
    assert f({"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": user_list}, False, True) == (None, None)


def test_no_default_with_visible_gpu_or_without_cuda(setup_defs):
    f = setup_defs["_cuda_arch_default"]
    assert f({"FORCE_CUDA": "1"}, True, True) == (None, None)  # torch detects the GPU's arch itself
    assert f({"FORCE_CUDA": "0"}, False, False) == (None, None)  # CPU-only build: no nvcc at all
    assert f({}, False, False) == (None, None)


def _fake_torch(monkeypatch, cuda_version, gpu_count):
    """Stand-in torch modules for setup._extensions(): records the extension kind built."""
    torch = types.ModuleType("torch")
    torch.version = types.SimpleNamespace(cuda=cuda_version)
    torch.cuda = types.SimpleNamespace(is_available=lambda: gpu_count > 0, device_count=lambda: gpu_count)
    utils = types.ModuleType("torch.utils")
    cpp = types.ModuleType("torch.utils.cpp_extension")
    cpp.CUDA_HOME = "/usr/local/cuda" if cuda_version else None
    cpp.CppExtension = lambda *a, **k: ("cpp", a, k)
    cpp.CUDAExtension = lambda *a, **k: ("cuda", a, k)
    cpp.BuildExtension = types.SimpleNamespace(with_options=lambda **k: "build_ext")
    torch.utils, utils.cpp_extension = utils, cpp
    for name, mod in (("torch", torch), ("torch.utils", utils), ("torch.utils.cpp_extension", cpp)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize(
    "env,cuda_version,gpus,expect",
    [
        ({"FORCE_CUDA": "1"}, None, 0, "9.0"),  # the case: CPU torch, FORCE_CUDA, no GPU
        ({}, "12.8", 0, "9.0"),  # CUDA torch on a machine without a GPU
        ({"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0"}, None, 0, "8.0"),
        ({"FORCE_CUDA": "1"}, "12.8", 1, None),
        ({}, None, 0, None),  # CPU extension only
    ],
)
def test_extensions_sets_env_before_build(setup_defs, monkeypatch, capsys, env, cuda_version, gpus, expect):
    for var in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "VICL_FAST_NO_EXT"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores what _extensions() sets
        monkeypatch.delenv(var)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _fake_torch(monkeypatch, cuda_version, gpus)
    exts, cmdclass = setup_defs["_extensions"]()
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == expect
    err = capsys.readouterr().err
    defaulted = expect == "9.0"
    assert ("building for sm_90" in err) == defaulted
    assert len(exts) == 1 and cmdclass == {"build_ext": "build_ext"}
    assert exts[0][0] == ("cuda" if (cuda_version or env.get("FORCE_CUDA") == "1") else "cpp")


def test_torch_accepts_the_default():
    """The default is a valid arch list for torch's own flag builder (sm_90 cubin only)."""
    cpp = pytest.importorskip("torch.utils.cpp_extension")
    if not hasattr(cpp, "_get_cuda_arch_flags"):
        pytest.skip("torch has no _get_cuda_arch_flags")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
        assert cpp._get_cuda_arch_flags() == ["-gencode=arch=compute_90,code=sm_90"]
    finally:
        mp.undo()
