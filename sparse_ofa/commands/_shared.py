"""What the training subcommands (prune, finetune, quantize) share on the command side: their common
flags and checks, turning them into TrainOptions, local model folders and tokenizers, the process
group under torchrun, and the run config written beside the outputs. The training itself is
sparse_ofa.training; task data, heads and metrics are sparse_ofa.tasks."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

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


def add_common_training_args(p, *, lr: float | None, steps: int | None) -> None:
    """The flags every training command takes; lr / steps None: the command resolves them (per objective)."""
    p.add_argument("--steps", type=int, default=steps,
                   help=f"optimizer steps (default {steps if steps is not None else 'per objective, see above'})")
    p.add_argument("--lr", type=float, default=lr,
                   help=f"AdamW learning rate (default {lr if lr is not None else 'per objective, see above'})")
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


def train_options(args, output: Path, description: str):
    """The TrainOptions that add_common_training_args' flags ask for (checkpoints in OUTPUT/checkpoints)."""
    from ..training.loop import TrainOptions

    checkpoints = output / "checkpoints" if (args.checkpoint_every or args.resume) else None
    return TrainOptions(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, checkpoint_dir=checkpoints,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.no_progress,
                        description=description)


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
