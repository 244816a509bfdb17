"""Forward-path speedups around the sparse linears, applied by `sparsify()` (opt out: fastpath=False):
fused QKV and attention, lean encoder layers with post-ops fused into the kernels, the feed-forward
block as one op, lean embeddings and base model. install.py says which module gets what; guards.py
how a fast-path module falls back to the model's own forward. Reaches the kernels only through
SparseInt8Linear's call plans and the backend interface (sparse_ofa.backends)."""
from .attention import ATTENTION_MODES, BF16_MIN_KEYS
from .ffn import feed_forward
from .guards import FastPathWarning, _restore_fast  # (_restore_fast: pickles of fast-path modules name it)
from .install import apply_fastpath, remove_fastpath
from .qkv import fused_qkv

__all__ = ["ATTENTION_MODES", "BF16_MIN_KEYS", "FastPathWarning", "apply_fastpath", "feed_forward", "fused_qkv",
           "remove_fastpath"]
