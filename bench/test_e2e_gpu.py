"""End-to-end BERT-base shape on CUDA (skipped without a GPU): batch 1 and 8, seq 128, 90 %
unstructured, random weights magnitude-pruned. Baselines in the same run: the fp32 model and the
fp16 model (eager). Each round synchronizes the device; extra_info carries the embedding cosine
against the fp32 model.
"""
import copy

import pytest
import torch

from sparse_ofa.benchmarking import e2e

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SEQ = 128
_cache: dict = {}


def _fp32():
    if "fp32" not in _cache:
        _cache["fp32"] = e2e.bert_base_pruned(0.9).cuda()
    return _cache["fp32"]


def _model(impl: str):
    if impl not in _cache:
        fp32 = _fp32()
        _cache[impl] = (fp32 if impl == "fp32_model" else copy.deepcopy(fp32).half()
                        if impl == "fp16_model" else e2e.sparse_ofa_model(fp32))
    return _cache[impl]


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", ["fp32_model", "fp16_model", "sparse_ofa"])
def test_bert_base_cuda(benchmark, batch, impl):
    model = _model(impl)
    inputs = {k: v.cuda() for k, v in e2e.random_inputs(batch, SEQ).items()}
    cosine = e2e.mean_cosine(e2e.embeddings(model, inputs), e2e.embeddings(_fp32(), inputs))
    name = f"sparse_ofa:{e2e.dispatched_backend(model, batch * SEQ)}" if impl == "sparse_ofa" else impl
    benchmark.group = f"e2e-cuda-bert-base-b{batch}"
    benchmark.extra_info.update(kind="e2e", device="cuda", shape="bert-base", batch=batch, seq=SEQ,
                                sparsity=0.9, pattern="unstructured" if impl == "sparse_ofa" else "dense",
                                impl=name, cosine_vs_fp32=cosine)
    fn = _synced(e2e.forward_fn(model, inputs))
    benchmark.pedantic(fn, rounds=20, warmup_rounds=3, iterations=1)


def _graphed(fn):
    """fn captured once in a CUDA graph; each call replays it and synchronizes. Shows the GPU-side
    time with Python and launch overhead removed (the eager rows above are launch-bound at BERT-base
    sizes: batch 1 and 8 take the same time)."""
    fn()  # build, autotune and warm the allocator outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        graph.replay()
        torch.cuda.synchronize()
    return replay, graph


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", ["fp16_model", "sparse_ofa"])
def test_bert_base_cuda_graph(benchmark, batch, impl):
    model = _model(impl)
    inputs = {k: v.cuda() for k, v in e2e.random_inputs(batch, SEQ).items()}
    try:
        replay, keep_alive = _graphed(e2e.forward_fn(model, inputs))
    except Exception as exc:  # noqa: BLE001 - report why instead of timing something else
        pytest.fail(f"{impl} forward could not be captured in a CUDA graph: {exc}")
    name = f"sparse_ofa:{e2e.dispatched_backend(model, batch * SEQ)}" if impl == "sparse_ofa" else impl
    benchmark.group = f"e2e-cuda-graph-bert-base-b{batch}"
    benchmark.extra_info.update(kind="e2e-graph", device="cuda", shape="bert-base", batch=batch, seq=SEQ,
                                sparsity=0.9, pattern="unstructured" if impl == "sparse_ofa" else "dense",
                                impl=name, timing="cuda_graph")
    benchmark.pedantic(replay, rounds=30, warmup_rounds=3, iterations=1)
    del keep_alive
