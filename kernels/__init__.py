"""Triton kernels for sparse-INT8 matmuls, installed as `sparse_ofa.kernels` (pyproject's package-dir).

From the repository root this folder is also reachable as a top-level `kernels`, which would shadow the
PyPI package of that name (transformers imports it). Imported under that name, this module puts the
installed `kernels` in its place, or reports it missing as a clean environment would.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)
