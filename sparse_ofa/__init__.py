"""sparse_ofa: Prune Once for All for BERT-family encoders, with sparse-INT8 kernels.

    import sparse_ofa
    sparse_ofa.sparsify(model)          # encoder nn.Linear -> SparseInt8Linear, in place
"""
from .backends import get_backend, list_backends, register_backend
from .formats import FORMAT_VERSION, PATTERNS, PackedWeight, pack, unpack, unpack_int8
from .io import from_pretrained, load_sparse_state_dict, save_pretrained
from .masks import magnitude_mask, magnitude_prune_
from .modules import SparseInt8Linear
from .quant import ActQuant
from .selection import is_encoder_linear
from .sparsify import SparsifyReport, sparsify, summarize

__version__ = "0.1.0"

__all__ = [
    "ActQuant", "FORMAT_VERSION", "PATTERNS", "PackedWeight", "SparseInt8Linear", "SparsifyReport",
    "from_pretrained", "get_backend", "is_encoder_linear", "list_backends", "load_sparse_state_dict",
    "magnitude_mask", "magnitude_prune_", "pack", "register_backend", "save_pretrained", "sparsify",
    "summarize", "unpack", "unpack_int8",
]
# the training side (sparse_ofa.training): importable from here, loaded on first use
_TRAINING = ("DistillLoss", "FakeQuantLinear", "GMPSchedule", "PatternLock", "Pruner", "QATConfig",
             "check_teacher_student", "convert_qat", "default_prune_filter", "embedding_distill_loss", "kd_kl",
             "load_checkpoint", "prepare_qat", "save_checkpoint", "train_prune_ofa", "DistillationTrainer",
             "PatternLockCallback", "PruningCallback")
__all__ += list(_TRAINING)


def __getattr__(name):
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'sparse_ofa' has no attribute {name!r}")
