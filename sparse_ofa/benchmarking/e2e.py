"""End-to-end encoder benchmarks' building blocks (bench/test_e2e_cpu.py and `sparse-ofa bench`).

The models: a BERT-base-shape BertModel and a DistilBERT-base-shape DistilBertModel (random weights,
seeded) magnitude-pruned per layer, and the real all-MiniLM-L6-v2. The implementations timed on the same inputs ("impl" in the bench
convention): fp32_model (the model as given, eager), quantize_dynamic (torch.ao dynamic INT8, dense)
and sparse_ofa:<backend> (sparsify(), fast path on) / sparse_ofa:<backend>:plain (fast path off).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
import warnings

import torch
from torch import nn

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def bert_base_pruned(sparsity: float = 0.9, pattern: str = "unstructured", seed: int = 0,
                     num_layers: int = 12, vocab_size: int = 30522) -> nn.Module:
    """A BERT-base-shape encoder (no pooler), random weights, encoder Linears pruned by magnitude.
    (A smaller vocab_size builds faster and changes nothing the benchmarks time.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    from ..masks import magnitude_prune_

    torch.manual_seed(seed)
    config = BertConfig(**{**BERT_BASE, "num_hidden_layers": num_layers}, vocab_size=vocab_size,
                        attn_implementation="sdpa")
    model = BertModel(config, add_pooling_layer=False).eval()
    if sparsity > 0:
        magnitude_prune_(model, sparsity, pattern)
    return model


def distilbert_base_pruned(sparsity: float = 0.9, pattern: str = "unstructured", seed: int = 0,
                           vocab_size: int = 30522) -> nn.Module:
    """A DistilBERT-base-shape DistilBertModel (6 layers, 768/3072, 12 heads), random weights, encoder
    Linears pruned by magnitude."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DistilBertConfig, DistilBertModel

    from ..masks import magnitude_prune_

    torch.manual_seed(seed)
    model = DistilBertModel(DistilBertConfig(vocab_size=vocab_size, attn_implementation="sdpa")).eval()
    if sparsity > 0:
        magnitude_prune_(model, sparsity, pattern)
    return model


def random_inputs(batch: int, seq: int, vocab: int = 30522, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sentence_inputs(tokenizer, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real English sentences (sparse_ofa.tasks.corpus), padded to exactly `seq` tokens."""
    from ..tasks.corpus import sample_sentences

    return dict(tokenizer(sample_sentences(batch, seed=seed), padding="max_length", truncation=True,
                          max_length=seq, return_tensors="pt"))


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """torch.ao dynamic INT8 (per-tensor activations, dense int8 GEMM) of a copy of the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                      dtype=torch.qint8)


def sparse_ofa_model(model: nn.Module, *, backend: str = "auto", fastpath: bool = True) -> nn.Module:
    from ..sparsify import sparsify

    return sparsify(copy.deepcopy(model), backend=backend, fastpath=fastpath)


def dispatched_backend(model: nn.Module, tokens: int) -> str:
    """Backend name the first sparse layer runs at `tokens` tokens (what "auto" resolved to)."""
    from ..modules import SparseInt8Linear

    for module in model.modules():
        if isinstance(module, SparseInt8Linear):
            return module.dispatch(tokens)
    return "none"


@torch.inference_mode()
def embeddings(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden state over non-padding tokens, float32 [batch, hidden]."""
    from ..models.minilm import mean_pool

    hidden = model(**inputs).last_hidden_state
    return mean_pool(hidden.float(), inputs["attention_mask"])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def forward_fn(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """A no-argument callable running one inference forward (what the benchmarks time)."""
    def run():
        with torch.inference_mode():
            return model(**inputs)
    return run


def median_seconds(fn, *, warmup: int = 2, rounds: int = 10, max_seconds: float = 10.0,
                   clock=time.perf_counter) -> float:
    """Median time of fn() by `clock` over up to `rounds` runs after `warmup` runs (stops after
    max_seconds of wall time). clock=time.thread_time measures the calling thread's CPU time: on a
    busy machine, with one torch thread, it leaves out the time the thread waited for a core."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < rounds and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)
