"""The speedup table pairs each sparse_ofa row with the baselines of the same kind/device/shape/M."""
import json

from sparse_ofa.benchmarking.report import format_table, speedup_rows, write_report


def _row(name, median, **info):
    return {"name": name, "group": "g", "median": median, "extra_info": info}


def _layer(name, median, impl, m=128, shape="768x768", sparsity=0.0, pattern="dense"):
    return _row(name, median, kind="layer", device="cpu", shape=shape, m=m, sparsity=sparsity,
                pattern=pattern, impl=impl)


ROWS = [
    _layer("int_mm", 0.004, "int_mm"),
    _layer("int_mm again", 0.005, "int_mm"),                 # the faster of the two is the baseline
    _layer("fp32", 0.010, "fp32_linear"),
    _layer("int_mm other M", 0.100, "int_mm", m=16),         # different M: never paired with m=128
    _layer("sparse", 0.001, "sparse_ofa:cpu", sparsity=0.9, pattern="1x4"),
    _layer("sparse no baseline", 0.001, "sparse_ofa:cpu", shape="1024x1024", sparsity=0.9),
    _row("e2e fp32", 0.150, kind="e2e", device="cpu", shape="bert-base", batch=1, seq=128,
         sparsity=0.9, pattern="dense", impl="fp32_model", cosine_vs_fp32=1.0),
    _row("e2e sparse", 0.010, kind="e2e", device="cpu", shape="bert-base", batch=1, seq=128,
         sparsity=0.9, pattern="unstructured", impl="sparse_ofa:cpu", cosine_vs_fp32=0.9991),
]


def test_ratios_use_matching_baselines_only():
    by_name = {e["name"]: e for e in speedup_rows(ROWS)}
    assert set(by_name) == {"sparse", "sparse no baseline", "e2e sparse"}
    assert abs(by_name["sparse"]["x_int_mm"] - 4.0) < 1e-9
    assert abs(by_name["sparse"]["x_fp32_linear"] - 10.0) < 1e-9
    assert by_name["sparse"]["x_fp32_model"] is None
    assert by_name["sparse no baseline"]["x_int_mm"] is None
    assert abs(by_name["e2e sparse"]["x_fp32_model"] - 15.0) < 1e-9
    assert by_name["e2e sparse"]["x_int_mm"] is None


def test_table_and_files(tmp_path):
    table = format_table(ROWS)
    assert "| x fp32_linear | x fp32_model | x int_mm |" in table
    assert "4.00" in table and "15.00" in table and "0.999100" in table
    written = write_report(ROWS, tmp_path)
    assert json.loads(written["rows"].read_text()) == ROWS
    assert written["plot"].stat().st_size > 1000
    assert format_table([r for r in ROWS if not r["extra_info"]["impl"].startswith("sparse")]).startswith("(no")


def test_graph_rows_report_one_call_of_the_repeat():
    # GPU rounds replay a graph of `repeat` calls: the table shows one call, ratios are unchanged
    rows = [_row("base", 0.050, kind="layer", device="cuda", shape="768x768", m=16, impl="int_mm", repeat=50),
            _row("sp", 0.025, kind="layer", device="cuda", shape="768x768", m=16, sparsity=0.9,
                 pattern="block", impl="sparse_ofa:triton", repeat=50)]
    (entry,) = speedup_rows(rows)
    assert abs(entry["median_ms"] - 0.5) < 1e-9 and abs(entry["x_int_mm"] - 2.0) < 1e-9
    assert "median ms/call" in format_table(rows)
