"""Prune Once for All, the training side: GMP pruning (`Pruner`, `GMPSchedule`), knowledge distillation
(`DistillLoss` and the losses; `HiddenStateDistillation` for sentence encoders), the pattern lock for
fine-tuning (`PatternLock`), quantization-aware training (`prepare_qat` / `convert_qat`), one training
loop with checkpoints that resume exactly (`train_prune_ofa`; `train_with_adamw` adds the training
commands' optimizer and DDP), the optimizer and LR schedules (`optim`), DDP helpers, and the Hugging
Face Trainer callbacks (imported on first use: they import transformers). Reads the core
(sparse_ofa.formats, masks, sparsify); the core never reads this.
"""
from .distill import (DistillLoss, HiddenStateDistillation, TeacherCache, check_teacher_student,
                      embedding_distill_loss, kd_kl)
from .lock import PatternLock, default_prune_filter
from .loop import TrainOptions, load_checkpoint, save_checkpoint, train_prune_ofa, train_with_adamw
from .pruning import GMPSchedule, Pruner
from .qat import FakeQuantLinear, QATConfig, convert_qat, prepare_qat

_CALLBACKS = ("DistillationTrainer", "PatternLockCallback", "PruningCallback")

__all__ = ["DistillLoss", "FakeQuantLinear", "GMPSchedule", "HiddenStateDistillation", "PatternLock", "Pruner",
           "QATConfig", "TeacherCache", "TrainOptions", "check_teacher_student", "convert_qat", "default_prune_filter",
           "embedding_distill_loss", "kd_kl", "load_checkpoint", "prepare_qat", "save_checkpoint", "train_prune_ofa",
           "train_with_adamw", *_CALLBACKS]


def __getattr__(name):
    if name in _CALLBACKS:
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'sparse_ofa.training' has no attribute {name!r}")
