"""`sparse-ofa bench`: a short benchmark on the user's own machine, same rows and table as `pytest bench/`.

Per-layer rows: BERT-base linear shapes at M tokens, 90 % sparse (unstructured and 1x4), every
available sparse_ofa backend against fp32 F.linear, torch._int_mm (dense INT8) and torch.ao
quantize_dynamic. End-to-end rows: a BERT-base-shape encoder (random weights, magnitude-pruned),
batch 1, seq 128: fp32 eager, quantize_dynamic and sparsify() of its 90 % unstructured and 1x4
prunings. Writes speedup.md, rows.json and a
PNG to --output. --quick: one small shape and a 1-layer encoder, seconds not minutes.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (K, N)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time sparse INT8 against fp32 / dense INT8 on this machine")
    p.add_argument("--quick", action="store_true", help="tiny grid (seconds): a smoke run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--m", type=int, default=128, help="tokens per layer call")
    p.add_argument("--no-e2e", action="store_true", help="per-layer rows only")
    p.add_argument("--cpu-time", action="store_true",
                   help="busy machine: 1 thread, time the thread's CPU time instead of wall time")
    p.add_argument("--output", default="sparse_ofa_out/bench", help="folder for the table and plot")
    p.set_defaults(func=run)


def _timer(device: torch.device, rounds: int, clock=time.perf_counter):
    from ..benchmarking.e2e import median_seconds

    def measure(fn) -> float:
        def synced():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return median_seconds(synced, rounds=rounds, max_seconds=5.0, clock=clock)
    return measure


def _row(name: str, median: float, **info) -> dict:
    return {"name": name, "group": f"{info['kind']}-{info['device']}-{info['shape']}",
            "median": median, "extra_info": info}


def _sparse_layers(linear: nn.Linear) -> dict[str, nn.Module]:
    """{backend name: SparseInt8Linear} for every available backend that runs this weight here."""
    from ..backends import list_backends
    from ..modules import SparseInt8Linear

    layers = {}
    for name, ok, _ in list_backends():
        if not ok or name == "reference":  # the oracle is float64 and slow: not a contender
            continue
        try:
            layers[name] = SparseInt8Linear.from_linear(linear, backend=name)
        except (ValueError, RuntimeError):
            continue  # does not run this pattern on this device
    return layers


@torch.inference_mode()
def layer_rows(device: torch.device, shapes, m: int, sparsity: float, patterns, measure) -> list[dict]:
    from ..masks import magnitude_mask

    rows = []
    for k, n in shapes:
        shape = f"{k}x{n}"
        base = dict(kind="layer", device=device.type, shape=shape, m=m, sparsity=sparsity)
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device)
        bias = torch.randn(n, device=device)
        rows.append(_row(f"fp32_linear {shape}", measure(lambda: F.linear(x, w, bias)), **base,
                         pattern="dense", impl="fp32_linear"))
        x_q = torch.randint(-127, 128, (max(m, 17) if device.type == "cuda" else m, k),
                            dtype=torch.int8, device=device)
        w_t = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device).t()
        rows.append(_row(f"int_mm {shape}", measure(lambda: torch._int_mm(x_q, w_t)), **base,
                         pattern="dense", impl="int_mm"))
        if device.type == "cpu":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lin = nn.Linear(k, n).eval()
                qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear},
                                                              dtype=torch.qint8)
            rows.append(_row(f"quantize_dynamic {shape}", measure(lambda: qlin(x)), **base,
                             pattern="dense", impl="quantize_dynamic"))
        for pattern in patterns:
            linear = nn.Linear(k, n).to(device)
            linear.weight.data = w * magnitude_mask(w, sparsity, pattern)
            linear.bias.data = bias
            for name, layer in _sparse_layers(linear).items():
                rows.append(_row(f"sparse_ofa:{name} {pattern} {shape}", measure(lambda: layer(x)),
                                 **base, pattern=pattern, impl=f"sparse_ofa:{name}"))
    return rows


def e2e_rows(device: torch.device, sparsity: float, num_layers: int, measure,
             vocab_size: int = 30522, patterns=("unstructured", "1x4")) -> list[dict]:
    """fp32 and quantize_dynamic baselines once (dense: the pattern does not change their speed), and
    sparse_ofa for each pattern, each pruned from the same random BERT-base weights."""
    from ..benchmarking import e2e

    shape = "bert-base" if num_layers == 12 else f"bert-base-{num_layers}l"
    inputs = {k: v.to(device) for k, v in e2e.random_inputs(1, 128, vocab=vocab_size).items()}
    rows = []

    def add(impl, model, pattern, ref):
        rows.append(_row(f"{impl} {pattern} {shape}", measure(e2e.forward_fn(model, inputs)), kind="e2e",
                         device=device.type, shape=shape, batch=1, seq=128, sparsity=sparsity,
                         pattern=pattern, impl=impl,
                         cosine_vs_fp32=e2e.mean_cosine(e2e.embeddings(model, inputs), ref)))

    for i, pattern in enumerate(patterns):
        fp32 = e2e.bert_base_pruned(sparsity, pattern, num_layers=num_layers, vocab_size=vocab_size).to(device)
        ref = e2e.embeddings(fp32, inputs)
        if i == 0:
            add("fp32_model", fp32, "dense", ref)
            if device.type == "cpu":
                add("quantize_dynamic", e2e.quantize_dynamic(fp32), "dense", ref)
        sparse = e2e.sparse_ofa_model(fp32)
        add(f"sparse_ofa:{e2e.dispatched_backend(sparse, 128)}", sparse, pattern, ref)
    return rows


def run(args) -> int:
    from ..benchmarking.report import format_table, write_report

    if args.cpu_time and (args.device != "cpu" or (args.threads or 1) != 1):
        raise ValueError("--cpu-time measures one CPU thread: use it with --device cpu, --threads 1")
    if args.threads or args.cpu_time:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device here")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    measure = _timer(device, rounds=3 if args.quick else 20, clock=clock)
    shapes = SHAPES[:1] if args.quick else SHAPES
    m = 16 if args.quick else args.m
    rows = layer_rows(device, shapes, m, args.sparsity, ("unstructured", "1x4"), measure)
    if not args.no_e2e:
        rows += (e2e_rows(device, args.sparsity, 1, measure, vocab_size=1000) if args.quick
                 else e2e_rows(device, args.sparsity, 12, measure))
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
          f"{'thread CPU time' if args.cpu_time else 'wall time'}")
    print(format_table(rows))
    for what, path in write_report(rows, args.output).items():
        print(f"{what}: {path}")
    return 0
