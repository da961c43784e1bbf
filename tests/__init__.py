"""The test suite; its folders mirror the package (``vicl_fast/<sub>/x.py`` -> ``tests/<sub>/test_x.py``).

- ``ops/``, ``models/``, ``data/``, ``training/``: the subpackages of the same name
  (``kernels/`` is the Triton backend of ``ops/fusion.py``: tested in ``ops/test_fusion.py``).
- ``cli/``: the user-facing entry points ``cli.py``, ``inference.py`` (+ ``errors.py``), ``main_job.py``.
- ``test_<module>.py`` here: the other top-level modules (``apsp.py``, ``flops.py``, ``losses.py``).
- ``package/``: what is outside ``vicl_fast/``'s modules: ``setup.py``, the import with and
  without the compiled extension, ``tools/gpu_pass``.
- ``fixtures/``: data files shared by several folders; ``_oracles.py``: shared independent references.

Every folder is a package (an ``__init__.py``), so pytest imports ``tests.<folder>.test_x``:
the same file name in two folders cannot clash, and shared helpers are imported by their
full name (``from tests._oracles import ...``), never from another test module.
"""
