"""`sparse-ofa demo`: the real all-MiniLM-L6-v2, dense and one-shot magnitude-pruned, swapped to
sparse INT8 with sparsify(); reports embedding cosine to fp32 and time per batch."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="sparsify the real all-MiniLM-L6-v2 and compare it with fp32")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pattern", choices=["unstructured", "1x4"], default="unstructured")
    p.add_argument("--sentences", type=int, default=128)
    p.add_argument("--output", default="sparse_ofa_out/demo", help="folder for report.json")
    p.set_defaults(func=run)


def _time_embed(model, tokenizer, sentences) -> tuple[torch.Tensor, float]:
    from ..minilm import embed

    embed(model, tokenizer, sentences[:8])  # warm-up
    start = time.perf_counter()
    out = embed(model, tokenizer, sentences)
    return out, time.perf_counter() - start


def run(args) -> int:
    import copy

    from .. import magnitude_prune_, sparsify
    from ..corpus import sample_sentences
    from ..minilm import load_minilm

    model, tokenizer = load_minilm()
    sentences = sample_sentences(args.sentences)
    rows = {}
    for label, sparsity in (("dense", 0.0), (f"{args.sparsity:.0%} sparse (one-shot)", args.sparsity)):
        fp32 = copy.deepcopy(model)
        if sparsity:
            magnitude_prune_(fp32, sparsity, args.pattern)
        int8 = sparsify(copy.deepcopy(fp32))
        ref, t_fp32 = _time_embed(fp32, tokenizer, sentences)
        got, t_int8 = _time_embed(int8, tokenizer, sentences)
        cos = torch.nn.functional.cosine_similarity(ref, got).mean().item()
        rows[label] = {"cosine_to_fp32": cos, "fp32_s": t_fp32, "sparse_int8_s": t_int8}
        print(f"{label:<28} INT8 vs its fp32 model: mean cosine {cos:.4f}; "
              f"{len(sentences)} sentences fp32 {t_fp32:.2f}s, sparse INT8 {t_int8:.2f}s")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    print(f"report: {out / 'report.json'}")
    return 0
