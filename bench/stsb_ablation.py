"""Issue 18 ablations: the demo's Prune OFA phase with DemoConfig overrides, scored on STS-B dev.

    PYTHONPATH=. python bench/stsb_ablation.py --steps 1000 --threads 1 --set similarity_weight=1 --qat \
        --tag sim1 --out out/ablations.jsonl

Runs exactly the demo's training (sparse_ofa.demo: same corpus, split, teacher cache, _train) and,
with --qat, its QAT + outlier-aware conversion to sparse INT8; then STS-B dev Spearman x 100 of the fp32
sparse student (and of the sparse INT8 one with --qat). One JSON line per run is appended to --out with
the config, the scores, the wall / CPU time, the load average at the start and the CPU flags.
STS-B dev is evaluation data: it is only scored here, never trained on.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DemoConfig override")
    ap.add_argument("--qat", action="store_true", help="also QAT + convert and score the sparse INT8 model")
    ap.add_argument("--oneshot", action="store_true", help="also score one-shot magnitude pruning (sparse INT8)")
    ap.add_argument("--save", default=None, help="save the fp32 student here (save_pretrained)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="out/ablations.jsonl")
    args = ap.parse_args()

    import torch
    from tqdm.auto import tqdm

    from sparse_ofa import magnitude_prune_, sparsify
    from sparse_ofa.corpus import sample_split
    from sparse_ofa.demo import (DemoConfig, TeacherCache, _corpus, _set_observers_training, _train)
    from sparse_ofa.evaluation import load_stsb, stsb_spearman
    from sparse_ofa.lock import PatternLock
    from sparse_ofa.minilm import load_minilm
    from sparse_ofa.outliers import outlier_layers, static_vs_dynamic_error
    from sparse_ofa.pruning import GMPSchedule, Pruner
    from sparse_ofa.qat import QATConfig, convert_qat, prepare_qat
    from sparse_ofa.sparsify import is_encoder_linear

    load = os.getloadavg()[0]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = DemoConfig(steps=args.steps, threads=args.threads, save_student=False,
                     **{k: _value(v) for k, v in overrides.items()})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start, cpu0 = time.perf_counter(), time.process_time()
    teacher, tokenizer = load_minilm()
    for p in teacher.parameters():
        p.requires_grad_(False)
    corpus = _corpus(cfg, print)
    train, _ = sample_split(corpus["pool"], cfg.n_train, cfg.n_heldout, seed=cfg.seed)
    student = copy.deepcopy(teacher)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith("embeddings."))
    ramp = max(1, round(cfg.ramp_fraction * cfg.steps))
    schedule = GMPSchedule(cfg.sparsity, 0.0, start_step=0, ramp_steps=min(ramp, cfg.steps - 1),
                           update_every=cfg.update_every)
    pruner = Pruner(student, schedule, pattern=cfg.pattern, filter_fn=is_encoder_linear)
    cache = None
    if cfg.layerwise_weight == 0 and cfg.attention_weight == 0:
        cache = TeacherCache(teacher, tokenizer, train, cfg.max_length, cfg.bf16)
    history: list[dict] = []
    with tqdm(total=cfg.steps + (cfg.qat_steps if args.qat else 0), mininterval=30) as bar:
        _train(student, teacher, tokenizer, train, cfg, cfg.steps, cfg.lr, pruner.apply_masks, bar, "prune",
               pruner=pruner, history=history, bf16=cfg.bf16, teacher_cache=cache)
        del cache
        pruner.remove_hooks()
        train_s = time.perf_counter() - start
        fp32 = copy.deepcopy(student).eval()
        if args.save:
            fp32.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
        models = {"prune_ofa_fp32": fp32}
        if args.qat:
            lock = PatternLock(student, filter_fn=is_encoder_linear)
            prepare_qat(student, QATConfig(), filter_fn=is_encoder_linear)
            _train(student, teacher, tokenizer, train, cfg, cfg.qat_steps, cfg.qat_lr, lock.apply, bar, "qat",
                   history=history, observe=True)
            _set_observers_training(student, False)
            lock.remove_hooks()
            calibration = [dict(tokenizer(train[i:i + 32], padding=True, truncation=True, max_length=cfg.max_length,
                                          return_tensors="pt")) for i in range(0, min(len(train), 256), 32)]
            dynamic = outlier_layers(static_vs_dynamic_error(student, calibration))
            convert_qat(student, dynamic=dynamic)
            models["prune_ofa_sparse_int8"] = student.eval()
    if args.oneshot:
        oneshot = copy.deepcopy(teacher)
        magnitude_prune_(oneshot, cfg.sparsity, cfg.pattern)
        models["oneshot_sparse_int8"] = sparsify(oneshot)
    pairs = load_stsb("validation", cfg.stsb)
    scores = {name: round(stsb_spearman(m, tokenizer, pairs), 2) for name, m in models.items()}
    last = [h for h in history if h["phase"] == "prune"][-50:]
    row = {"tag": args.tag, "steps": cfg.steps, "overrides": overrides, "stsb_dev_x100": scores,
           "train_batch_cosine_last50": round(sum(h["batch_cosine"] for h in last) / max(1, len(last)), 4),
           "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1),
           "cpu_s": round(time.process_time() - cpu0, 1), "threads": cfg.threads, "bf16": cfg.bf16,
           "load_at_start": round(load, 2), "corpus": corpus["source"], "n_train": len(train),
           "cpu_flags": _cpu_flags(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(row))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def _cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags)


if __name__ == "__main__":
    main()
