"""`sparse-ofa prune TEACHER OUTPUT --data TEXT`: Prune OFA pre-training, teacher -> sparse student.

The student is a copy of the teacher. GMP (Zhu & Gupta, per-layer magnitude thresholds) prunes every
encoder Linear + the pooler while the student learns from MLM (hard loss) and the teacher's MLM
logits (T^2 KL over non-padding tokens); a *ForPreTraining teacher adds next-sentence prediction on
sentence pairs cut from the documents (hard NSP loss + KL on the NSP logits), as BERT pre-trains. A teacher without an MLM head (a sentence encoder such as
all-MiniLM-L6-v2) is distilled on hidden states instead (pooled cosine + per-layer MSE). OUTPUT is an
ordinary Hugging Face folder (zeros in the weights) + tokenizer + run_config.json +
sparsity_report.txt, loadable with transformers' from_pretrained.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from . import _shared


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="Prune OFA: GMP + distillation, teacher -> sparse pre-trained student",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("teacher", help="local model folder (save_pretrained), e.g. a BERT with its MLM head")
    p.add_argument("output", help="folder for the sparse student")
    p.add_argument("--data", required=True, help="text: .txt (one document per line), .jsonl/.json/.csv, "
                   "a folder of .txt, a save_to_disk folder, or a dataset name in the offline datasets cache")
    p.add_argument("--text-column", default="text")
    p.add_argument("--dataset-config", default=None, help="config of a cached dataset, e.g. wikitext-103-raw-v1")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of every pruned layer")
    p.add_argument("--initial-sparsity", type=float, default=0.0)
    p.add_argument("--pattern", choices=["unstructured", "1x4", "2:4"], default="unstructured")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--ramp-steps", type=int, default=None, help="GMP ramp length (default: half of --steps)")
    p.add_argument("--update-every", type=int, default=None, help="mask update interval (default: ramp/10)")
    p.add_argument("--end-step", type=int, default=None, help="last mask update (default: end of the ramp)")
    p.add_argument("--rewind-lr", action="store_true", help="rewind the LR at each pruning step of the ramp")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--objective", choices=["auto", "mlm", "mlm+nsp", "embedding"], default="auto",
                   help="mlm: MLM + logit KD; mlm+nsp: BERT's pre-training (MLM + next-sentence "
                        "prediction on sentence pairs) with KD on both heads; embedding: hidden-state "
                        "distillation (auto: mlm+nsp for a *ForPreTraining teacher, mlm for *ForMaskedLM, "
                        "else embedding)")
    _shared.add_common_training_args(p, lr=1e-4, steps=1000)
    p.set_defaults(func=run)


def _objective(config, requested: str) -> str:
    if requested != "auto":
        return requested
    heads = " ".join(getattr(config, "architectures", None) or [])
    if "ForPreTraining" in heads:
        return "mlm+nsp"
    return "mlm" if "ForMaskedLM" in heads else "embedding"


def _schedule(args):
    from ..training.pruning import GMPSchedule

    ramp = args.ramp_steps if args.ramp_steps is not None else max(1, args.steps // 2)
    every = args.update_every if args.update_every is not None else max(1, ramp // 10)
    if args.start_step + ramp > args.steps:
        raise ValueError(f"the GMP ramp ends at step {args.start_step + ramp}, after the last step "
                         f"{args.steps}: lower --ramp-steps/--start-step or raise --steps")
    return GMPSchedule(args.sparsity, args.initial_sparsity, start_step=args.start_step, ramp_steps=ramp,
                       update_every=every, end_step=args.end_step)


def run(args) -> int:
    _shared.offline()
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining

    from ..tasks.data import load_text, mlm_collator, nsp_pairs, tokenize_pairs, tokenize_texts
    from ..training.distill import DistillLoss, HiddenStateDistillation, check_teacher_student
    from ..training.ddp import is_main_process, sharded_loader, to_training_device
    from ..training.lock import format_report
    from ..training.loop import train_with_adamw
    from ..training.pruning import Pruner, weight_sparsity

    # everything that can be wrong is checked before the first step
    _shared.check_training_args(args)
    schedule = _schedule(args)
    output = Path(args.output)
    options = _shared.train_options(args, output, "prune")
    teacher_dir = _shared.model_dir(args.teacher, "teacher")
    tokenizer = _shared.load_tokenizer(teacher_dir)
    objective = _objective(AutoConfig.from_pretrained(teacher_dir, local_files_only=True), args.objective)
    texts = load_text(args.data, text_column=args.text_column, config=args.dataset_config, max_docs=args.max_docs)
    torch.manual_seed(args.seed)
    model_cls = {"mlm": AutoModelForMaskedLM, "mlm+nsp": AutoModelForPreTraining}.get(objective, AutoModel)
    teacher = model_cls.from_pretrained(teacher_dir, local_files_only=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    check_teacher_student(teacher, student)
    to_training_device(teacher, student)  # masks are built where the weights train
    pruner = Pruner(student, schedule, pattern=args.pattern, rewind_lr=args.rewind_lr)
    if objective == "mlm+nsp":  # sentence pairs, half of them "NotNext" (seeded)
        features = tokenize_pairs(nsp_pairs(texts, seed=args.seed), tokenizer, args.max_length)
    else:
        features = tokenize_texts(texts, tokenizer, args.max_length)
    if objective in ("mlm", "mlm+nsp"):
        mlm = mlm_collator(tokenizer, args.mlm_probability)
        collate = lambda feats: dict(mlm(feats))  # noqa: E731 - the loop wants a plain dict
        distill, loss_fn = DistillLoss(args.w_hard, args.w_soft, args.temperature), None
    else:
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        collate = lambda feats: dict(pad([{k: v for k, v in f.items() if k != "special_tokens_mask"}
                                          for f in feats]))  # noqa: E731
        distill, loss_fn = None, HiddenStateDistillation(hidden_weight=1.0)
    loader = sharded_loader(features, collate, args.batch_size, args.seed)
    output.mkdir(parents=True, exist_ok=True)
    print(f"prune: {len(texts)} documents, objective {objective}, {len(pruner.layers)} layers -> "
          f"{args.sparsity:.0%} {args.pattern} over steps {schedule.start_step}..{schedule.ramp_end} "
          f"(masks every {schedule.update_every})")
    result = train_with_adamw(student, teacher, loader, options, pruner=pruner, distill=distill, loss_fn=loss_fn)
    pruner.remove_hooks()
    if not is_main_process():  # under torchrun rank 0 alone writes the outputs
        return 0
    student.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = weight_sparsity(student)
    text = format_report(report, args.sparsity)
    (output / "sparsity_report.txt").write_text(text + "\n")
    print(text)
    _shared.write_run_config(output, "prune", args,
                             device=next(student.parameters()).device, objective=objective, steps_done=result.step,
                             final_loss=result.losses[-1] if result.losses else None,
                             layer_sparsity=report, schedule=json.loads(json.dumps(schedule.__dict__)))
    print(f"saved the sparse student to {output}")
    return 0

