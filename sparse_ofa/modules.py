"""SparseInt8Linear: an nn.Linear replacement holding a packed sparse-INT8 weight (formats.py).

Its state_dict holds the packed weight only (no dense copy): weight_mask, weight_values,
weight_row_offsets, weight_scale, weight_meta, bias (if any) and act_qparams (static activation
quantization from QAT: scale, zero_point, qmin, qmax). Backend layouts are derived from these once,
at construction, after load_state_dict and after a device move; they are never saved.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backends as _backends
from .backends.base import LayerInfo
from .formats import PackedWeight, check_pattern, pack, unpack_int8
from .quant import ActQuant

_PACKED_KEYS = ("mask", "values", "row_offsets", "scale", "meta")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SparseInt8Linear(nn.Module):
    """y = x @ W^T + b with W stored sparse + int8 and x quantized to int8 on the fly.

    Build one with `from_linear(linear)` (the weight's zeros are the sparsity pattern) or
    `from_packed(packed)`. The plain constructor makes an all-pruned shell of the given shape, to be
    filled by `load_state_dict` (what `sparse_ofa.load_sparse_state_dict` does).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 pattern: str = "unstructured", backend: str = "auto", act: ActQuant | None = None,
                 device=None):
        super().__init__()
        check_pattern(pattern)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.backend = backend
        self.act = act or ActQuant()
        shell = pack(torch.zeros(self.out_features, self.in_features, device=device), pattern)
        b = torch.zeros(self.out_features, device=device) if bias else None
        self._install(shell, b)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, *, pattern: str | None = None, backend: str = "auto",
                    act: ActQuant | None = None, name: str = "") -> "SparseInt8Linear":
        """Pack `linear`'s weight (zeros = pruned; `pattern` None detects it) on its device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name or 'module'}: SparseInt8Linear.from_linear needs an nn.Linear, "
                            f"got {type(linear).__name__}")
        packed = pack(linear.weight, pattern, name=name or "weight")
        return cls.from_packed(packed, linear.bias, backend=backend, act=act)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None, *,
                    backend: str = "auto", act: ActQuant | None = None) -> "SparseInt8Linear":
        packed.validate()
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = packed.in_features, packed.out_features
        module.backend = backend
        module.act = act or ActQuant()
        if bias is not None:
            if bias.shape != (packed.out_features,):
                raise ValueError(f"bias must have shape ({packed.out_features},), got {tuple(bias.shape)}")
            if not bool(torch.isfinite(bias).all()):
                raise ValueError("bias has NaN/Inf values")
            bias = bias.detach().to(device=packed.device, dtype=torch.float32).clone()
        module._install(packed, bias)
        return module

    def _install(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        for key in _PACKED_KEYS:
            self.register_buffer(f"weight_{key}", getattr(packed, key))
        self.register_buffer("bias", bias)
        self.register_buffer("act_qparams", None if not self.act.is_static else torch.tensor(
            [self.act.scale, self.act.zero_point, self.act.qmin, self.act.qmax], dtype=torch.float32,
            device=packed.device))
        self._refresh()

    def _refresh(self) -> None:
        """Cache plain-int facts, resolve the dispatch chain and build each backend's layout."""
        packed = self.packed
        self._info = LayerInfo.of(packed)
        device = packed.device
        chain = _backends.resolve(self.backend, device, self._info)
        self._chain = chain
        self._prepared = {b.name: b.prepare(packed) for b in chain}
        rowsum = None
        if self.act.is_static and self.act.zero_point:
            rowsum = unpack_int8(packed).sum(1, dtype=torch.int32)
        self._epilogue_bias = (self.act.fold_zero_point(self.bias, rowsum, self.weight_scale)
                               if rowsum is not None else self.bias)
        self._direct = {}  # call plans by key (_remember): direct(), sparse_ofa.ffn, the fast attention

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(**{key: getattr(self, f"weight_{key}") for key in _PACKED_KEYS})

    @property
    def pattern(self) -> str:
        return self._info.pattern

    @property
    def sparsity(self) -> float:
        return 1.0 - self._info.density

    def set_backend(self, backend: str) -> "SparseInt8Linear":
        """Switch the backend ("auto" or a name from sparse_ofa.list_backends()); rebuilds layouts."""
        self.backend = backend
        self._refresh()
        return self

    def dispatch(self, m: int) -> str:
        """Name of the backend that runs a forward of m tokens."""
        return _backends.select(self._chain, m, self._info).name

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._forward_traced(x)
        # the call plan cached per input shape (direct()): ~7 us less per call than dispatching
        # again (~3 us of it the auto backend choice), which is most of a small-M layer's time
        return self.direct(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseInt8Linear expects a tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"SparseInt8Linear expects float32/bfloat16/float16 input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseInt8Linear expects input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        if x.device != self.weight_values.device:
            raise ValueError(f"input is on {x.device} but the packed weight is on "
                             f"{self.weight_values.device}; move one of them (module.to(device))")

    def _forward_traced(self, x: torch.Tensor) -> torch.Tensor:
        """forward() without the Python-side plan cache, for torch.compile / jit tracing."""
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        backend = _backends.select(self._chain, x2.shape[0], self._info)
        y = backend.linear(x2, self._prepared[backend.name], self.weight_scale, self._epilogue_bias,
                           self.act, x.dtype)
        return y.view(*lead, self.out_features)

    def direct(self, x: torch.Tensor, residual: torch.Tensor | None = None, gelu: bool = False,
               norm: tuple | None = None) -> torch.Tensor:
        """forward(x) for the fast path's layers, which call it on their own intermediate tensors: the
        backend choice and the kernel arguments for x's token count are resolved on the first call
        and cached (cleared whenever the layouts are rebuilt), so a call is the kernel op alone,
        without forward()'s checks and dispatch (~7 us less per call). Optional post-ops, in order:
        `+ residual` (same shape as the output), GELU (erf), LayerNorm over the output features with
        norm = (weight, bias, eps). On the CPU (AVX-512, float32) the cpu and dense backends run them
        inside their op on rows still in cache, to within ~1e-6 of torch's ops; elsewhere they are
        those torch ops. forward(x) is direct(x) outside torch.compile / jit tracing."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseInt8Linear expects a tensor, got {type(x).__name__}")
        post = (residual is not None, gelu, norm is not None)
        key = (x.shape, x.dtype, x.device, _backends.plan_context(), post)
        fn = self._direct.get(key)
        if fn is None:
            self._check_input(x)  # raises the error that names the problem
            fn = self._remember(key, self._plan(x.numel() // self.in_features, x.dtype, post))
        return fn(x, residual, norm)

    def _remember(self, key, plan):
        """Cache a resolved call plan under `key` (direct(), sparse_ofa.ffn, the fast attention all keep
        theirs here: rebuilding the layouts drops them all) and return it."""
        if len(self._direct) >= 64:  # many distinct shapes: keep the cache small
            self._direct.clear()
        self._direct[key] = plan
        return plan

    def _plan(self, m: int, dtype: torch.dtype, post: tuple[bool, bool, bool]):
        """fn(x, residual, norm) for direct() (x [..., K] -> [..., N]): the backend's own (post-ops
        fused) where it has one."""
        backend = _backends.select(self._chain, m, self._info)
        prepared = self._prepared[backend.name]
        w_scale, bias, act = self.weight_scale, self._epilogue_bias, self.act
        k, n = self.in_features, self.out_features
        fn = backend.linear_fn(prepared, w_scale, bias, act, m, dtype, post)
        if fn is not None:
            return fn
        base = None
        if any(post):  # the backend's plain one-op call, then torch's ops for the post-ops
            base = backend.linear_fn(prepared, w_scale, bias, act, m, dtype, (False, False, False))
        if base is None:
            def base(x, residual=None, norm=None):
                y = backend.linear(x.reshape(-1, k).contiguous(), prepared, w_scale, bias, act, dtype)
                return y.view(*x.shape[:-1], n)
        if not any(post):
            return base
        has_residual, gelu, has_norm = post

        def composed(x, residual, norm):
            y = base(x, None, None)
            if has_residual:
                y = y + residual
            if gelu:
                y = torch.nn.functional.gelu(y)
            if has_norm:
                y = torch.layer_norm(y, (n,), norm[0], norm[1], norm[2])
            return y
        return composed

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_direct"] = {}  # closures: rebuilt on the next call, never pickled
        return state

    def extra_repr(self) -> str:
        chain = "" if self.backend != "auto" else f" ({'/'.join(b.name for b in self._chain)})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern}, sparsity={self.sparsity:.1%}, "
                f"backend={self.backend}{chain}, act={self.act.describe()}")

    # ----------------------------------------------------------------------------- state
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # model.half()/bfloat16() must not touch the scales or the bias: the epilogue is float32.
        for name in ("weight_scale", "bias", "act_qparams"):
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.to(torch.float32)
        self._refresh()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ours = [f"weight_{k}" for k in _PACKED_KEYS] + ["bias", "act_qparams"]
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in ours:
                unexpected_keys.append(key)
        incoming = {}
        for key in (f"weight_{k}" for k in _PACKED_KEYS):
            if prefix + key in state_dict:
                incoming[key] = state_dict[prefix + key]
            else:
                missing_keys.append(prefix + key)
        if len(incoming) < len(_PACKED_KEYS):
            return
        device = self.weight_values.device
        packed = PackedWeight(**{k: incoming[f"weight_{k}"].to(device, copy=True) for k in _PACKED_KEYS})
        try:
            packed.validate()
        except ValueError as exc:
            error_msgs.append(f"{prefix or 'module'}: {exc}")
            return
        if packed.shape != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix or 'module'}: packed weight is {packed.shape} (out, in), the "
                              f"module is ({self.out_features}, {self.in_features})")
            return
        bias = state_dict.get(prefix + "bias")
        if bias is None and self.bias is not None:
            missing_keys.append(prefix + "bias")
        qparams = state_dict.get(prefix + "act_qparams")
        if qparams is not None:
            s, zp, qmin, qmax = (float(v) for v in qparams)
            self.act = ActQuant(scale=s, zero_point=int(zp), qmin=int(qmin), qmax=int(qmax))
        else:
            self.act = ActQuant()
        self._install(packed, None if bias is None else bias.to(device=device, dtype=torch.float32))
