"""Cost of the per-call layout checks (`weight_of` / `check_indices` in csrc/sparse_ofa_cpu.cpp) on the
ISA path in use (not collected by pytest; bench/NOTES.md "Layout checks" cites it).

    python bench/layout_check_cost.py --threads 1 --cpu-time

For the four linears of a BERT-base layer (fused QKV 768->2304, attention output 768->768, FFN
768->3072 and 3072->768; random weights at --sparsity, --pattern), the layout a `--tokens`-token call
takes: `cpu_linear` on 0 tokens (the argument and layout checks, nothing else) against the same call
on `--tokens` tokens, medians; the checks-only call of a tiny 8 -> 8 layer (the op's dispatch and
argument checks) is subtracted; then x 12 layers against the whole sparsified model's forward (fast
path, backend "cpu"), interleaved with the check-only calls.
"""
import argparse
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--cpu-time", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1")

    import torch

    from sparse_ofa.benchmarking import e2e
    from sparse_ofa.backends import cpu

    from fused_avx2_ab import sparse_layer

    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    isa = cpu.isa_code()
    shapes = {"tiny 8->8 (dispatch)": (8, 8), "qkv 768->2304": (768, 2304), "attn out 768->768": (768, 768), "ffn1 768->3072": (768, 3072),
              "ffn2 3072->768": (3072, 768)}
    calls = {}
    for i, (name, (k, n)) in enumerate(shapes.items()):
        layer = sparse_layer(k, n, args.sparsity, args.pattern, 10 + i)
        w = cpu.CpuBackend.choose(args.tokens, layer._prepared["cpu"], isa)
        rest = (layer.weight_scale, layer._epilogue_bias, *layer.act.kernel_args(), torch.float32, isa)
        x0, x = torch.empty(0, k), torch.randn(args.tokens, k)
        entries = w[1].numel()
        calls[name] = (entries, lambda w=w, rest=rest, x0=x0: torch.ops.sparse_ofa.cpu_linear(x0, *w, *rest),
                       lambda w=w, rest=rest, x=x: torch.ops.sparse_ofa.cpu_linear(x, *w, *rest))
    fp32 = e2e.bert_base_pruned(args.sparsity, args.pattern, vocab_size=1000)
    model = e2e.forward_fn(e2e.sparse_ofa_model(fp32, backend="cpu"), e2e.random_inputs(1, args.tokens, vocab=1000))
    fns = {"model": model}
    for name, (_, check, full) in calls.items():
        fns[name + " checks"] = check
        fns[name + " call"] = full
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in fns.items():
                reps = 1 if name == "model" else 20
                start = clock()
                for _ in range(reps):
                    fn()
                times[name].append((clock() - start) / reps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"isa={cpu.ISA_NAMES[cpu.effective_isa()]} {args.sparsity:.0%} {args.pattern} M={args.tokens} "
          f"threads={args.threads}{' cpu-time' if args.cpu_time else ''} rounds={args.rounds} load={load}")
    total, base = 0.0, med["tiny 8->8 (dispatch) checks"]
    for name, (entries, _, _) in calls.items():
        c, f = med[name + " checks"], med[name + " call"]
        if not name.startswith("tiny"):
            total += c - base
        print(f"  {name:18s} index entries {entries:7d}  checks-only call {c * 1e6:7.1f} us  "
              f"full call {f * 1e6:8.1f} us")
    print(f"  per layer {total * 1e6:.1f} us, x 12 = {12 * total * 1e3:.3f} ms of a {med['model'] * 1e3:.2f} ms "
          f"forward ({12 * total / med['model']:.1%}; each checks-only call less the tiny layer's, i.e. less "
          f"the op dispatch)")


if __name__ == "__main__":
    main()
