"""Whole-model A/B of the CPU dispatch (not collected by pytest): for one model shape, sparsity and
pattern, every layer forced sparse (backend="cpu"), every layer dense INT8 (backend="dense"), what
backend="auto" picks, torch fp32 eager and torch quantize_dynamic, interleaved round by round (load
changes hit all variants alike), medians. The AVX2 dispatch limits in sparse_ofa/backends/cpu/dispatch.py
come from this script (bench/NOTES.md, "AVX2-only CPUs").

    python bench/dispatch_ab.py --shape bert-base --tokens 128 --sparsity 0.8 --pattern unstructured
    python bench/dispatch_ab.py --shape minilm --batch 32 --tokens 44 --sparsity 0.9 --pattern 1x4 --rounds 30
"""
import argparse
import os
import statistics
import time


def minilm_shape(sparsity: float, pattern: str):
    """all-MiniLM-L6-v2's shape (6 layers, 384 / 1536, 12 heads), random weights, pruned by magnitude."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import BertConfig, BertModel

    from sparse_ofa.masks import magnitude_prune_

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=1000, attn_implementation="sdpa")
    model = BertModel(config, add_pooling_layer=False).eval()
    if sparsity > 0:
        magnitude_prune_(model, sparsity, pattern)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["bert-base", "minilm"], default="bert-base")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--threads", default="2", help="thread counts, e.g. 1,2: interleaved in each round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--variants", default="fp32,quantize_dynamic,auto,cpu,dense")
    p.add_argument("--plain", action="store_true", help="sparse_ofa models without the fast path")
    args = p.parse_args()

    import torch

    from sparse_ofa.benchmarking import e2e

    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(thread_counts[0])
    if args.shape == "bert-base":  # (a 1,000-token vocabulary builds faster; the lookup costs the same)
        fp32 = e2e.bert_base_pruned(args.sparsity, args.pattern, vocab_size=1000)
    else:
        fp32 = minilm_shape(args.sparsity, args.pattern)
    inputs = e2e.random_inputs(args.batch, args.tokens, vocab=1000)
    models = {}
    t_build = time.perf_counter()
    for name in args.variants.split(","):
        if name == "fp32":
            models[name] = fp32
        elif name == "quantize_dynamic":
            models[name] = e2e.quantize_dynamic(fp32)
        else:
            models[name] = e2e.sparse_ofa_model(fp32, backend=name, fastpath=not args.plain)
    print(f"models built in {time.perf_counter() - t_build:.1f} s", flush=True)
    ref = e2e.embeddings(fp32, inputs)
    cosine = {name: e2e.mean_cosine(e2e.embeddings(m, inputs), ref) for name, m in models.items()}
    fns = {name: e2e.forward_fn(m, inputs) for name, m in models.items()}
    for fn in fns.values():
        fn()
    times = {(t, name): [] for t in thread_counts for name in fns}
    for _ in range(args.rounds):
        for t in thread_counts:
            torch.set_num_threads(t)
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[(t, name)].append(time.perf_counter() - start)
    m = args.batch * args.tokens
    auto = e2e.dispatched_backend(models["auto"], m) if "auto" in models else "-"
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{args.shape} {args.batch}x{args.tokens} {args.sparsity:.0%} {args.pattern} threads={args.threads} "
          f"rounds={args.rounds} load={load} {'plain' if args.plain else 'fastpath'} auto(first layer)->{auto}")
    for (t, name), ts in times.items():
        print(f"  {t} thr {name:18s} median {statistics.median(ts) * 1e3:9.2f} ms  min {min(ts) * 1e3:9.2f} ms  "
              f"cosine {cosine[name]:.6f}")


if __name__ == "__main__":
    main()
