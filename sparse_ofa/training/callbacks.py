"""Hugging Face Trainer integration: pruning and pattern-lock callbacks and a distillation Trainer.

    pruner = Pruner(model, GMPSchedule(0.9, ramp_steps=..., update_every=...))
    trainer = DistillationTrainer(model=model, args=args, train_dataset=ds, teacher=teacher,
                                  callbacks=[PruningCallback(pruner)])      # or PatternLockCallback(lock)
    trainer.train()

Importing this module imports transformers (sparse_ofa itself does not need it).
PruningCallback calls `pruner.step(state.global_step, optimizer, lr_scheduler)` at the start of every
optimizer step and `pruner.apply_masks()` right after `optimizer.step()`; it saves the pruner state as
`sparse_ofa_pruner.pt` inside every Trainer checkpoint and loads it back when the Trainer resumes
(from `args.resume_from_checkpoint` — DistillationTrainer.train sets it — or
`output_dir/checkpoint-<global_step>`); without that file the masks are rebuilt from the loaded
weights' zeros.
DistillationTrainer's training loss is DistillLoss(student_out, teacher_out, student_out.loss,
attention_mask); evaluation reports the student's own (hard) loss.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .distill import DistillLoss, check_teacher_student
from .lock import PatternLock
from .pruning import Pruner
from .loop import LABEL_KEYS, safe_load

PRUNER_STATE_FILE = "sparse_ofa_pruner.pt"


def _resumed_checkpoint(args, state) -> Path | None:
    if state.global_step == 0:
        return None
    candidates = []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(Path(args.resume_from_checkpoint))
    candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
    for path in candidates:
        if (path / PRUNER_STATE_FILE).exists():
            return path
    return None


class PruningCallback(TrainerCallback):
    """GMP inside a Trainer (see the module docstring)."""

    def __init__(self, pruner: Pruner):
        if not isinstance(pruner, Pruner):
            raise TypeError(f"PruningCallback needs a sparse_ofa Pruner, got {type(pruner).__name__}")
        self.pruner = pruner

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = _resumed_checkpoint(args, state)
        if checkpoint is not None:
            self.pruner.load_state_dict(safe_load(checkpoint / PRUNER_STATE_FILE, "pruner state"))
        elif state.global_step > 0:  # resumed without our file: the zeros of the loaded weights are the masks
            self.pruner.masks = {n: layer.weight.detach() != 0 for n, layer in self.pruner.layers.items()}
        self.pruner.apply_masks()

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.pruner.step(state.global_step, optimizer, lr_scheduler)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.apply_masks()  # idempotent; covers Trainer versions without on_optimizer_step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path.mkdir(parents=True, exist_ok=True)
            torch.save(self.pruner.state_dict(), path / PRUNER_STATE_FILE)


class PatternLockCallback(TrainerCallback):
    """Keep the zeros of a sparse model at zero while a Trainer fine-tunes it."""

    def __init__(self, lock: PatternLock):
        if not isinstance(lock, PatternLock):
            raise TypeError(f"PatternLockCallback needs a sparse_ofa PatternLock, got {type(lock).__name__}")
        self.lock = lock

    def on_train_begin(self, args, state, control, **kwargs):
        self.lock.apply()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.lock.apply()

    def on_step_end(self, args, state, control, **kwargs):
        self.lock.apply()


class DistillationTrainer(Trainer):
    """Trainer whose training loss distills `teacher` into the model (DistillLoss, default 0.5/0.5, T=2).

    The teacher is checked against the student (check_teacher_student) before training, moved to the
    training device and kept in eval mode; it never receives gradients."""

    def __init__(self, *args, teacher: torch.nn.Module, distill_loss: DistillLoss | None = None,
                 check_models: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if check_models:
            check_teacher_student(teacher, self.model)
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.distill_loss = distill_loss or DistillLoss()
        # our loss is a per-batch mean: let the Trainer divide it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # tell the callbacks where the Trainer resumes from (it does not record that itself)
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, (str, Path)):
            self.args.resume_from_checkpoint = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        hard = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
        if not model.training:
            if hard is None:
                raise ValueError("DistillationTrainer evaluation needs labels in the eval dataset")
            return (hard, outputs) if return_outputs else hard
        with torch.no_grad():
            teacher_out = self.teacher(**{k: v for k, v in inputs.items() if k not in LABEL_KEYS})
        loss = self.distill_loss(outputs, teacher_out, hard, inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss


__all__ = ["DistillationTrainer", "PatternLockCallback", "PruningCallback", "PRUNER_STATE_FILE"]
