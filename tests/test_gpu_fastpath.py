"""On a CUDA device: the fast path (fused QKV, lean layers / model / embeddings) of BERT, RoBERTa and
DistilBERT computes what the plain sparsified model computes. Skipped without CUDA
(scripts/gpu_check.sh runs it on the device); the same checks run on the CPU in test_fastpath.py."""
import copy

import pytest
import torch

from sparse_ofa import sparsify
from sparse_ofa.fastpath import apply_fastpath
from sparse_ofa.fastpath.attention import FastSelfAttentionMixin
from sparse_ofa.fastpath.layer import FastLayerMixin
from test_fastpath import _inputs, _tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _hidden(model, inputs):
    with torch.inference_mode():
        return model(**{k: v.cuda() for k, v in inputs.items()}).last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_fast_path_on_cuda_equals_plain_path(arch, dtype):
    fp32 = _tiny(arch)
    plain = sparsify(copy.deepcopy(fp32).to("cuda", dtype), fastpath=False)
    fast = sparsify(copy.deepcopy(fp32).to("cuda", dtype))
    assert sum(isinstance(m, FastSelfAttentionMixin) for m in fast.modules()) == 2
    inputs = _inputs()
    want = _hidden(plain, inputs)
    for _ in range(3):  # first call: the self-checks; then the lean forwards
        got = _hidden(fast, inputs)
    assert [m.__dict__.get("_sparse_ofa_layer_mode") for m in fast.modules()
            if isinstance(m, FastLayerMixin)] == ["tensor", "tensor"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # SDPA may pick another kernel for the views
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    apply_fastpath(fast, attention="sdpa", fuse=False)
    torch.testing.assert_close(_hidden(fast, inputs), want, rtol=tol, atol=tol)
