"""The package's layering (docs/architecture.md): imports flow one way, with no cycles, and the core
never reaches into training, tasks, the demo, benchmarking or the CLI."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_ofa"
CORE = ("sparse_ofa", "sparse_ofa._ext", "sparse_ofa.formats", "sparse_ofa.quant", "sparse_ofa.masks",
        "sparse_ofa.selection", "sparse_ofa.modules", "sparse_ofa.sparsify", "sparse_ofa.io")
CORE_PACKAGES = ("sparse_ofa.backends", "sparse_ofa.fastpath")
ABOVE_CORE = ("sparse_ofa.training", "sparse_ofa.tasks", "sparse_ofa.models", "sparse_ofa.demo",
              "sparse_ofa.benchmarking", "sparse_ofa.commands", "sparse_ofa.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, at module level or inside functions. `from pkg import mod`
    counts as importing pkg.mod only (pkg's __init__ runs either way, as for every Python import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            found.update(subs if len(subs) == len(node.names) else [module, *subs])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycles(graph):
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if nxt not in state and visit(nxt, stack + [nxt]):
                return True
        state[node] = "done"
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def test_core_never_imports_what_sits_above_it(graph):
    # (the package root's lazy __getattr__ imports training on first use: the subprocess test below
    # checks that `import sparse_ofa` itself does not)
    core = [m for m in graph if (m in CORE and m != "sparse_ofa") or _in(m, CORE_PACKAGES)]
    assert "sparse_ofa.modules" in core and "sparse_ofa.fastpath.layer" in core  # the walk found the core
    bad = {m: sorted(i for i in graph[m] if _in(i, ABOVE_CORE)) for m in core}
    assert not {m: v for m, v in bad.items() if v}


def test_backends_do_not_import_each_other(graph):
    backends = ("reference", "dense", "triton", "cuda", "cpu")
    for name in backends:
        module = f"sparse_ofa.backends.{name}"
        own = [m for m in graph if m == module or m.startswith(module + ".")]
        others = [f"sparse_ofa.backends.{b}" for b in backends if b != name]
        # the dense backend's CPU routes call the CPU extension's ops (backends/cpu/ops.py), the shared
        # kernel binding, and its layout and route rules; never the cpu backend class itself
        allowed = {"sparse_ofa.backends.cpu.ops", "sparse_ofa.backends.cpu.layouts",
                   "sparse_ofa.backends.cpu.dispatch"} if name == "dense" else set()
        bad = sorted(i for m in own for i in graph[m] if _in(i, others) and i not in allowed)
        assert not bad, (module, bad)


def test_fastpath_reaches_kernels_only_through_the_backend_interface(graph):
    privates = {"_prepared", "_chain", "_info", "_epilogue_bias", "_plans"}
    for path in (PACKAGE / "fastpath").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert ast.unparse(node) != "torch.ops.sparse_ofa", f"{path.name}:{node.lineno} calls an op"
                assert node.attr not in privates, f"{path.name}:{node.lineno} reads SparseInt8Linear.{node.attr}"
    fastpath = {m: i for m, i in graph.items() if _in(m, ("sparse_ofa.fastpath",))}
    assert not {m: sorted(x for x in i if x.startswith("sparse_ofa.backends.")) for m, i in fastpath.items()
                if any(x.startswith("sparse_ofa.backends.") for x in i)}


def test_import_sparse_ofa_loads_the_core_alone_and_training_on_first_use():
    code = ("import sys, sparse_ofa\n"
            "above = sorted(m for m in sys.modules if m.startswith(('sparse_ofa.training', 'sparse_ofa.demo', "
            "'sparse_ofa.tasks', 'sparse_ofa.commands')))\n"
            "assert not above, above\n"
            "assert sparse_ofa.Pruner.__module__ == 'sparse_ofa.training.pruning'\n"
            "assert 'sparse_ofa.training' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(PACKAGE.parent))
    assert result.returncode == 0, result.stderr[-2000:]


def test_public_names_stay_importable_from_the_package():
    import sparse_ofa

    for name in sparse_ofa.__all__:
        assert getattr(sparse_ofa, name) is not None, name
