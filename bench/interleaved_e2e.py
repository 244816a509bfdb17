"""Interleaved end-to-end timing for busy machines (not collected by pytest): the numbers in
bench/NOTES.md "End to end" come from this script.

    python bench/interleaved_e2e.py --threads 2 --pattern 1x4 --seconds 300 --gate 0.35
    python bench/interleaved_e2e.py --threads 1 --cpu-time --pattern 1x4

Every round runs each variant once, in turn (fp32 every 5th round: it is slow), so that load
changes hit all variants alike. --gate X waits before each round for 0.3 s with less than X of the
machine's CPU busy; --cpu-time (one thread only) times the thread's CPU time instead of wall time.
Variants: fp32 eager, quantize_dynamic, sparse_ofa plain (fastpath=False), fast path (fused CPU
attention and post-ops where AVX-512 runs), the same without the post-ops (fuse=False), and also
with torch's SDPA (attention="sdpa": the plain path's numerics), fast path + bf16 attention; BERT-base
shape, batch x 128 tokens, 90 % sparse.
"""
import argparse
import copy
import statistics
import time


def cpu_busy(seconds: float = 0.3) -> float:
    def snapshot():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--gate", type=float, default=None)
    p.add_argument("--cpu-time", action="store_true")
    args = p.parse_args()

    import torch

    from sparse_ofa.benchmarking import e2e
    from sparse_ofa.fastpath import apply_fastpath

    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    fp32 = e2e.bert_base_pruned(args.sparsity, args.pattern)
    bf16 = e2e.sparse_ofa_model(fp32)
    apply_fastpath(bf16, attention="bf16")
    sdpa = e2e.sparse_ofa_model(fp32)
    apply_fastpath(sdpa, attention="sdpa", fuse=False)
    unfused = e2e.sparse_ofa_model(fp32)
    apply_fastpath(unfused, fuse=False)
    models = {"fp32 eager": fp32, "quantize_dynamic": e2e.quantize_dynamic(fp32),
              "sparse_ofa plain": e2e.sparse_ofa_model(fp32, fastpath=False),
              "sparse_ofa fast": e2e.sparse_ofa_model(fp32), "fast, no post-ops": unfused,
              "fast, sdpa, no post-ops": sdpa,
              "sparse_ofa bf16 attn": bf16}
    inputs = e2e.random_inputs(args.batch, 128)
    fns = {name: e2e.forward_fn(model, inputs) for name, model in models.items()}
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    deadline, rounds = time.time() + args.seconds, 0
    while time.time() < deadline:
        if args.gate is not None and cpu_busy() >= args.gate:
            continue
        for name, fn in fns.items():
            if name == "fp32 eager" and rounds % 5:
                continue
            start = clock()
            fn()
            times[name].append(clock() - start)
        rounds += 1
    print(f"{args.pattern} {args.sparsity:.0%}, batch {args.batch}x128, {args.threads} threads, "
          f"{'thread CPU time' if args.cpu_time else 'wall time'}, {rounds} rounds")
    for name, ts in times.items():
        if ts:
            ts.sort()
            print(f"{name:22s} n={len(ts):4d} median {statistics.median(ts) * 1e3:8.2f} ms  "
                  f"p10 {ts[len(ts) // 10] * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
