"""Forward-path speedups around the sparse linears, applied by `sparsify()` (opt out: fastpath=False).

What it does, per BERT-style self-attention module (query/key/value, or DistilBERT's q_lin/k_lin/v_lin,
are SparseInt8Linear with the same input size, pattern, backend and activation quantization; HF "sdpa"
attention):

* fused QKV: one packed weight [3H, K] built from the three (format v1 concatenated along the output
  rows, no requantization), so the activations are quantized once instead of three times and one
  kernel call replaces three. Numerics are those of the plain path: per-token activation scales
  depend only on the shared input, and each output row keeps its own weight scale and bias.
* attention reads q/k/v straight from the fused output: on CPUs with AVX-512 the fused fp32 kernel
  `torch.ops.sparse_ofa.cpu_attention` (csrc/cpu/attention_avx512.cpp: ~2.5x torch's SDPA at seq 128,
  writes the heads merged), elsewhere `F.scaled_dot_product_attention` on views of the fused output
  (no HF attention-interface dispatch, no extra copies of q/k/v). Both are fp32; they differ from
  the plain path only in summation order (~1e-6). `attention="sdpa"` keeps torch's kernel. On the
  cpu backend the projection and the fused kernel are one op, `cpu_qkv_attention` (the projection
  written channel-major, K^T read in place: no output transposes; same bits as the two ops).
* optional bf16 attention (`attention="bf16"`, off by default): QK^T and PV on bf16 inputs with fp32
  sums and an fp32 softmax; changes numerics slightly (about as much as the int8 rounding of the
  linears), hence opt-in. On CPUs with AVX-512 BF16 the same fused kernel with `vdpbf16ps`
  (csrc/cpu/attention_bf16.cpp, ~1.5x the fp32 kernel at 128 tokens) from BF16_MIN_KEYS keys on;
  shorter sequences, and AVX-512 CPUs without BF16, run the fp32 kernel (faster there); elsewhere
  torch ops in bfloat16.

Around them: the encoder layers get a lean forward (sparse_ofa/fastpath_layer.py: post-ops fused into
the linears, the feed-forward block as one op) and the embeddings one too (sparse_ofa/fastpath_embed.py).

The module's state_dict is untouched: the fused weight is derived (like a backend layout), held
outside the module tree, and rebuilt when the q/k/v buffers change (load_state_dict, .to(device),
set_backend). The fast forward steps aside, running the model's own forward, while training, under
torch.compile/export tracing, with a KV cache, or when attention weights are asked for.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from . import backends as _backends
from .backends import cpu as _cpu_backend
from .formats import PackedWeight
from .modules import SparseInt8Linear

ATTENTION_MODES = ("fp32", "sdpa", "bf16")
BF16_MIN_KEYS = 32  # below, converting q/k/v to bf16 pairs costs what the bf16 products save (bench/NOTES.md)
_FAST_CLASSES: dict[type, type] = {}


def concat_packed(parts: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights along the output rows: [N1 + N2 + ..., K], same K and pattern."""
    first = parts[0]
    if any(p.in_features != first.in_features or p.pattern != first.pattern for p in parts):
        raise ValueError("concat_packed needs the same in_features and pattern in every part")
    offsets, base = [first.row_offsets[:1]], 0
    for p in parts:
        offsets.append(p.row_offsets[1:] + base)
        base += p.values.numel()
    meta = first.meta.clone()
    meta[1] = sum(p.out_features for p in parts)
    return PackedWeight(mask=torch.cat([p.mask for p in parts]),
                        values=torch.cat([p.values for p in parts]),
                        row_offsets=torch.cat(offsets),
                        scale=torch.cat([p.scale for p in parts]),
                        meta=meta)


# Where a self-attention module keeps its q/k/v projections: BERT-style names, DistilBERT's.
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


def _qkv_names(module: nn.Module) -> tuple[str, str, str]:
    names = getattr(type(module), "_qkv_names", None)  # a fast-path class knows its own
    if names is None:
        names = next((n for n in QKV_NAMES if n[0] in module._modules), QKV_NAMES[0])
    return names


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor (made under
    torch.inference_mode), which has none and cannot be changed in place outside that mode."""
    return -1 if tensor.is_inference() else tensor._version


def _qkv_signature(module: nn.Module) -> tuple | None:
    """What the fused weight is built from (None if q/k/v are not all SparseInt8Linear). Reads
    _modules/_buffers directly: this runs every forward and nn.Module.__getattr__ is slow. Holding
    the tensors keeps their ids from being reused."""
    mods = module._modules
    parts = tuple(mods.get(name) for name in _qkv_names(module))
    if not all(isinstance(m, SparseInt8Linear) for m in parts):
        return None
    return tuple((m._buffers["weight_values"], _version(m._buffers["weight_values"]),
                  m._buffers["bias"], m.backend, m.act) for m in parts)


def _signature_matches(old: tuple, new: tuple) -> bool:
    return all(a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3] and a[4] == b[4]
               for a, b in zip(old, new))


def _build_fused_qkv(module: nn.Module) -> SparseInt8Linear:
    parts = tuple(module._modules[name] for name in _qkv_names(module))
    packed = concat_packed([m.packed for m in parts])
    biases = [m.bias if m.bias is not None else torch.zeros_like(m.weight_scale) for m in parts]
    return SparseInt8Linear.from_packed(packed, torch.cat(biases), backend=parts[0].backend,
                                        act=parts[0].act)


def fused_qkv(module: nn.Module) -> SparseInt8Linear | None:
    """The module's fused QKV layer (rebuilt if q/k/v changed since the last call), or None when
    q/k/v cannot be fused (not all sparse, or different patterns/backends/quantization/devices)."""
    signature = _qkv_signature(module)
    if signature is None:
        return None
    cached = module.__dict__.get("_sparse_ofa_qkv")
    if cached is None or not _signature_matches(cached[0], signature):
        if not _fusable(module):
            return None
        cached = (signature, _build_fused_qkv(module))
        # plain __dict__ entry, not a submodule: stays out of state_dict, named_modules and .to()
        module.__dict__["_sparse_ofa_qkv"] = cached
    return cached[1]


def _bf16_attention(qkv: torch.Tensor, heads: int, mask) -> torch.Tensor:
    """Attention of a fused fp32 qkv [B, S, 3H] (q already scaled) with both products in bf16
    (AVX-512 BF16) and the softmax accumulated in fp32; returns fp32 [B, S, H].

    One copy casts and lays q, k, v out as contiguous [B, heads, S, D] (matmul on the strided
    views copies anyway, three times); an additive mask is added in fp32 so it stays finite."""
    b, s, three_h = qkv.shape
    d = three_h // (3 * heads)
    split = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = torch.empty(split.shape, dtype=torch.bfloat16, device=qkv.device).copy_(split).unbind(0)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if mask is not None and mask.dtype != torch.bool:
        probs = scores.float().add_(mask).softmax(-1)
    else:
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, -1, dtype=torch.float32)
    out = torch.matmul(probs.to(torch.bfloat16), v)  # [B, heads, S, D]
    merged = torch.empty(b, s, heads, d, dtype=qkv.dtype, device=qkv.device).copy_(out.transpose(1, 2))
    return merged.view(b, s, heads * d)


def _cpu_attention_runs(qkv: torch.Tensor, mask) -> bool:
    """Whether torch.ops.sparse_ofa.cpu_attention takes this call: fp32 [B, S, 3H] on an ISA path where
    it measured faster than torch's SDPA (backends.cpu.runs_attention_op), a bool or fp32 mask."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or qkv.dim() != 3:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:  # the op has no backward: SDPA then
        return False
    if mask is not None and (mask.device.type != "cpu" or mask.dtype not in (torch.bool, torch.float32)
                             or mask.dim() > 4):
        return False
    try:
        return _cpu_backend.runs_attention_op(_cpu_backend.effective_isa(), qkv.shape[-2])
    except (RuntimeError, ValueError):  # no compiler for the extension, or a bad $SPARSE_OFA_CPU_ISA
        return False


def _qkv_attention_plan(fused: SparseInt8Linear, x: torch.Tensor, heads: int, scale: float, bf16: bool):
    """fn(x, mask) running the fused projection + attention (bf16 products or fp32) as one op (the
    backend's qkv_attention_fn), or None; resolved once per input shape and cached with the layer's
    direct() plans (dropped whenever its layouts are rebuilt)."""
    key = ("qkv_attention", x.shape, x.dtype, x.device, _backends.plan_context(), heads, scale, bf16)
    if key in fused._direct:
        return fused._direct[key]
    m = x.numel() // fused.in_features
    backend = _backends.select(fused._chain, m, fused._info)
    return fused._remember(key, backend.qkv_attention_fn(fused._prepared[backend.name], fused.weight_scale,
                                                         fused._epilogue_bias, fused.act, m, heads, scale,
                                                         bf16=bf16))


def traced_or_hooked_globally() -> bool:
    """Under torch.compile / jit tracing, or with global module hooks: the lean forwards step aside."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def _uses_cache(args, kwargs) -> bool:
    cache_keys = ("cache", "past_key_values", "past_key_value", "encoder_hidden_states")
    return any(kwargs.get(key) is not None for key in cache_keys) or any(a is not None for a in args)


def _restore_fast(base_cls: type, mixin: type, state: dict) -> nn.Module:
    """Unpickle a fast-path module: rebuild it as base_cls, then give it the fast class again."""
    module = base_cls.__new__(base_cls)
    module.__setstate__(state)
    module.__class__ = fast_class(base_cls, mixin)
    return module


class FastPathWarning(UserWarning):
    """A fast-path module turned itself off and runs the model's own forward (same results, slower)."""


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def turn_off(module: nn.Module, key: str, reason: str) -> None:
    """Run `module`'s own forward from now on (its fast-path mode `key` = "off"), and say why, once
    per module class and reason."""
    module.__dict__[key] = "off"
    warnings.warn(f"sparse_ofa fast path: {base_class(module).__name__} runs its own forward from now on "
                  f"({reason}; transformers {_transformers_version()}, torch {torch.__version__}). "
                  "Outputs are unchanged; this module loses the fast path's speedup. Please report it "
                  "with these versions.", FastPathWarning, stacklevel=4)


def lean_or_own(module: nn.Module, key: str, lean, own):
    """lean() unless it raises; then own() (the model's forward), and if that works the lean forward
    is what failed: off for good (turn_off). If own() raises too, the input was the problem: its error
    propagates and the fast path stays on."""
    try:
        return lean()
    except Exception as error:  # noqa: BLE001 - any failure of ours must not fail the user's forward
        failure = error
    out = own()
    turn_off(module, key, f"{type(failure).__name__}: {failure}")
    return out


def first_call(module: nn.Module, key: str, lean, own, compare):
    """A fast-path module's first call: the model's own forward runs and is returned; the lean one
    runs beside it, and `compare(mine, theirs)` names the mode to keep (mode `key`), or None where the
    two differ: then, as when the lean forward raises, the module turns off (turn_off)."""
    theirs = own()
    try:
        mode = compare(lean(), theirs)
    except Exception as error:  # noqa: BLE001 - any failure of ours must not fail the user's forward
        turn_off(module, key, f"{type(error).__name__} at its first call: {error}")
        return theirs
    if mode is None:
        turn_off(module, key, "its first call did not match the model's own output")
    else:
        module.__dict__[key] = mode
    return theirs


class FastMixin:
    """Base of the fast-path mixins: pickles (torch.save(model), deepcopy) by the model's own
    class, which any process can import, instead of the class generated here; derived caches
    (keys in _DERIVED) are dropped and rebuilt on the next forward."""

    _DERIVED = ("_sparse_ofa_qkv", "_sparse_ofa_layer_mode", "_sparse_ofa_route", "_sparse_ofa_embed_mode",
                "_sparse_ofa_model_mode", "_sparse_ofa_attention_mode")

    def __reduce_ex__(self, protocol):
        state = {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}
        return _restore_fast, (base_class(self), type(self).__mro__[1], state)


def fast_class(cls: type, mixin: type) -> type:
    """`cls` with `mixin` in front (cached), named after it, for a module's __class__ swap.

    Its str() is the model class's (same __module__ and __qualname__): transformers keys per-class
    registries by str(type(module)) (what output_hidden_states / output_attentions record, for
    one), so the swapped module finds the entries of its own class. Pickling goes by the model's
    class too (FastMixin.__reduce_ex__)."""
    if (cls, mixin) not in _FAST_CLASSES:
        fast = type(f"SparseOFAFast{cls.__name__}", (mixin, cls), {})
        fast.__module__, fast.__qualname__ = cls.__module__, cls.__qualname__
        _FAST_CLASSES[(cls, mixin)] = fast
    return _FAST_CLASSES[(cls, mixin)]


def base_class(module: nn.Module) -> type:
    """The model's own class of a fast-path module."""
    fast = type(module)
    return fast.__mro__[len(fast.__mro__[1].__mro__)]


class FastSelfAttentionMixin(FastMixin):
    """Mixed in front of a BERT-style SelfAttention class (see apply_fastpath)."""

    _sparse_ofa_attention = "fp32"
    _qkv_names = QKV_NAMES[0]

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if (self.training or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or kwargs.get("output_attentions") or _uses_cache(args, kwargs)
                or self.__dict__.get("_sparse_ofa_attention_mode") == "off"):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)

        def own():
            return super(FastSelfAttentionMixin, self).forward(hidden_states, attention_mask, *args, **kwargs)

        def lean():
            out = self.fast_attention(hidden_states, attention_mask)
            return own() if out is None else (self.project_output(out), None)
        return lean_or_own(self, "_sparse_ofa_attention_mode", lean, own)

    def project_output(self, out: torch.Tensor) -> torch.Tensor:
        """What the module's own forward applies after the attention: nothing for BERT-style modules
        (the layer's attention.output holds the projection)."""
        return out

    def fast_attention(self, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor | None:
        """The attention output [..., S, H] by fused QKV, or None where the model's forward must run
        (not "sdpa" attention, q/k/v no longer fusable, or turned off). The lean layer calls this directly."""
        if (getattr(self.config, "_attn_implementation", None) != "sdpa"
                or self.__dict__.get("_sparse_ofa_attention_mode") == "off"):
            return None
        fused = fused_qkv(self)
        if fused is None:
            return None
        scale = getattr(self, "scaling", self.attention_head_size ** -0.5)
        mode = self._sparse_ofa_attention
        # (qkv has hidden_states' dtype, device and rank: the check holds for both)
        cpu_kernel = mode != "sdpa" and _cpu_attention_runs(hidden_states, attention_mask)
        bf16 = (cpu_kernel and mode == "bf16" and hidden_states.shape[-2] >= BF16_MIN_KEYS
                and _cpu_backend.bf16_attention_supported())
        if cpu_kernel:
            fn = _qkv_attention_plan(fused, hidden_states, self.num_attention_heads, scale, bf16)
            if fn is not None:  # projection + attention as one op (same bits as the two below)
                return fn(hidden_states, attention_mask)
        qkv = fused.direct(hidden_states)
        if cpu_kernel and qkv.dtype == torch.float32:
            return torch.ops.sparse_ofa.cpu_attention.default(qkv, attention_mask, self.num_attention_heads,
                                                              scale, -1, bf16)
        if mode == "bf16" and qkv.device.type == "cpu" and qkv.dim() == 3 and qkv.dtype == torch.float32:
            qkv[..., :self.all_head_size].mul_(scale)  # qkv is ours: fold the scale into q
            return _bf16_attention(qkv, self.num_attention_heads, attention_mask)
        input_shape = hidden_states.shape[:-1]
        head_shape = (*input_shape, -1, self.attention_head_size)
        q, k, v = (t.view(head_shape).transpose(-3, -2) for t in qkv.split(self.all_head_size, -1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale)
        return out.transpose(-3, -2).reshape(*input_shape, -1)


class FastDistilSelfAttentionMixin(FastSelfAttentionMixin):
    """Mixed in front of DistilBERT's self-attention (transformers 5: DistilBertSelfAttention), which
    names its projections q_lin/k_lin/v_lin, its head count n_heads and applies its output projection
    out_lin itself."""

    _qkv_names = QKV_NAMES[1]
    num_attention_heads = property(lambda self: self.n_heads)
    all_head_size = property(lambda self: self.dim)

    def project_output(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_lin(out)


def _fusable(module: nn.Module) -> bool:
    parts = [module._modules.get(name) for name in _qkv_names(module)]
    if not all(isinstance(m, SparseInt8Linear) for m in parts):
        return False
    q = parts[0]
    return all(m.in_features == q.in_features and m.pattern == q.pattern and m.backend == q.backend
               and m.act == q.act and m.weight_values.device == q.weight_values.device
               for m in parts)


def _attention_mixin(module: nn.Module) -> type | None:
    """The fast-path mixin for a BERT-style or DistilBERT self-attention module, None for others."""
    name = type(module).__name__
    if (not name.endswith("SelfAttention") or "Cross" in name or getattr(module, "is_decoder", False)
            or getattr(module, "is_causal", False) or not hasattr(module, "config")):
        return None
    if all(hasattr(module, a) for a in ("query", "key", "value", "attention_head_size", "all_head_size")):
        return FastSelfAttentionMixin
    # DistilBERT: only transformers 5's form, forward(hidden_states, attention_mask, ...) -> (out, weights);
    # transformers 4's MultiHeadSelfAttention takes (query, key, value, mask, ...) and is left alone.
    if (all(hasattr(module, a) for a in ("q_lin", "k_lin", "v_lin", "out_lin", "n_heads", "dim",
                                         "attention_head_size", "scaling"))
            and own_forward_arguments(module)[:2] == ("hidden_states", "attention_mask")):
        return FastDistilSelfAttentionMixin
    return None


def own_forward_arguments(module: nn.Module) -> tuple[str, ...]:
    """The argument names after self of the module's own forward (its model class's for a fast-path
    module): which calling convention a module of a known structure has."""
    return _forward_arguments_of(base_class(module) if isinstance(module, FastMixin) else type(module))


@functools.lru_cache(maxsize=None)
def _forward_arguments_of(cls: type) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)[1:]  # (follows decorators' __wrapped__)
    except (TypeError, ValueError):
        return ()


def apply_fastpath(model: nn.Module, *, attention: str = "fp32", fuse: bool = True) -> list[str]:
    """Give `model` the fast path (again, to change its options); return the names of the modules
    that got it now.

    Every fusable self-attention gets fused QKV + fused attention; every BERT-style layer around one
    gets the lean layer forward (sparse_ofa/fastpath_layer.py), and the model's BERT-style embeddings
    a lean forward (sparse_ofa/fastpath_embed.py, same output bit for bit), and a BERT-style base model
    around them a lean forward of its own (sparse_ofa/fastpath_model.py). attention: "fp32" (default: the
    fused CPU kernel where AVX-512 runs, else torch's SDPA; fp32 numerics), "sdpa" (always torch's
    SDPA) or "bf16" (attention products on bfloat16 inputs on CPU where that is faster, slightly
    different numerics: see the module docstring).
    fuse: run residual add + LayerNorm and GELU as post-ops inside the linear kernels (cpu backend,
    AVX-512). attention="sdpa", fuse=False computes exactly what the plain sparsified model does."""
    from .fastpath_embed import FastEmbeddingsMixin, lean_embeddings_mixin
    from .fastpath_layer import FastLayerMixin, lean_layer_mixin
    from .fastpath_model import FastModelMixin, lean_model_mixin

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, FastSelfAttentionMixin) or _attention_mixin(module) is not None:
            if not _fusable(module):
                continue
            _give_fast_class(module, FastSelfAttentionMixin, _attention_mixin)
            module._sparse_ofa_attention = attention
            changed.append(name)
    for name, module in model.named_modules():  # after the attentions: a lean layer needs one
        if _give_fast_class(module, FastLayerMixin, lean_layer_mixin):
            changed.append(name)
        if isinstance(module, FastLayerMixin):
            module._sparse_ofa_fuse = bool(fuse)
    if changed:  # a BERT-style encoder: its embeddings and base model too
        for base, detect in ((FastEmbeddingsMixin, lean_embeddings_mixin), (FastModelMixin, lean_model_mixin)):
            for name, module in model.named_modules():
                if _give_fast_class(module, base, detect):
                    changed.append(name)
    return changed


def _give_fast_class(module: nn.Module, base: type, detect) -> bool:
    """Swap in the fast class of the mixin `detect(module)` names, unless the module has a `base`
    mixin already; whether it was swapped."""
    if isinstance(module, base):
        return False
    mixin = detect(module)
    if mixin is None:
        return False
    module.__class__ = fast_class(type(module), mixin)
    return True


def remove_fastpath(model: nn.Module) -> int:
    """Undo apply_fastpath: back to the model's own classes; returns how many modules changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, FastMixin):
            module.__class__ = base_class(module)
            for key in FastMixin._DERIVED + ("_sparse_ofa_attention", "_sparse_ofa_fuse"):
                module.__dict__.pop(key, None)
            count += 1
    return count
