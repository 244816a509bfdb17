"""Peer table (not collected by pytest): BERT-base shape, random weights pruned by magnitude (the same
weights for every engine), batch 1 x 128 tokens, interleaved rounds, medians (bench/NOTES.md "Peer
table" comes from this script).

    python bench/peer_table.py --threads 2 --sparsity 0,0.8,0.9 --rounds 15
    python bench/peer_table.py ... --deepsparse-python /path/to/venv-with-deepsparse/bin/python
    python bench/peer_table.py --threads 1 --cpu-time      # a loaded machine: process CPU time

Engines: torch fp32 eager, torch quantize_dynamic (dynamic INT8, fbgemm), onnxruntime fp32 and
onnxruntime dynamic INT8 (onnxruntime.quantization.quantize_dynamic, QInt8 weights) on the same model
exported to ONNX (opset 17, eager attention), DeepSparse on that ONNX file (fp32: it finds the zeros
itself) when --deepsparse-python names an interpreter that has it, and sparse_ofa `sparsify(model)`
(backend auto, fast path). The torch engines (fp32, quantize_dynamic, sparse_ofa) share one OpenMP
pool and run interleaved, round by round, in this process; onnxruntime and DeepSparse each run in a
process of their own, one after the other (not interleaved): their thread pools spin-wait between
runs, and on a 2-core machine an idle onnxruntime pool beside the torch engines took a core from
them (sparse_ofa 90 % 57.6 ms interleaved with onnxruntime, 23.9 ms without it, same machine).
onnxruntime is optional: without it those rows are skipped, as is DeepSparse without its
interpreter. Also printed: each engine's mean token cosine to torch fp32.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Times one ONNX engine in a process of its own: argv = engine, model, ids.npy, mask.npy, out.npy, threads,
# rounds, cpu_time; prints {"median": seconds} and saves the output for the cosine.
OWN_PROCESS_TIMER = r"""
import json, statistics, sys, time
import numpy as np
engine_name, path, ids, mask, out, threads, rounds, cpu_time = sys.argv[1:9]
clock = time.process_time if cpu_time == "1" else time.perf_counter
inputs = [np.load(ids), np.load(mask)]
if engine_name == "deepsparse":
    from deepsparse import compile_model
    engine = compile_model(path, batch_size=1, num_cores=int(threads))
    run = lambda: engine.run(inputs)[0]
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": inputs[0], "attention_mask": inputs[1]}
    run = lambda: sess.run(None, feeds)[0]
y = run()
for _ in range(3):
    run()
times = []
for _ in range(int(rounds)):
    t = clock()
    run()
    times.append(clock() - t)
np.save(out, y)
print(json.dumps({"median": statistics.median(times)}))
"""


def time_own_process(python: str, engine: str, model_path: str, feeds: dict, tmp: str, threads: int, rounds: int,
                     cpu_time: bool):
    """(median seconds, output tensor) of `engine` ("onnxruntime" / "deepsparse") run by `python` in a
    process of its own, or None after printing why it failed."""
    import numpy as np
    import torch

    ids_path, mask_path, out_path = (os.path.join(tmp, n) for n in ("ids.npy", "mask.npy", f"{engine}_out.npy"))
    np.save(ids_path, feeds["input_ids"])
    np.save(mask_path, feeds["attention_mask"])
    run = subprocess.run([python, "-c", OWN_PROCESS_TIMER, engine, model_path, ids_path, mask_path, out_path,
                          str(threads), str(rounds), "1" if cpu_time else "0"], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"{engine} failed: {run.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])["median"], torch.from_numpy(np.load(out_path))


def export_onnx(model, inputs, path: str) -> None:
    import copy

    import torch

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # (the SDPA export gave wrong numbers with this transformers)

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Encoder(eager), (inputs["input_ids"], inputs["attention_mask"]), path,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          opset_version=17, dynamo=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", default="0,0.8,0.9")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--deepsparse-python", default=None)
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread: time the process's CPU time (every engine runs in its calling thread then)")
    p.add_argument("--engines", default="fp32,quantize_dynamic,ort_fp32,ort_int8,sparse_ofa")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1")
    clock = time.process_time if args.cpu_time else time.perf_counter

    import numpy as np
    import torch

    from sparse_ofa.benchmarking import e2e

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        ort = None
        print("onnxruntime not installed: its rows are skipped")
    torch.set_num_threads(args.threads)
    wanted = args.engines.split(",")
    inputs = e2e.random_inputs(1, args.tokens)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    tmp = tempfile.mkdtemp(prefix="sparse_ofa_peers_")
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[0]
    print(f"BERT-base shape 1x{args.tokens}, {args.threads} threads{' (process CPU time)' if args.cpu_time else ''}, "
          f"rounds={args.rounds}, load at start {load0}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"onnxruntime {ort.__version__ if ort else '-'}", flush=True)
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        fp32 = e2e.bert_base_pruned(sparsity)
        fns, outs = {}, {}
        if "fp32" in wanted:
            fns["torch fp32"] = e2e.forward_fn(fp32, inputs)
        if "quantize_dynamic" in wanted:
            fns["torch quantize_dynamic"] = e2e.forward_fn(e2e.quantize_dynamic(fp32), inputs)
        onnx_path = os.path.join(tmp, f"bert_{sparsity}.onnx")
        if ort is not None or args.deepsparse_python:
            export_onnx(fp32, inputs, onnx_path)
        own_process = {}  # row name -> (python, engine, model path)
        if ort is not None:
            if "ort_fp32" in wanted:
                own_process["onnxruntime fp32 (own process)"] = (sys.executable, "onnxruntime", onnx_path)
            if "ort_int8" in wanted:
                int8_path = onnx_path.replace(".onnx", "_int8.onnx")
                quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8)
                own_process["onnxruntime dynamic INT8 (own process)"] = (sys.executable, "onnxruntime", int8_path)
        if args.deepsparse_python:
            own_process["DeepSparse (fp32 ONNX, own process)"] = (args.deepsparse_python, "deepsparse", onnx_path)
        if "sparse_ofa" in wanted:
            model = e2e.sparse_ofa_model(fp32)
            fns[f"sparse_ofa auto ({e2e.dispatched_backend(model, args.tokens)})"] = e2e.forward_fn(model, inputs)
        with torch.inference_mode():
            ref = fp32(**inputs).last_hidden_state
        times = {name: [] for name in fns}
        for name, fn in fns.items():
            for _ in range(2):
                out = fn()
            outs[name] = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        for _ in range(args.rounds):
            for name, fn in fns.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, (python, engine, path) in own_process.items():
            timed = time_own_process(python, engine, path, feeds, tmp, args.threads, args.rounds, args.cpu_time)
            if timed is not None:
                medians[name], outs[name] = timed
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        print(f"sparsity {sparsity:.0%} (load now {load}):")
        for name, t in medians.items():
            cos = torch.nn.functional.cosine_similarity(outs[name].reshape(-1, ref.shape[-1]).float(),
                                                        ref.reshape(-1, ref.shape[-1])).mean().item()
            print(f"  {name:40s} median {t * 1e3:9.2f} ms   cosine {cos:.6f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
