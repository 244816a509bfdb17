"""The CPU work decomposition at any thread count: a sparsified model's output is the same, bit for bit,
at 1, 3 and 16 threads, on every ISA path this CPU runs. At 1 x 128 tokens (two 64-token tiles) 3 and
16 threads outnumber the tiles, so the products split output channels between threads and the fused
ops step aside for their op sequences; with fewer threads than tiles every thread takes a token range.
Servers run 8-64 threads; a 2-core machine still runs every split (the threads then share the cores)."""
import pytest
import torch

from conftest import cpu_kernel_paths, threads

pytestmark, cpu_backend, PATHS = cpu_kernel_paths()


def _pruned_bert(sparsity: float, pattern: str):
    from transformers import BertConfig, BertModel

    from sparse_ofa import magnitude_prune_

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=512, attn_implementation="sdpa"), add_pooling_layer=False)
    if sparsity:
        magnitude_prune_(model.eval(), sparsity, pattern)
    return model.eval()


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("sparsity,pattern", [(0.9, "unstructured"), (0.9, "1x4"), (0.0, "unstructured")])
def test_outputs_are_identical_at_any_thread_count(isa, sparsity, pattern, monkeypatch):
    from sparse_ofa import sparsify

    monkeypatch.setenv("SPARSE_OFA_CPU_ISA", cpu_backend.ISA_NAMES[isa])
    model = sparsify(_pruned_bert(sparsity, pattern))  # plans are cached per (shape, thread count)
    generator = torch.Generator().manual_seed(isa)
    for batch, tokens in ((1, 128), (2, 37)):
        ids = torch.randint(0, 100, (batch, tokens), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, tokens // 2:] = 0 if batch > 1 else 1
        outputs = {}
        for n in (1, 3, 16):
            with torch.inference_mode(), threads(n):
                outputs[n] = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.isfinite(outputs[1]).all()
        for n in (3, 16):
            assert torch.equal(outputs[n], outputs[1]), (n, batch, tokens, float((outputs[n] - outputs[1]).abs().max()))
