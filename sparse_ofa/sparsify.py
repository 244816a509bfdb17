"""sparsify(model): swap a model's encoder nn.Linear layers for SparseInt8Linear, in place.

Default selection: `is_encoder_linear` (selection.py), the encoder layers' nn.Linear modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import SparseInt8Linear
from .quant import ActQuant
from .selection import FilterFn, is_encoder_linear


@dataclass
class LayerRow:
    name: str
    out_features: int
    in_features: int
    pattern: str
    sparsity: float
    dense_bytes: int
    packed_bytes: int


@dataclass
class SparsifyReport:
    """What sparsify swapped: one row per layer; bytes are weight + bias, fp32 vs packed."""

    rows: list[LayerRow] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.rows)

    @property
    def sparsity(self) -> float:
        total = sum(r.out_features * r.in_features for r in self.rows)
        pruned = sum(r.sparsity * r.out_features * r.in_features for r in self.rows)
        return pruned / max(total, 1)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'shape (out x in)':>16}  {'pattern':>12}  {'sparsity':>8}  "
                 f"{'fp32 KiB':>9}  {'packed KiB':>10}"]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {f'{r.out_features} x {r.in_features}':>16}  "
                         f"{r.pattern:>12}  {r.sparsity:>8.1%}  {r.dense_bytes / 1024:>9.1f}  "
                         f"{r.packed_bytes / 1024:>10.1f}")
        ratio = self.dense_bytes / max(self.packed_bytes, 1)
        lines.append(f"{len(self.rows)} layers, sparsity {self.sparsity:.1%}, "
                     f"{self.dense_bytes / 2**20:.2f} MiB fp32 -> {self.packed_bytes / 2**20:.2f} MiB "
                     f"packed ({ratio:.1f}x smaller)")
        return "\n".join(lines)


def summarize(model: nn.Module) -> SparsifyReport:
    """A report of every SparseInt8Linear in `model`."""
    report = SparsifyReport()
    for name, module in model.named_modules():
        if isinstance(module, SparseInt8Linear):
            bias_bytes = 0 if module.bias is None else module.bias.numel() * 4
            report.rows.append(LayerRow(
                name, module.out_features, module.in_features, module.pattern, module.sparsity,
                dense_bytes=4 * module.out_features * module.in_features + bias_bytes,
                packed_bytes=module.packed.nbytes() + bias_bytes))
    return report


def _act_quant_of(module: nn.Module) -> ActQuant | None:
    """Static activation quantization learned by QAT, if the module carries it."""
    getter = getattr(module, "sparse_ofa_act_quant", None)
    return getter() if callable(getter) else None


def sparsify(model: nn.Module, *, filter_fn: FilterFn | None = None, backend: str = "auto",
             pattern: str | None = None, verbose: bool = False, fastpath: bool = True) -> nn.Module:
    """Swap the selected nn.Linear modules of `model` for SparseInt8Linear, in place; return model.

    filter_fn(module, qualified_name) -> bool picks the layers (default: `is_encoder_linear`).
    pattern: None detects each layer's pattern from its zeros; "unstructured", "1x4" or "2:4" checks
    that every selected weight follows it. backend: "auto" or a name from `list_backends()`.
    Modules that carry QAT activation ranges (a `sparse_ofa_act_quant()` method) get static
    activation scales; others quantize activations per token at run time.
    Raises ValueError if nothing is selected, naming the layer for NaN/Inf weights or a pattern
    mismatch, and TypeError for a selected module that is not an nn.Linear.
    fastpath=False keeps the model's own attention forward (see sparse_ofa/fastpath/).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("sparsify swaps the Linear layers *inside* a model; for one layer use "
                        "SparseInt8Linear.from_linear(linear)")
    select = filter_fn or is_encoder_linear
    chosen = [(name, m) for name, m in model.named_modules()
              if name and not isinstance(m, SparseInt8Linear) and select(m, name)]
    for name, module in chosen:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"sparsify: filter_fn selected {name!r}, a {type(module).__name__}; only "
                            "nn.Linear layers can be swapped")
    if not chosen and any(isinstance(m, SparseInt8Linear) for m in model.modules()):
        done = sum(isinstance(m, SparseInt8Linear) for m in model.modules())
        raise ValueError(f"sparsify: the model is already sparsified ({done} SparseInt8Linear layers, no "
                         "nn.Linear left to swap); to change the backend, call set_backend(name) on each "
                         "SparseInt8Linear")
    if not chosen:
        raise ValueError("sparsify: no Linear layer matched; pass filter_fn=lambda module, name: ... "
                         "to choose layers in a model without a BERT-style encoder")
    # pack everything first: an error leaves model untouched. Outside inference mode, also when called
    # inside it: the packed buffers stay ordinary tensors, which load_state_dict and .to() can update
    with torch.inference_mode(False), torch.no_grad():
        swapped = {name: SparseInt8Linear.from_linear(module, pattern=pattern, backend=backend,
                                                      act=_act_quant_of(module), name=name)
                   for name, module in chosen}
    for name, new in swapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    if fastpath:  # fused QKV + direct SDPA for BERT-style attention (sparse_ofa/fastpath/)
        from .fastpath import apply_fastpath
        apply_fastpath(model)
    if verbose:
        print(summarize(model))
    return model
