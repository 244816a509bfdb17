"""Two checkouts of sparse_ofa, timed interleaved on the same models (not collected by pytest): did a
change make any end-to-end forward slower?

    python bench/checkout_ab.py /path/to/before /path/to/after --rounds 40

Each checkout runs in its own worker process (its own import of sparse_ofa and its own extension
build, TORCH_EXTENSIONS_DIR set per checkout); the parent alternates them round by round, so load
changes on a shared machine hit both alike. A round runs every case once in each worker: BERT-base
shape (random weights, magnitude-pruned) at 1 x 128 tokens, 0 % / 80 % / 90 % unstructured / 90 % 1x4,
90 % unstructured at 1 x 16 tokens (the aligned-quad layout), and
all-MiniLM-L6-v2 on one 12-token sentence, each sparsify()'d with the defaults (auto backend, fast
path). --cpu-time (default with --threads 1) times the thread's CPU time, which a busy machine
disturbs less than wall time. Prints per case the median of each checkout and after / before.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = (("bert-base 0%", 0.0, "unstructured", 128), ("bert-base 80% unstr", 0.8, "unstructured", 128),
         ("bert-base 90% unstr", 0.9, "unstructured", 128), ("bert-base 90% 1x4", 0.9, "1x4", 128),
         ("bert-base 90% unstr 1x16", 0.9, "unstructured", 16), ("minilm 1x12", None, None, 12))


def worker(threads: int, cpu_time: bool) -> None:
    """Read a round count per line on stdin, answer {case: [seconds, ...]} as one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from sparse_ofa import sparsify
    try:
        from sparse_ofa.benchmarking import e2e
        from sparse_ofa.models.minilm import load_minilm
    except ImportError:  # a checkout from before the sub-packages
        from sparse_ofa import bench_e2e as e2e
        from sparse_ofa.minilm import load_minilm

    models = {}
    for name, sparsity, pattern, tokens in CASES:
        if sparsity is None:
            model, tokenizer = load_minilm()
            inputs = e2e.sentence_inputs(tokenizer, 1, tokens)
        else:
            model = e2e.bert_base_pruned(sparsity, pattern)
            inputs = e2e.random_inputs(1, tokens)
        models[name] = (sparsify(model.eval()), inputs)
    clock = time.thread_time if cpu_time else time.perf_counter
    with torch.inference_mode():
        for model, inputs in models.values():  # first calls: fast-path checks, plans, warm caches
            for _ in range(3):
                model(**inputs)
        print("ready", flush=True)
        for line in sys.stdin:
            times = {name: [] for name in models}
            for _ in range(int(line)):
                for name, (model, inputs) in models.items():
                    t0 = clock()
                    model(**inputs)
                    times[name].append(clock() - t0)
            print(json.dumps(times), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wall", action="store_true", help="wall time even at one thread")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cpu_time = args.threads == 1 and not args.wall
    if args.worker:
        return worker(args.threads, cpu_time)
    procs = {}
    for label, path in (("before", args.before), ("after", args.after)):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path), HF_HUB_OFFLINE="1",
                   TORCH_EXTENSIONS_DIR=os.path.join(tempfile.gettempdir(), "sparse_ofa_ab_"
                                                     + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]))
        procs[label] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), path, path, "--threads", str(args.threads), "--worker"]
            + (["--wall"] if args.wall else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env, cwd="/")
    for proc in procs.values():
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a worker failed to start (see its stderr above)")
    samples = {label: {name: [] for name, *_ in CASES} for label in procs}
    for _ in range(args.rounds):
        for label, proc in procs.items():
            proc.stdin.write("1\n")
            proc.stdin.flush()
            for name, values in json.loads(proc.stdout.readline()).items():
                samples[label][name] += values
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    unit = "CPU ms" if cpu_time else "ms"
    print(f"{args.rounds} interleaved rounds, {args.threads} thread(s), medians in {unit}")
    for name, *_ in CASES:
        before = statistics.median(samples["before"][name]) * 1e3
        after = statistics.median(samples["after"][name]) * 1e3
        print(f"{name:22s} before {before:8.2f}  after {after:8.2f}  after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
