"""The package imports and reports its backends, with or without the extension."""
import subprocess
import sys

import vicl_fast


def test_backends_report_lists_every_backend():
    b = vicl_fast.available_backends()
    assert set(b) == {"cpp", "cuda", "triton", "onednn", "xformers", "reference"}
    assert b["reference"].available
    for backend in b.values():
        assert backend.reason  # a reason is always given
    assert "cpp" in vicl_fast.backends_report()


def test_import_without_extension():
    code = ("import vicl_fast; b = vicl_fast.available_backends(); "
            "assert not b['cpp'].available and 'VICL_FAST_DISABLE_EXT' in b['cpp'].reason; "
            "from vicl_fast.ops import lsa_backend, _dispatch; assert lsa_backend('cpu') == 'scipy'; "
            "assert 'disabled by VICL_FAST_DISABLE_EXT=1' in _dispatch.explain('linear_sum_assignment'); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__('os').environ, "VICL_FAST_DISABLE_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
