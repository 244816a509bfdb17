"""STS-B ablations of the demo's recipe: `sparse-ofa demo` with DemoConfig overrides, one JSON line per
run (not collected by pytest; the runs behind docs/evaluation.md's tables).

    python bench/stsb_ablation.py --steps 1000 --threads 1 --set sparsity=0.8 --tag s80 \
        --out out/ablations.jsonl

Runs the whole demo (run_demo: Prune OFA, QAT + outlier-aware conversion to sparse INT8, one-shot
magnitude pruning, held-out quality, speed) and appends its STS-B dev Spearman x 100 (teacher, Prune
OFA sparse INT8, one-shot sparse INT8) with the config, the wall / CPU time, the load average at the
start and the CPU model. STS-B dev is evaluation data: it is only scored, never trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DemoConfig override")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="out/ablations.jsonl")
    args = ap.parse_args()

    from sparse_ofa.demo import DemoConfig, run_demo

    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = DemoConfig(steps=args.steps, threads=args.threads, save_student=False,
                     **{key: _value(value) for key, value in overrides.items()})
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as output:
        report = run_demo(cfg, output=output, log=lambda *a: None)
    row = {"tag": args.tag, "overrides": {key: _value(value) for key, value in overrides.items()}, "steps": args.steps, "threads": args.threads,
           "stsb": report["stsb"], "sparsity": report["sparsity"]["overall"],
           "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
           "load_at_start": round(load, 2), "cpu": platform.processor() or platform.machine()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
