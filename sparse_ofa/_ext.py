"""Just-in-time build of the C++/CUDA extensions from csrc/ (torch.utils.cpp_extension.load).

Why JIT: `pip install .` then stays a pure-Python install with no build isolation trouble (no second
torch pulled into a build environment), and the extension is compiled once, on first use, against
the torch the user actually runs, into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
`sparse-ofa build` triggers it ahead of time. A compiler (g++; nvcc for CUDA) must be present.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
if not CSRC.exists():  # running from a source checkout without install: csrc/ is beside the package
    CSRC = Path(__file__).resolve().parent.parent / "csrc"

_LOADED: dict[str, object] = {}


def load_extension(name: str, sources: list[str], *, extra_cflags: list[str] = (),
                   extra_cuda_cflags: list[str] = (), extra_ldflags: list[str] = (),
                   verbose: bool | None = None):
    """Compile (once, cached by torch on source hash) and load csrc/<sources> as module `name`.

    Raises RuntimeError naming the missing compiler or the compile error."""
    if name in _LOADED:
        return _LOADED[name]
    paths = [CSRC / s for s in sources]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"sparse_ofa extension {name}: sources not found: {missing}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"sparse_ofa extension {name} needs a C++ compiler ({cxx!r} not found); "
                           "install g++ or set CXX")
    from torch.utils.cpp_extension import load

    if verbose is None:
        verbose = os.environ.get("SPARSE_OFA_VERBOSE_BUILD", "") == "1"
    module = load(name=name, sources=[str(p) for p in paths], extra_cflags=list(extra_cflags),
                  extra_cuda_cflags=list(extra_cuda_cflags), extra_ldflags=list(extra_ldflags),
                  extra_include_paths=[str(CSRC)], verbose=verbose, is_python_module=False)
    _LOADED[name] = module
    return module
