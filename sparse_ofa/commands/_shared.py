"""Pieces the training subcommands (prune, finetune, quantize) share: loading local models, task
heads, batches, evaluation, the run config written beside the outputs."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

RUN_CONFIG = "run_config.json"


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_dir(path: str, what: str) -> Path:
    """A local save_pretrained folder, or a FileNotFoundError that says what was expected."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path!r} is not a local model folder (no config.json); give the "
                                "directory written by save_pretrained (nothing is downloaded)")
    return p


def load_tokenizer(path: Path, fallback: Path | None = None):
    from transformers import AutoTokenizer

    for candidate in (path, fallback):
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise FileNotFoundError(f"no tokenizer files in {path}" + (f" or {fallback}" if fallback else "")
                            + "; save one with tokenizer.save_pretrained(dir)")


def add_common_training_args(p, *, lr: float, steps: int) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (truncation)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--w-hard", type=float, default=0.5, help="weight of the task / MLM loss")
    p.add_argument("--w-soft", type=float, default=0.5, help="weight of the T^2 KL distillation loss")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in OUTPUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_training_args(args) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.max_length < 8:
        raise ValueError(f"--max-length must be >= 8, got {args.max_length}")
    if args.warmup_steps < 0 or args.warmup_steps >= max(args.steps, 1) and args.warmup_steps:
        raise ValueError(f"--warmup-steps must be in [0, --steps), got {args.warmup_steps}")


def optimizer_and_schedule(model: nn.Module, args):
    """AdamW (no decay on biases / LayerNorms) with linear warm-up then linear decay to zero."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup, total = args.warmup_steps, args.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def distributed():
    """Under torchrun / accelerate (WORLD_SIZE > 1): join the process group for the command (gloo on
    CPU, nccl on GPUs) and leave it afterwards. A single process joins nothing. Yields the device
    this process trains on (its GPU when CUDA is there, else the CPU)."""
    import torch.distributed as dist

    from ..training.ddp import is_distributed, setup_distributed

    joined = not is_distributed()
    device = setup_distributed()
    try:
        yield device
    finally:
        if joined and is_distributed():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes outputs and reports."""
    from ..training.ddp import is_main_process as main

    return main()


def to_training_device(*models) -> torch.device:
    """Move the models (None skipped) to this process's device: its GPU under torchrun, the GPU of a
    single process when CUDA is there, else the CPU. Call it before building masks from them."""
    from ..training.ddp import setup_distributed

    device = setup_distributed()
    for model in models:
        if model is not None:
            model.to(device)
    return device


def run_training(args, output: Path, description: str, student, teacher, loader, **loop_kwargs):
    """train_prune_ofa with the optimizer and the checkpoint / resume / progress flags that
    add_common_training_args defines; loop_kwargs carry the pruner or lock, distill, loss_fn.
    Student and teacher move to this process's device; under torchrun the student trains wrapped in
    DistributedDataParallel (the loader already holds this rank's share, see `batches`)."""
    from ..training.ddp import wrap_ddp
    from ..training.loop import train_prune_ofa

    device = to_training_device(teacher)
    optimizer, scheduler = optimizer_and_schedule(student, args)  # the same Parameters DDP wraps
    student = wrap_ddp(student, device)
    checkpoints = output / "checkpoints" if (args.checkpoint_every or args.resume) else None
    return train_prune_ofa(student, teacher, loader, optimizer=optimizer, scheduler=scheduler, steps=args.steps,
                           checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, progress=not args.no_progress, description=description,
                           **loop_kwargs)


def batches(features: list[dict], collate, batch_size: int, seed: int):
    """A re-iterable, seeded-shuffle DataLoader (train.py replays it exactly on resume). Under
    torchrun each rank takes its own share of the examples (every world_size-th one)."""
    from torch.utils.data import DataLoader

    from ..training.ddp import shard, world_size

    if not features:
        raise ValueError("no training examples")
    features = shard(features)
    if not features:
        raise ValueError(f"fewer training examples than the {world_size()} processes")
    return DataLoader(features, batch_size=batch_size, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed), num_workers=0)


def task_model_class(task: str):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task == "squad" else AutoModelForSequenceClassification


def load_task_model(path: Path, task: str, what: str):
    """A model with the task's head; a fresh head on a pre-trained encoder, named in a warning."""
    from ..tasks.data import glue_task

    cls = task_model_class(task)
    kwargs = {} if task == "squad" else {"num_labels": glue_task(task).num_labels}
    model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    if task != "squad" and model.config.num_labels != kwargs["num_labels"]:
        raise ValueError(f"{what} {path} has {model.config.num_labels} labels; {task} needs {kwargs['num_labels']}")
    return model


def task_features(task: str, examples: list[dict], tokenizer, max_length: int, train: bool) -> list[dict]:
    from ..tasks.data import glue_features, squad_features

    if task == "squad":
        return squad_features(examples, tokenizer, max_length=max_length, stride=max_length // 4, train=train)
    return glue_features(examples, tokenizer, max_length=max_length)


def task_collator(tokenizer):
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        model_keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")
        return dict(pad([{k: f[k] for k in model_keys if k in f} for f in features]))

    return collate


@torch.no_grad()
def evaluate(model: nn.Module, task: str, examples: list[dict], tokenizer, max_length: int,
             batch_size: int = 32) -> dict[str, float]:
    """The task's metrics (GLUE accuracy [+ F1 for qqp]; SQuAD exact_match / f1) on `examples`."""
    from ..tasks.data import squad_predictions
    from ..tasks.metrics import glue_metrics, squad_metrics

    model.eval()
    device = next(model.parameters()).device
    features = task_features(task, examples, tokenizer, max_length, train=False)
    collate = task_collator(tokenizer)
    outputs = []
    for i in range(0, len(features), batch_size):
        chunk = features[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if k != "labels"}
        with torch.inference_mode():
            out = model(**batch)
        outputs.append(out.__class__(**{k: v.cpu() for k, v in out.items()}))
    if task == "squad":
        starts = [row for out in outputs for row in out.start_logits]
        ends = [row for out in outputs for row in out.end_logits]
        preds = squad_predictions(examples, features, starts, ends)
        return squad_metrics(preds, {e["id"]: e["answers"]["text"] for e in examples})
    predictions = torch.cat([out.logits.argmax(-1) for out in outputs]).tolist()
    return glue_metrics(task, predictions, [e["label"] for e in examples])


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def write_run_config(output: Path, command: str, args, **results) -> Path:
    """run_config.json beside the outputs: the arguments, versions, and what the run measured."""
    import transformers

    from ..training.ddp import world_size

    config = {
        "command": f"sparse-ofa {command}",
        "argv": sys.argv[1:],
        "world_size": world_size(),  # processes that trained together (torchrun / accelerate)
        "device": str(results.pop("device", None)),  # where the student trained
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "versions": {"sparse_ofa": _version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **results,
    }
    path = output / RUN_CONFIG
    path.write_text(json.dumps(config, indent=2, default=str))
    return path


def _version() -> str:
    from .. import __version__

    return __version__
