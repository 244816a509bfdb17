"""Per layer, the two CPU weight layouts against each other (not collected by pytest): aligned quads
and gathered quads of the same unstructured weight, `cpu_linear` at several token counts, one thread,
thread CPU time, interleaved, medians. The data behind `GATHER_COST` and `layout_costs` in
sparse_ofa/backends/cpu/dispatch.py (bench/NOTES.md, "Layout choice on AVX2 after the int16 layouts").

    SPARSE_OFA_CPU_ISA=avx2 python bench/layout_choice_ab.py --rounds 60
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="768x3072,3072x768,768x2304", help="KxN of the layers")
    p.add_argument("--sparsity", default="0.9,0.8")
    p.add_argument("--tokens", default="16,32,48,64,128")
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args()

    import torch

    from fused_avx2_ab import sparse_layer
    from sparse_ofa.backends import cpu

    torch.set_num_threads(1)
    cpu.load()
    isa = cpu.isa_code()
    linear = torch.ops.sparse_ofa.cpu_linear
    keys = ("quad_w", "quad_k", "row_ptr", "rowsum", "layout")
    print(f"ISA {cpu.effective_isa()} (code {isa}), 1 thread, thread CPU time, medians of {args.rounds}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for sparsity in (float(s) for s in args.sparsity.split(",")):
            layer = sparse_layer(k, n, sparsity, "unstructured", 1)
            prepared = layer._prepared["cpu"]
            layouts = {"aligned": tuple(prepared["q_" + key] for key in keys),
                       "gathered": tuple(prepared["g_" + key] for key in keys)}
            act = layer.act.kernel_args()
            ratio = prepared["q_quad_w"].numel() / prepared["g_quad_w"].numel()
            cells = []
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, k)
                fns = {name: (lambda w=w: linear(x, *w, layer.weight_scale, layer._epilogue_bias, *act,
                                                 torch.float32, isa, None, True))
                       for name, w in layouts.items()}
                times = {name: [] for name in fns}
                for fn in fns.values():
                    fn()
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        start = time.thread_time()
                        fn()
                        times[name].append(time.thread_time() - start)
                med = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
                cells.append(f"m={m}: {med['aligned']:.0f} / {med['gathered']:.0f} us "
                             f"(g/a {med['gathered'] / med['aligned']:.2f})")
            print(f"{k}->{n} {sparsity:.0%} (aligned / gathered quads {ratio:.2f}): " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
