"""A/B of the fused FFN and QKV-attention ops against the unfused route on one ISA path (not collected
by pytest): bench/NOTES.md "Fused FFN and QKV-attention on the 256-bit paths" comes from this script.

    SPARSE_OFA_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/fused_avx2_ab.py --part ops --shape bert-base --threads 2
    SPARSE_OFA_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python bench/fused_avx2_ab.py --part model --shape minilm --threads 2

--part ops: one layer's ops at M = batch x tokens, interleaved round by round, medians:
  FFN: two cpu_linear calls (GELU, then residual + LayerNorm) | cpu_ffn;
  attention: cpu_linear + torch SDPA on views (the fast path's unfused route) | cpu_linear +
  cpu_attention | cpu_qkv_attention.
--cpu-time (one thread): the calling thread's CPU time instead of wall time (a loaded machine).
--part model: the sparsified model (backend "cpu", fast path) with the fused ops switched per call
(backends.cpu.dispatch.FFN_OP_ISAS / ATTENTION_OP_ISAS) in four variants, interleaved, medians.
The ISA is $SPARSE_OFA_CPU_ISA (the ops' own path); torch's SDPA follows ATEN_CPU_CAPABILITY.
"""
import argparse
import copy
import os
import statistics
import time

SHAPES = {"bert-base": (768, 3072, 12), "minilm": (384, 1536, 12)}


def sparse_layer(k: int, n: int, sparsity: float, pattern: str, seed: int):
    import torch

    from sparse_ofa import SparseInt8Linear
    from sparse_ofa.masks import magnitude_mask

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    lin.weight.data *= magnitude_mask(lin.weight.data, sparsity, pattern)
    return SparseInt8Linear.from_linear(lin, backend="cpu")


CLOCK = {"clock": time.perf_counter}


def interleave(fns: dict, rounds: int) -> dict:
    clock = CLOCK["clock"]
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ops(args, isa: int) -> None:
    import torch
    import torch.nn.functional as F

    from sparse_ofa.backends import cpu

    hidden, inter, heads = SHAPES[args.shape]
    m = args.batch * args.tokens
    ffn1 = sparse_layer(hidden, inter, args.sparsity, args.pattern, 1)
    ffn2 = sparse_layer(inter, hidden, args.sparsity, args.pattern, 2)
    qkv_layer = sparse_layer(hidden, 3 * hidden, args.sparsity, args.pattern, 3)

    def op_args(layer):
        return (list(cpu.CpuBackend.choose(m, layer._prepared["cpu"], isa)), layer.weight_scale,
                layer._epilogue_bias, *layer.act.kernel_args())

    w1, s1, b1, *a1 = op_args(ffn1)
    w2, s2, b2, *a2 = op_args(ffn2)
    wq, sq, bq, *aq = op_args(qkv_layer)
    x = torch.randn(args.batch, args.tokens, hidden)
    ln_w, ln_b = torch.randn(hidden), torch.randn(hidden)
    scale, d = (hidden // heads) ** -0.5, hidden // heads
    lin = torch.ops.sparse_ofa.cpu_linear

    def two_linears():
        mid = lin(x, *w1, s1, b1, *a1, torch.float32, isa, None, True)
        return lin(mid, *w2, s2, b2, *a2, torch.float32, isa, x, False, ln_w, ln_b, 1e-12)

    def ffn_op():
        return torch.ops.sparse_ofa.cpu_ffn(x, w1, s1, b1, *a1, w2, s2, b2, *a2, True, x, ln_w, ln_b, 1e-12, isa)

    def linear_sdpa():
        qkv = lin(x, *wq, sq, bq, *aq, torch.float32, isa)
        q, k, v = (t.view(args.batch, args.tokens, heads, d).transpose(1, 2) for t in qkv.split(hidden, -1))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(args.batch, args.tokens, hidden)

    def linear_attention():
        return torch.ops.sparse_ofa.cpu_attention(lin(x, *wq, sq, bq, *aq, torch.float32, isa), None, heads, scale,
                                                  isa)

    def qkv_attention():
        return torch.ops.sparse_ofa.cpu_qkv_attention(x, wq, sq, bq, *aq, None, heads, scale, isa)

    with torch.inference_mode():
        assert torch.equal(two_linears(), ffn_op())
        torch.testing.assert_close(linear_sdpa(), qkv_attention(), rtol=1e-4, atol=1e-4)
        res = interleave({"ffn: two cpu_linear": two_linears, "ffn: cpu_ffn": ffn_op,
                          "attn: cpu_linear + SDPA": linear_sdpa, "attn: cpu_linear + cpu_attention": linear_attention,
                          "attn: cpu_qkv_attention": qkv_attention}, args.rounds)
    for name, t in res.items():
        print(f"  {name:34s} median {t * 1e6:9.1f} us")


def model(args, isa: int) -> None:
    import torch

    from sparse_ofa.benchmarking import e2e
    from sparse_ofa.backends import cpu

    from dispatch_ab import minilm_shape

    if args.shape == "bert-base":
        fp32 = e2e.bert_base_pruned(args.sparsity, args.pattern, vocab_size=1000)
    else:
        fp32 = minilm_shape(args.sparsity, args.pattern)
    inputs = e2e.random_inputs(args.batch, args.tokens, vocab=1000)
    base = e2e.sparse_ofa_model(fp32, backend="cpu")
    off, on = cpu.dispatch.FFN_OP_ISAS - {isa}, cpu.dispatch.FFN_OP_ISAS | {isa}
    variants = {"unfused": (off, off), "ffn op": (on, off), "attention op": (off, on), "both": (on, on)}
    fns = {}
    for name, (ffn_isas, attn_isas) in variants.items():
        fwd = e2e.forward_fn(copy.deepcopy(base), inputs)

        def run(fwd=fwd, ffn_isas=ffn_isas, attn_isas=attn_isas):
            cpu.dispatch.FFN_OP_ISAS, cpu.dispatch.ATTENTION_OP_ISAS = ffn_isas, attn_isas
            return fwd()
        fns[name] = run
    with torch.inference_mode():
        outs = {}
        for name, fn in fns.items():
            fn()
            outs[name] = fn().last_hidden_state
    assert torch.equal(outs["ffn op"], outs["unfused"])  # the FFN op: the same bits
    for name in ("attention op", "both"):  # the attention kernel against torch's SDPA: fp32 rounding, which
        # can move a later layer's int8 activation by one step
        a, b = outs[name].flatten(1), outs["unfused"].flatten(1)
        print(f"  {name} vs unfused: max |diff| {(a - b).abs().max().item():.2e}, "
              f"cosine {torch.nn.functional.cosine_similarity(a, b).min().item():.8f}")
    res = interleave(fns, args.rounds)
    for name, t in res.items():
        print(f"  {name:14s} median {t * 1e3:8.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["ops", "model"], default="ops")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--cpu-time", action="store_true", help="time the thread's CPU time (--threads 1 only)")
    args = p.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            raise SystemExit("--cpu-time needs --threads 1")
        CLOCK["clock"] = time.thread_time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from sparse_ofa.backends import cpu

    torch.set_num_threads(args.threads)
    isa = cpu.effective_isa()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{args.part} {args.shape} {args.batch}x{args.tokens} {args.sparsity:.0%} {args.pattern} "
          f"isa={cpu.ISA_NAMES[isa]} torch={torch.backends.cpu.get_cpu_capability()} threads={args.threads} "
          f"rounds={args.rounds} load={load}{' cpu-time' if args.cpu_time else ''}", flush=True)
    (ops if args.part == "ops" else model)(args, isa)


if __name__ == "__main__":
    main()
