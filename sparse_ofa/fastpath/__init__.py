"""Forward-path speedups around the sparse linears, applied by `sparsify()` (opt out: fastpath=False).
See attention.py for what runs where."""
from .attention import (ATTENTION_MODES, BF16_MIN_KEYS, FastPathWarning, _restore_fast, apply_fastpath,
                        fused_qkv, remove_fastpath)
from .ffn import feed_forward

__all__ = ["ATTENTION_MODES", "BF16_MIN_KEYS", "FastPathWarning", "apply_fastpath", "feed_forward", "fused_qkv",
           "remove_fastpath"]
