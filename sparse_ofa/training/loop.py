"""A plain PyTorch loop for Prune OFA: GMP pruning or pattern lock, knowledge distillation, QAT, DDP,
and checkpoints that resume exactly. The one loop of the package: `sparse-ofa demo` trains through it
(its own loss, LR schedule and history via loss_fn / scheduler / on_step), and so do `sparse-ofa
prune | finetune | quantize` (through `train_with_adamw`, at the end of this module).

    pruner = Pruner(student, GMPSchedule(0.9, ramp_steps=..., update_every=...), pattern="1x4")
    result = train_prune_ofa(student, teacher, loader, optimizer=opt, scheduler=sched, pruner=pruner,
                             steps=N, checkpoint_dir="ckpt", checkpoint_every=500, resume=True)

One step (`step` = optimizer steps already taken, 0-based):
    pruner.step(step, optimizer, scheduler)    # mask update at the schedule's update steps
    loss = loss_fn(student, teacher, batch, distill)      # default: DistillLoss on both outputs
    backward (pruned weights get zero grad) -> clip (max_grad_norm) -> optimizer.step() -> scheduler.step()
    pruner.apply_masks(); lock.apply()          # pruned weights back to exactly 0
    on_step(StepInfo(step, loss, lr))           # optional: progress reports, histories
    checkpoint every `checkpoint_every` steps and after the last step

Batches: a re-iterable of dicts of tensors (a list, a DataLoader); it is re-iterated for each epoch
(calling `sampler.set_epoch(epoch)` when the sampler has it, as DistributedSampler needs) and every
value is moved to the student's device. The default loss feeds the whole batch to the student (labels
give the hard loss) and the batch without label keys to the teacher, in eval mode and no_grad.

Checkpoints: `checkpoint_dir/step-00000123/` holds state.pt (step, student state_dict, optimizer, LR
scheduler, pruner/lock masks, written by rank 0, last, so its presence marks a complete checkpoint) and
rng-rank<r>.pt per rank (torch CPU + CUDA, numpy and Python RNG states). Resume (resume=True: the latest
checkpoint in checkpoint_dir, or none; resume=<path>: that one) loads the state, replays the batch
stream up to the saved step without running the model, then restores the RNG states, so a resumed run
takes exactly the steps the uninterrupted run would have. That holds when the batch order is a function
of the data and its own seeded generator (a list; a DataLoader with `generator=` and num_workers=0, or
a DistributedSampler) — a DataLoader that shuffles from the global RNG re-shuffles differently when
resumed mid-epoch. Checkpoint files hold tensors and plain data only (dicts, lists, tuples, numbers,
strings, None; the numpy RNG state is stored as a tensor) and are read with torch.load(weights_only=True):
a file that needs any other class to unpickle is refused with ValueError before anything is loaded, so
resuming from someone else's checkpoint cannot run their code. `extra` must be plain data too.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .ddp import barrier, is_main_process, rank, unwrap
from .distill import DistillLoss, check_teacher_student, output_field
from .qat import FakeQuantLinear

LABEL_KEYS = ("labels", "next_sentence_label", "start_positions", "end_positions")
_CHECKPOINT = re.compile(r"^step-(\d+)$")

LossFn = Callable[[nn.Module, "nn.Module | None", dict, "DistillLoss | None"], torch.Tensor]


@dataclass
class TrainResult:
    step: int                                   # optimizer steps taken in total
    losses: list[float] = field(default_factory=list)   # one per step run by this call
    last_checkpoint: Path | None = None


@dataclass(frozen=True)
class StepInfo:
    """What `on_step` hears after each optimizer step."""
    step: int          # 0-based index of the step just taken
    loss: float
    lr: float          # the learning rate this step used (first param group)


def default_loss(student: nn.Module, teacher: nn.Module | None, batch: dict,
                 distill: DistillLoss | None) -> torch.Tensor:
    """Student forward on the batch; with a teacher, distill(student_out, teacher_out, out.loss, mask)."""
    out = student(**batch)
    if teacher is None or distill is None:
        loss = output_field(out, "loss")
        if loss is None:
            raise ValueError("the student returned no loss: give the batches labels, or a teacher to distill from")
        return loss
    with torch.no_grad():
        teacher_out = teacher(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    return distill(out, teacher_out, output_field(out, "loss"), batch.get("attention_mask"))


def _to_device(batch, device):
    if not isinstance(batch, dict):
        raise TypeError(f"each batch must be a dict of tensors (model keyword arguments), got {type(batch).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_stream(batches: Iterable, skip: int = 0) -> Iterator:
    """Endless iterator over `batches`, epoch after epoch, with the first `skip` batches consumed now."""
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list or DataLoader), not a one-shot iterator or "
                        "generator: the loop needs to run several epochs and to replay them on resume")

    def endless():
        epoch = 0
        while True:
            sampler = getattr(batches, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            empty = True
            for batch in batches:
                empty = False
                yield batch
            if empty:
                raise ValueError("batches is empty: there is nothing to train on")
            epoch += 1

    stream = endless()
    for _ in range(skip):
        next(stream)
    return stream


# ---------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # keys as a tensor: a numpy array would need numpy's classes to unpickle (weights_only refuses)
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))


def safe_load(path, what: str, **kwargs):
    """torch.load(path, weights_only=True): tensors and plain data only. A file that needs other
    classes to unpickle (code could run) is refused with ValueError naming it and what it holds."""
    import pickle

    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise ValueError(f"refusing to load {what} {path}: it holds objects other than tensors and plain data "
                         f"(loading them would run code from the file; sparse_ofa writes none). torch says: "
                         f"{detail.strip()}") from None


# ---------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir) -> Path | None:
    """The complete checkpoint (state.pt present) with the highest step, or None."""
    root = Path(checkpoint_dir)
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _CHECKPOINT.match(p.name))
             and (p / "state.pt").exists()] if root.is_dir() else []
    return max(found)[1] if found else None


def save_checkpoint(checkpoint_dir, *, step: int, student: nn.Module, optimizer=None, scheduler=None,
                    pruner=None, lock=None, extra: dict | None = None) -> Path:
    """Write checkpoint_dir/step-<step>/ (see the module docstring); every rank must call it."""
    path = Path(checkpoint_dir) / f"step-{step:08d}"
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng-rank{rank()}.pt")
    barrier()
    if is_main_process():
        state = {"step": step, "model": unwrap(student).state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "pruner": pruner.state_dict() if pruner is not None else None,
                 "lock": lock.state_dict() if lock is not None else None, "extra": extra or {}}
        tmp = path / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(path / "state.pt")  # atomic: a half-written checkpoint is never "complete"
    barrier()
    return path


def load_checkpoint(path, *, student: nn.Module, optimizer=None, scheduler=None, pruner=None, lock=None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint into the given objects; returns
    {"step", "extra", "rng"} (rng: this rank's RNG states, restored now if restore_rng)."""
    path = Path(path)
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{path} is not a complete sparse_ofa checkpoint (no state.pt)")
    device = next(unwrap(student).parameters()).device
    state = safe_load(path / "state.pt", "checkpoint", map_location=device)
    unwrap(student).load_state_dict(state["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("pruner", pruner), ("lock", lock)):
        if target is None:
            continue
        if state[name] is None:
            raise ValueError(f"checkpoint {path} holds no {name} state, but a {name} was passed to resume")
        target.load_state_dict(state[name])
    rng_file = path / f"rng-rank{rank()}.pt"
    rng = safe_load(rng_file, "RNG state") if rng_file.exists() else None
    if restore_rng and rng is not None:
        set_rng_state(rng)
    return {"step": state["step"], "extra": state["extra"], "rng": rng}


# ---------------------------------------------------------------------------------- the loop
def train_prune_ofa(student: nn.Module, teacher: nn.Module | None, batches: Iterable, *,
                    optimizer: torch.optim.Optimizer, scheduler=None, pruner=None, lock=None,
                    distill: DistillLoss | None = None, steps: int, checkpoint_dir=None,
                    checkpoint_every: int | None = None, resume=False, progress: bool = True,
                    loss_fn: LossFn | None = None, max_grad_norm: float | None = None,
                    check_models: bool = True, description: str = "prune-ofa", dropout: bool = True,
                    on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
    """Train `student` for `steps` optimizer steps in total (see the module docstring).

    student may be wrapped in DistributedDataParallel; teacher (None: no distillation) is put in eval
    mode. distill defaults to DistillLoss() (0.5 hard + 0.5 T=2 soft) when a teacher is given. A teacher
    that can't teach the student (vocabulary, head, size) raises before any step (check_models=False
    skips it). dropout=False trains the student in eval mode (no dropout: a student that imitates a
    deterministic teacher learns better without it) with only the QAT observers (FakeQuantLinear) in
    train mode, where they learn activation ranges. on_step(StepInfo) runs after every step (the pruned
    weights already zero): progress reports, histories. Returns TrainResult(step, losses, last_checkpoint).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every / resume need a checkpoint_dir")
    if pruner is not None and lock is not None:
        raise ValueError("pass a pruner (pre-training) or a lock (fine-tuning), not both")
    if teacher is not None:
        if check_models and hasattr(teacher, "config"):
            check_teacher_student(unwrap(teacher), unwrap(student))
        teacher.eval()
        distill = distill or DistillLoss()
    loss_fn = loss_fn or default_loss
    device = next(unwrap(student).parameters()).device

    start, rng = 0, None
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(checkpoint_dir) if resume is True else Path(resume)
        if resume is not True and not (resume_from / "state.pt").exists():
            raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint there (no state.pt)")
    if resume_from is not None:
        info = load_checkpoint(resume_from, student=student, optimizer=optimizer, scheduler=scheduler,
                               pruner=pruner, lock=lock, restore_rng=False)
        start, rng = info["step"], info["rng"]
    stream = batch_stream(batches, skip=start)
    if rng is not None:  # after the replay, which may have drawn random numbers (e.g. MLM masking)
        set_rng_state(rng)

    result = TrainResult(step=start)
    bar = None
    if progress and is_main_process() and steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=description, dynamic_ncols=True)
    if dropout:
        student.train()
    else:
        student.eval()
        for module in student.modules():
            if isinstance(module, FakeQuantLinear):
                module.train()
    for step in range(start, steps):
        if pruner is not None:
            pruner.step(step, optimizer, scheduler)
        batch = _to_device(next(stream), device)
        loss = loss_fn(student, teacher, batch, distill)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if pruner is not None:
            pruner.apply_masks()
        if lock is not None:
            lock.apply()
        result.losses.append(float(loss.detach()))
        result.step = step + 1
        if on_step is not None:
            on_step(StepInfo(step=step, loss=result.losses[-1], lr=step_lr))
        if bar is not None:
            postfix = {"loss": f"{result.losses[-1]:.4f}"}
            if pruner is not None:
                postfix["sparsity"] = f"{pruner.current_sparsity:.1%}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        due = checkpoint_every is not None and result.step % checkpoint_every == 0
        if checkpoint_dir is not None and (due or result.step == steps):
            result.last_checkpoint = save_checkpoint(checkpoint_dir, step=result.step, student=student,
                                                     optimizer=optimizer, scheduler=scheduler,
                                                     pruner=pruner, lock=lock)
    if bar is not None:
        bar.close()
    return result



@dataclass(frozen=True)
class TrainOptions:
    """How `train_with_adamw` trains: `steps` optimizer steps of AdamW at peak `lr` (weight decay 0.01
    on matrices) with linear warm-up over `warmup_steps`, then linear decay to 0; checkpoints in
    `checkpoint_dir` every `checkpoint_every` steps and at the end (None: none), `resume` from the
    latest one there; a progress bar named `description` if `progress`."""
    steps: int
    lr: float
    warmup_steps: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = True
    description: str = "prune-ofa"


def train_with_adamw(student: nn.Module, teacher: nn.Module | None, batches: Iterable, options: TrainOptions,
                     **loop_kwargs) -> TrainResult:
    """train_prune_ofa with the optimizer and schedule of `options`, on this process's device: student
    and teacher move there, and under torchrun the student trains wrapped in DistributedDataParallel
    (`batches` must already hold this rank's share: ddp.sharded_loader). loop_kwargs: the pruner or
    lock, distill, loss_fn ... of train_prune_ofa."""
    from .ddp import to_training_device, wrap_ddp
    from .optim import adamw, warmup_linear_decay

    device = to_training_device(teacher)
    optimizer = adamw(student, options.lr, weight_decay=0.01)  # the same Parameters DDP wraps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(options.warmup_steps, options.steps))
    student = wrap_ddp(student, device)
    return train_prune_ofa(student, teacher, batches, optimizer=optimizer, scheduler=scheduler, steps=options.steps,
                           checkpoint_dir=options.checkpoint_dir, checkpoint_every=options.checkpoint_every,
                           resume=options.resume, progress=options.progress, description=options.description,
                           **loop_kwargs)

__all__ = ["LABEL_KEYS", "StepInfo", "TrainResult", "batch_stream", "default_loss", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint", "train_prune_ofa", "train_with_adamw", "TrainOptions"]
