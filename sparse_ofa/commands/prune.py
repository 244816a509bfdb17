"""`sparse-ofa prune TEACHER OUTPUT --data TEXT`: Prune OFA pre-training, teacher -> sparse student.

The student is a copy of the teacher. GMP (Zhu & Gupta, per-layer magnitude thresholds) prunes every
encoder Linear + the pooler while the student learns from MLM (hard loss) and the teacher's MLM
logits (T^2 KL over non-padding tokens); a *ForPreTraining teacher adds next-sentence prediction on
sentence pairs cut from the documents (hard NSP loss + KL on the NSP logits), as BERT pre-trains.
A teacher without an MLM head (a sentence encoder such as all-MiniLM-L6-v2) runs the sentence-encoder
recipe of `sparse-ofa demo` (sparse_ofa.training.encoder_recipe: hidden-state distillation, frozen
embeddings, no dropout, an LR that follows the sparsity target) for any budget; `--data general` is
the general-domain English the demo distills on. OUTPUT is an ordinary Hugging Face folder (zeros in
the weights) + tokenizer + run_config.json + sparsity_report.txt, loadable with transformers'
from_pretrained.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from . import _shared


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="Prune OFA: GMP + distillation, teacher -> sparse pre-trained student",
                       description=__doc__.split("\n\n")[1],
                       epilog="defaults that depend on the objective: mlm / mlm+nsp: --lr 1e-4 --steps 1000 "
                              "--max-length 128 --warmup-steps 0; embedding: --lr 2e-3 --steps 2500 --max-length 64 "
                              "--warmup-steps 10 (the demo's recipe; docs/evaluation.md has its STS-B curve "
                              "over budgets)")
    p.add_argument("teacher", help="local model folder (save_pretrained), e.g. a BERT with its MLM head")
    p.add_argument("output", help="folder for the sparse student")
    p.add_argument("--data", required=True, help="text: .txt (one document per line), .jsonl/.json/.csv, "
                   "a folder of .txt, a save_to_disk folder, a dataset name in the offline datasets cache, "
                   "or 'general': the Rotten Tomatoes train snippets + STS-B train sentences (where installed)")
    p.add_argument("--stsb", default=None, metavar="DIR", help="with --data general: the STS-B folder whose "
                   "train sentences are used (default ../shared/data/stsb, else the datasets cache)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--dataset-config", default=None, help="config of a cached dataset, e.g. wikitext-103-raw-v1")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    p.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of every pruned layer")
    p.add_argument("--initial-sparsity", type=float, default=0.0)
    p.add_argument("--pattern", choices=["unstructured", "1x4", "2:4"], default="unstructured")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--ramp-steps", type=int, default=None, help="GMP ramp length (default: half of --steps; "
                   "embedding objective: 85 %% of them)")
    p.add_argument("--update-every", type=int, default=None, help="mask update interval (default: ramp/10; "
                   "embedding objective: --steps/80)")
    p.add_argument("--end-step", type=int, default=None, help="last mask update (default: end of the ramp)")
    p.add_argument("--rewind-lr", action="store_true", help="rewind the LR at each pruning step of the ramp")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--objective", choices=["auto", "mlm", "mlm+nsp", "embedding"], default="auto",
                   help="mlm: MLM + logit KD; mlm+nsp: BERT's pre-training (MLM + next-sentence "
                        "prediction on sentence pairs) with KD on both heads; embedding: hidden-state "
                        "distillation (auto: mlm+nsp for a *ForPreTraining teacher, mlm for *ForMaskedLM, "
                        "else embedding)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="embedding objective: forwards under bf16 autocast (default: on a CPU with AVX-512 "
                        "BF16 or a GPU with bf16; the weights, masks and loss stay fp32)")
    p.add_argument("--lr-schedule", choices=["sparsity", "flat"], default="sparsity",
                   help="embedding objective: 'sparsity' lets the LR follow the GMP target during the ramp "
                        "(gentle while little is pruned), 'flat' keeps it at --lr after the warm-up")
    p.add_argument("--teacher-cache-gb", type=float, default=8.0,
                   help="embedding objective: cache the teacher's hidden states of every sentence when they take "
                        "at most this much memory (float32), else run the teacher on every step (default 8)")
    _shared.add_common_training_args(p, lr=None, steps=None)
    p.set_defaults(func=run, max_length=None, warmup_steps=None)


# flags whose defaults depend on the objective: (MLM objectives, embedding objective)
OBJECTIVE_DEFAULTS = {"lr": (1e-4, 2e-3), "steps": (1000, 2500), "max_length": (128, 64), "warmup_steps": (0, 10)}


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
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining

    from ..tasks.data import mlm_collator, nsp_pairs, tokenize_pairs, tokenize_texts
    from ..training.distill import DistillLoss, check_teacher_student
    from ..training.ddp import sharded_loader, to_training_device
    from ..training.loop import train_with_adamw
    from ..training.pruning import Pruner

    # everything that can be wrong is checked before the first step
    teacher_dir = _shared.model_dir(args.teacher, "teacher")
    objective = _objective(AutoConfig.from_pretrained(teacher_dir, local_files_only=True), args.objective)
    _resolve_defaults(args, objective)
    _shared.check_training_args(args)
    output = Path(args.output)
    if objective == "embedding":
        return _run_encoder_recipe(args, teacher_dir, output)
    schedule = _schedule(args)
    options = _shared.train_options(args, output, "prune")
    tokenizer = _shared.load_tokenizer(teacher_dir)
    texts = _texts(args)
    torch.manual_seed(args.seed)
    model_cls = AutoModelForPreTraining if objective == "mlm+nsp" else AutoModelForMaskedLM
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
    mlm = mlm_collator(tokenizer, args.mlm_probability)
    collate = lambda feats: dict(mlm(feats))  # noqa: E731 - the loop wants a plain dict
    distill = DistillLoss(args.w_hard, args.w_soft, args.temperature)
    loader = sharded_loader(features, collate, args.batch_size, args.seed)
    output.mkdir(parents=True, exist_ok=True)
    print(f"prune: {len(texts)} documents, objective {objective}, {len(pruner.layers)} layers -> "
          f"{args.sparsity:.0%} {args.pattern} over steps {schedule.start_step}..{schedule.ramp_end} "
          f"(masks every {schedule.update_every})")
    result = train_with_adamw(student, teacher, loader, options, pruner=pruner, distill=distill)
    pruner.remove_hooks()
    return _save(student, tokenizer, output, args, objective, schedule, steps_done=result.step,
                 final_loss=result.losses[-1] if result.losses else None)


def _texts(args) -> list[str]:
    from ..tasks.data import load_text

    if args.data == "general" and not Path(args.data).exists():
        from ..tasks.corpus import general_sentences

        sentences, used = general_sentences(args.stsb, log=print)
        print(f"--data general: {len(sentences)} sentences from {' + '.join(used)}")
        return list(sentences[:args.max_docs] if args.max_docs else sentences)
    return load_text(args.data, text_column=args.text_column, config=args.dataset_config, max_docs=args.max_docs)


def _resolve_defaults(args, objective: str) -> None:
    """Fill the flags left at None with the objective's defaults (OBJECTIVE_DEFAULTS)."""
    column = 1 if objective == "embedding" else 0
    default_warmup = args.warmup_steps is None
    for name, defaults in OBJECTIVE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[column])
    if default_warmup and column == 1:  # the recipe warms up over at most a tenth of a short run
        args.warmup_steps = min(args.warmup_steps, max(1, args.steps // 10)) if args.steps > 1 else 0


def _run_encoder_recipe(args, teacher_dir: Path, output: Path) -> int:
    """--objective embedding: sparse_ofa.training.encoder_recipe for args.steps on the texts of --data."""
    import torch
    from transformers import AutoModel

    from ..training.ddp import to_training_device
    from ..training.encoder_recipe import EncoderRecipe, cpu_has_bf16, prune_encoder

    ignored = [flag for flag, value, default in (("--start-step", args.start_step, 0),
                                                  ("--initial-sparsity", args.initial_sparsity, 0.0),
                                                  ("--end-step", args.end_step, None), ("--rewind-lr", args.rewind_lr, False))
               if value != default]
    if ignored:
        raise ValueError(f"{', '.join(ignored)}: not used by the embedding objective (its GMP ramp runs from step 0 "
                         "and 0 % sparsity to the end of --ramp-steps); drop them or pick an MLM objective")
    if args.ramp_steps is not None and not 0 < args.ramp_steps <= args.steps:
        raise ValueError(f"--ramp-steps must be in [1, --steps], got {args.ramp_steps}")
    tokenizer = _shared.load_tokenizer(teacher_dir)
    texts = _texts(args)
    torch.manual_seed(args.seed)
    teacher = AutoModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    device = to_training_device(teacher)
    bf16 = args.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    recipe = EncoderRecipe(steps=args.steps, ramp_fraction=(args.ramp_steps or 0.85 * args.steps) / args.steps,
                           update_every=args.update_every, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, max_length=args.max_length,
                           bf16=bf16, seed=args.seed, cache_limit_gb=args.teacher_cache_gb)
    schedule = recipe.gmp_schedule(args.sparsity)
    options = _shared.train_options(args, output, "prune")
    output.mkdir(parents=True, exist_ok=True)
    print(f"prune: {len(texts)} sentences, objective embedding (the sentence-encoder recipe), {args.sparsity:.0%} "
          f"{args.pattern} over steps 0..{schedule.ramp_end} (masks every {schedule.update_every}), "
          f"peak lr {args.lr:g}, bf16 {'on' if bf16 else 'off'}")
    losses: list[float] = []
    student = prune_encoder(teacher, tokenizer, texts, recipe, args.sparsity, args.pattern,
                            on_step=lambda info, metrics: losses.append(info.loss), log=print,
                            progress=options.progress, description=options.description,
                            checkpoint_dir=options.checkpoint_dir, checkpoint_every=options.checkpoint_every,
                            resume=options.resume)
    return _save(student, tokenizer, output, args, "embedding", schedule, steps_done=args.steps,
                 final_loss=losses[-1] if losses else None, recipe=recipe.__dict__)


def _save(student, tokenizer, output: Path, args, objective: str, schedule, **results) -> int:
    """The student, its tokenizer, sparsity_report.txt and run_config.json in OUTPUT (rank 0 only)."""
    from ..training.ddp import is_main_process
    from ..training.lock import format_report
    from ..training.pruning import weight_sparsity

    if not is_main_process():  # under torchrun rank 0 alone writes the outputs
        return 0
    student.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = weight_sparsity(student)
    text = format_report(report, args.sparsity)
    (output / "sparsity_report.txt").write_text(text + "\n")
    print(text)
    _shared.write_run_config(output, "prune", args, device=next(student.parameters()).device, objective=objective,
                             layer_sparsity=report, schedule=json.loads(json.dumps(schedule.__dict__)), **results)
    print(f"saved the sparse student to {output}")
    return 0

