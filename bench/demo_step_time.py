"""Issue 18: the demo's Prune OFA training step with and without bf16 autocast, interleaved in one
process (blocks of `--block` steps each, alternating), so load from elsewhere hits both alike.

    PYTHONPATH=. python bench/demo_step_time.py --threads 1 --rounds 6 --block 5

Prints the median wall and process-CPU ms per step of each path and their ratio. The fp32 path is what
the demo runs where torch.cpu._is_avx512_bf16_supported() is False (sparse_ofa.demo.run.cpu_has_bf16;
`--no-bf16` forces it on any CPU).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5)
    args = ap.parse_args()

    import torch

    from sparse_ofa.demo.run import DemoConfig, _corpus
    from sparse_ofa.tasks.corpus import SentenceBatches
    from sparse_ofa.training.encoder_recipe import distill_phase, freeze_embeddings_and_pooler
    from sparse_ofa.models.minilm import load_minilm
    from sparse_ofa.selection import is_encoder_linear
    from sparse_ofa.tasks.corpus import sample_split
    from sparse_ofa.training.distill import TeacherCache
    from sparse_ofa.training.pruning import GMPSchedule, Pruner

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    teacher, tokenizer = load_minilm()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = {flag: DemoConfig(steps=1000, bf16=flag, threads=args.threads, save_student=False) for flag in (True, False)}
    train, _ = sample_split(_corpus(cfg[True], lambda *a: None)["pool"], 3000, 500, seed=0)
    caches = {flag: TeacherCache(teacher, tokenizer, train[:400], 64, flag) for flag in (True, False)}
    students = {}
    for flag in (True, False):
        s = copy.deepcopy(teacher)
        freeze_embeddings_and_pooler(s)
        students[flag] = (s, Pruner(s, GMPSchedule(0.9, 0.0, ramp_steps=50, update_every=1000), filter_fn=is_encoder_linear))

    wall = {True: [], False: []}
    cpu = {True: [], False: []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for flag in (True, False):
            s, pruner = students[flag]
            w0, c0 = time.perf_counter(), time.process_time()
            batches = SentenceBatches(train[:400], tokenizer, 16, 64, seed=r)
            distill_phase(s, teacher, batches, cfg[flag].recipe(), steps=args.block, lr=1e-4, pruner=pruner,
                          bf16=flag, teacher_cache=caches[flag])
            if r:
                wall[flag].append((time.perf_counter() - w0) * 1000 / args.block)
                cpu[flag].append((time.process_time() - c0) * 1000 / args.block)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}
    print(f"threads {args.threads}, load at start {load:.2f}, bf16 supported "
          f"{getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: None)()}")
    print(f"bf16 autocast: {med[True][0]:.0f} ms wall, {med[True][1]:.0f} ms CPU per step")
    print(f"fp32:          {med[False][0]:.0f} ms wall, {med[False][1]:.0f} ms CPU per step")
    print(f"fp32 / bf16: {med[False][0] / med[True][0]:.2f}x wall, {med[False][1] / med[True][1]:.2f}x CPU")


if __name__ == "__main__":
    main()
