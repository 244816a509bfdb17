"""Just-in-time build of the C++/CUDA extensions from csrc/ (torch.utils.cpp_extension.load).

Why JIT: `pip install .` then stays a pure-Python install with no build isolation trouble (no second
torch pulled into a build environment), and the extension is compiled once, on first use, against
the torch the user actually runs, into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
`sparse-ofa build` triggers it ahead of time. A compiler (g++; nvcc for CUDA) must be present.

Interrupted builds: torch guards a build directory with a lock file (`<build dir>/lock`) that a
killed process leaves behind, and every later load then waits on it forever, silently. So each load
here first takes an flock on `<build dir>/sparse_ofa.lock` (the kernel drops it when its holder
dies, however it dies): while another live process holds it, this one says so on stderr every
30 s and waits, up to $SPARSE_OFA_BUILD_LOCK_TIMEOUT seconds (default 1800; then TimeoutError naming
the holder's pid). Once it holds the flock no other sparse_ofa build of that directory is running,
so a torch lock file still there is stale: it is removed (with a message) and the build runs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
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

    try:  # (private in torch: where load() builds `name`)
        from torch.utils.cpp_extension import _get_build_directory
        lock = build_lock(Path(_get_build_directory(name, verbose=False)), name)
    except ImportError:
        lock = contextlib.nullcontext()
    if verbose is None:
        verbose = os.environ.get("SPARSE_OFA_VERBOSE_BUILD", "") == "1"
    with lock:
        module = load(name=name, sources=[str(p) for p in paths], extra_cflags=list(extra_cflags),
                      extra_cuda_cflags=list(extra_cuda_cflags), extra_ldflags=list(extra_ldflags),
                      extra_include_paths=[str(CSRC)], verbose=verbose, is_python_module=False)
    _LOADED[name] = module
    return module


def _note(message: str) -> None:
    print(f"sparse_ofa: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(build_dir: Path, name: str, *, note_every: float = 30.0):
    """Hold the flock of `build_dir` (see the module docstring), clearing a stale torch lock file."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file only
        yield
        return
    timeout = float(os.environ.get("SPARSE_OFA_BUILD_LOCK_TIMEOUT", "1800"))
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / "sparse_ofa.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        next_note = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                if waited > timeout:
                    raise TimeoutError(
                        f"sparse_ofa extension {name}: process {holder} has held the build lock {path} for "
                        f"more than {timeout:g} s (SPARSE_OFA_BUILD_LOCK_TIMEOUT); if it is stuck, stop it "
                        "and load again") from None
                if waited >= next_note:
                    _note(f"waiting for process {holder}, which is building or loading the {name} extension "
                          f"in {build_dir} (waited {waited:.0f} s, giving up after {timeout:g} s)")
                    next_note += note_every
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            try:
                age = f"{time.time() - torch_lock.stat().st_mtime:.0f} s old"
                torch_lock.unlink()
                _note(f"removed a stale build lock {torch_lock} ({age}), left by a build of {name} that was "
                      "interrupted (no live process holds it); building again")
            except FileNotFoundError:
                pass
        yield
    finally:
        os.close(fd)  # drops the flock
