"""SparseInt8Linear: an nn.Linear replacement holding a packed sparse-INT8 weight (formats.py).

Its state_dict holds the packed weight only (no dense copy): weight_mask, weight_values,
weight_row_offsets, weight_scale, weight_meta, bias (if any) and act_qparams (static activation
quantization from QAT: scale, zero_point, qmin, qmax). Backend layouts are derived from these once,
at construction, after load_state_dict and after a device move; they are never saved.
"""
from __future__ import annotations

import contextlib

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
        info = LayerInfo.of(packed)
        chain = _backends.resolve(self.backend, packed.device, info)
        prepared = {b.name: b.prepare(packed) for b in chain}
        rowsum = None
        if self.act.is_static and self.act.zero_point:
            rowsum = unpack_int8(packed).sum(1, dtype=torch.int32)
        epilogue_bias = (self.act.fold_zero_point(self.bias, rowsum, self.weight_scale)
                         if rowsum is not None else self.bias)
        # assigned only once everything above succeeded: a failure leaves the module as it was
        self._info, self._chain, self._prepared, self._epilogue_bias = info, chain, prepared, epilogue_bias
        self._plans = {}  # call plans by key (remember_plan): direct(), the fast path's FFN and attention

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
        """Switch the backend ("auto" or a name from sparse_ofa.list_backends()); rebuilds layouts.
        Raises (unknown or unavailable backend, a pattern it does not run) with the module unchanged."""
        with self._unchanged_on_failure():
            self.backend = backend
            self._refresh()
        return self

    @contextlib.contextmanager
    def _unchanged_on_failure(self):
        """Puts the backend name, the activation quantization and the buffers back if the block raises
        (the derived layouts need nothing: _refresh assigns them only once it has built them all)."""
        backend, act, buffers = self.backend, self.act, dict(self._buffers)
        try:
            yield
        except Exception:
            self.backend, self.act = backend, act
            self._buffers.clear()
            self._buffers.update(buffers)
            raise

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

    def dequantized_weight(self) -> torch.Tensor:
        """W_q * weight_scale[:, None], float32 [N, K]: the weight the backward multiplies by."""
        return unpack_int8(self.packed).to(torch.float32) * self.weight_scale[:, None]

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
        if torch.is_grad_enabled() and x.requires_grad:
            return _InputGrad.apply(x, self, self._linear_traced)
        return self._linear_traced(x)

    def _linear_traced(self, x: torch.Tensor) -> torch.Tensor:
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
        if torch.is_grad_enabled() and needs_autograd(x, residual, norm):
            return self._direct_grad(x, residual, gelu, norm)
        post = (residual is not None, gelu, norm is not None)
        key = (x.shape, x.dtype, x.device, _backends.plan_context(), post)
        fn = self._plans.get(key)
        if fn is None:
            self._check_input(x)  # raises the error that names the problem
            fn = self.remember_plan(key, self._plan(x.numel() // self.in_features, x.dtype, post))
        return fn(x, residual, norm)

    def _direct_grad(self, x, residual, gelu, norm):
        """direct() where autograd must see the result: the kernel op through _InputGrad (input
        gradient), then the post-ops as torch ops (their own gradients: residual, LayerNorm)."""
        self._check_input(x)
        y = _InputGrad.apply(x, self, self.direct) if x.requires_grad else self.direct(x.detach())
        if residual is not None:
            y = y + residual
        if gelu:
            y = torch.nn.functional.gelu(y)
        if norm is not None:
            y = torch.layer_norm(y, (self.out_features,), norm[0], norm[1], norm[2])
        return y

    # ----------------------------------------------------------------------------- call plans
    # A call plan is a closure over one backend's kernel arguments for one input shape. direct(), the
    # fast path's feed-forward block and its fused attention keep theirs here; rebuilding the layouts
    # (_refresh: load_state_dict, .to(), set_backend) drops them all.
    def kernel_args(self, m: int) -> tuple[_backends.Backend, tuple]:
        """The backend that runs m tokens of this layer, and what its *_fn methods take for it:
        (prepared layout, weight scale, epilogue bias, activation quantization)."""
        backend = _backends.select(self._chain, m, self._info)
        return backend, (self._prepared[backend.name], self.weight_scale, self._epilogue_bias, self.act)

    def cached_plan(self, key):
        """The call plan cached under `key`, or None."""
        return self._plans.get(key)

    def remember_plan(self, key, plan):
        """Cache `plan` under `key` and return it."""
        if len(self._plans) >= 64:  # many distinct shapes: keep the cache small
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _plan(self, m: int, dtype: torch.dtype, post: tuple[bool, bool, bool]):
        """fn(x, residual, norm) for direct() (x [..., K] -> [..., N]): the backend's own (post-ops
        fused) where it has one."""
        backend, (prepared, w_scale, bias, act) = self.kernel_args(m)
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
        state["_plans"] = {}  # closures: rebuilt on the next call, never pickled
        return state

    def extra_repr(self) -> str:
        chain = "" if self.backend != "auto" else f" ({'/'.join(b.name for b in self._chain)})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern}, sparsity={self.sparsity:.1%}, "
                f"backend={self.backend}{chain}, act={self.act.describe()}")

    # ----------------------------------------------------------------------------- state
    def _apply(self, fn, recurse=True):
        # where fn sends the weight, tried on an empty slice before anything moves
        target = fn(self.weight_values[:0]).device
        if target.type == "meta":
            raise RuntimeError(f"{self._describe()}: cannot move to the meta device: the backends build "
                               "their layouts from the packed weight's values, which a meta tensor lacks "
                               "(build the model on the meta device before sparsify(), or keep this layer "
                               "on the CPU/GPU)")
        with self._unchanged_on_failure():
            super()._apply(fn, recurse)
            # model.half()/bfloat16() must not touch the scales or the bias: the epilogue is float32.
            for name in ("weight_scale", "bias", "act_qparams"):
                t = self._buffers.get(name)
                if t is not None and t.dtype != torch.float32:
                    self._buffers[name] = t.to(torch.float32)
            self._refresh()
        return self

    def _describe(self) -> str:
        return f"SparseInt8Linear(in_features={self.in_features}, out_features={self.out_features})"

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
        layer = prefix[:-1] if prefix.endswith(".") else (prefix or "module")
        for key, t in incoming.items():
            if not isinstance(t, torch.Tensor):
                error_msgs.append(f"{layer}: {prefix}{key} must be a tensor, got {type(t).__name__}")
                return
        device = self.weight_values.device
        # (contiguous: a strided view of the right values, a transposed-back mask say, loads as they are)
        packed = PackedWeight(**{k: incoming[f"weight_{k}"].to(device, copy=True).contiguous()
                                 for k in _PACKED_KEYS})
        try:
            packed.validate()
        except ValueError as exc:
            message = str(exc)
            for key in _PACKED_KEYS:  # name the state_dict key: "packed weight meta" -> "<prefix>weight_meta"
                message = message.replace(f"packed weight {key} ", f"{prefix}weight_{key} ")
            error_msgs.append(f"{layer}: {message}")
            return
        if packed.shape != (self.out_features, self.in_features):
            error_msgs.append(f"{layer}: packed weight is {packed.shape} (out, in), the "
                              f"module is ({self.out_features}, {self.in_features})")
            return
        bias = state_dict.get(prefix + "bias")
        if bias is None and self.bias is not None:
            missing_keys.append(prefix + "bias")
        try:
            if bias is not None:
                bias = _checked_bias(bias, self.out_features, prefix + "bias").to(device)
            qparams = state_dict.get(prefix + "act_qparams")
            act = ActQuant() if qparams is None else _act_quant_of(qparams, prefix + "act_qparams")
        except ValueError as exc:
            error_msgs.append(f"{layer}: {exc}")
            return
        with self._unchanged_on_failure():
            self.act = act
            self._install(packed, bias)


def _checked_bias(bias, n: int, key: str) -> torch.Tensor:
    """`bias` of a state_dict as the module's float32 [n] bias; ValueError naming `key` otherwise."""
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{key} must have shape ({n},) (one per output feature), got {tuple(bias.shape)}")
    if not (bias.is_floating_point() or bias.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{key} must be a real tensor, got {bias.dtype}")
    bias = bias.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(bias).all()):
        bad = int((~torch.isfinite(bias)).nonzero()[0, 0])
        raise ValueError(f"{key} has NaN/Inf values (first at index {bad}, or out of float32 range)")
    return bias


def _act_quant_of(qparams, key: str) -> ActQuant:
    """The ActQuant of a state_dict's act_qparams [scale, zero_point, qmin, qmax]; ValueError naming
    `key` for a wrong shape, NaN/Inf, a non-integer zero point or range, or an invalid range."""
    if not isinstance(qparams, torch.Tensor) or qparams.dim() != 1 or qparams.numel() != 4:
        got = (f"{qparams.dtype} {tuple(qparams.shape)}" if isinstance(qparams, torch.Tensor)
               else type(qparams).__name__)
        raise ValueError(f"{key} must be a 1-D tensor of 4 values (scale, zero_point, qmin, qmax), got {got}")
    if not qparams.is_floating_point() and qparams.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{key} must be float32 (scale, zero_point, qmin, qmax), got {qparams.dtype}")
    values = [float(v) for v in qparams.detach().cpu().to(torch.float64)]
    names = ("scale", "zero_point", "qmin", "qmax")
    for name, v in zip(names, values):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{key}: {name} is {v}; every entry must be finite")
    for name, v in zip(names[1:], values[1:]):
        if v != round(v):
            raise ValueError(f"{key}: {name} must be an integer, got {v}")
    try:
        return ActQuant(scale=values[0], zero_point=int(values[1]), qmin=int(values[2]), qmax=int(values[3]))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def needs_autograd(x: torch.Tensor, residual, norm) -> bool:
    """Whether autograd must see direct()'s result (with grad mode on): an input that requires grad."""
    return (x.requires_grad or (residual is not None and residual.requires_grad)
            or (norm is not None and (norm[0] is not None and norm[0].requires_grad
                                      or norm[1] is not None and norm[1].requires_grad)))


class _InputGrad(torch.autograd.Function):
    """y = fn(x), the layer's quantized linear as its backend runs it (no graph inside), with the
    gradient of the float layer it stands for: dx = dy @ W_deq (W_deq = W_q * w_scale, the packed
    weight dequantized), straight through the activation quantizer. A static quantizer (QAT) passes
    no gradient where it clips x to [qmin, qmax], as qat.py's fake quantization does; per-token
    quantization never clips. The packed weight, scales and bias are buffers: frozen, no gradient.
    Every backend goes through this, so their gradients are the same."""

    @staticmethod
    def forward(ctx, x, module, fn):
        ctx.module = module
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x if module.act.is_static else None)
        return fn(x)

    @staticmethod
    def backward(ctx, grad_y):
        module = ctx.module
        g = grad_y.reshape(-1, module.out_features).to(torch.float32) @ module.dequantized_weight()
        if module.act.is_static:
            (x,) = ctx.saved_tensors
            act = module.act
            raw = torch.round(x.reshape(-1, module.in_features).to(torch.float32) * act.inv_scale) + act.zero_point
            g = g * ((raw >= act.qmin) & (raw <= act.qmax))
        return g.reshape(ctx.x_shape).to(ctx.x_dtype), None, None
