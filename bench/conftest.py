"""The benchmark harness: `pytest bench/` (pytest-benchmark), kept apart from `pytest tests/`.

Every benchmark sets `benchmark.group` and `benchmark.extra_info` by the convention in docs/bench.md.
At the end of the session this file prints a speedup table (each sparse_ofa row against every
baseline row of the same kind/device/shape/M) and writes it, the raw rows and a PNG of speedup vs
sparsity to $SPARSE_OFA_BENCH_OUT (default .benchmarks/sparse_ofa/). pytest-benchmark's own JSON
comes from `--benchmark-json=PATH` as usual.

Environment:
    SPARSE_OFA_BENCH_FULL=1      the full grid (default: a short grid that runs in minutes)
    SPARSE_OFA_BENCH_THREADS=N   torch CPU threads (default 2, the machine the goals are set on)
    SPARSE_OFA_BENCH_OUT=DIR     where the table, rows and plot go
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

FULL = os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1"
THREADS = int(os.environ.get("SPARSE_OFA_BENCH_THREADS", "2"))
OUT_DIR = os.environ.get("SPARSE_OFA_BENCH_OUT", ".benchmarks/sparse_ofa")

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def bench_full() -> bool:
    """True under SPARSE_OFA_BENCH_FULL=1: benches may widen their grid."""
    return FULL


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rows(config) -> list[dict]:
    session = getattr(config, "_benchmarksession", None)
    rows = []
    for bench in getattr(session, "benchmarks", []) or []:
        stats = getattr(bench, "stats", None)
        median = getattr(stats, "median", None) if stats else None
        rows.append({"name": bench.name, "group": bench.group, "median": median,
                     "extra_info": dict(bench.extra_info)})
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows(config)
    if not any(r["median"] is not None for r in rows):
        return
    from sparse_ofa.benchmarking.report import format_table, write_report

    terminalreporter.section("sparse_ofa speedup (baseline median / sparse_ofa median)")
    terminalreporter.write_line(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
                                f"{', full grid' if FULL else ', short grid'}")
    terminalreporter.write_line(format_table(rows))
    written = write_report(rows, OUT_DIR)
    for what, path in written.items():
        terminalreporter.write_line(f"{what}: {path}")
