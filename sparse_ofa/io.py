"""Saving and loading sparsified models.

A sparsified model's state_dict holds packed weights only, so it loads back into a model of the same
architecture once its Linear layers have been turned into SparseInt8Linear shells of the right
pattern. `load_sparse_state_dict` does that from the state_dict alone (every packed layer carries a
`weight_meta` entry), and `from_pretrained` does it for a Hugging Face model saved with
`model.save_pretrained(dir)` after `sparsify(model)`:

    sparsify(model); model.save_pretrained("out")                # or sparse_ofa.save_pretrained
    model = sparse_ofa.from_pretrained("out")                    # AutoModel unless model_class given
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .formats import PATTERNS
from .modules import SparseInt8Linear

_META_SUFFIX = ".weight_meta"


def load_sparse_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                           backend: str = "auto", strict: bool = True) -> nn.Module:
    """Swap the Linear layers that `state_dict` holds packed for shells, then load it. In place."""
    for key, meta in state_dict.items():
        if not key.endswith(_META_SUFFIX):
            continue
        name = key[: -len(_META_SUFFIX)]
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"state_dict has a packed layer {name!r} that the model lacks; is it the "
                             "same architecture?") from exc
        if isinstance(module, SparseInt8Linear):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"state_dict packs {name!r}, but the model has a {type(module).__name__} there")
        if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int32 or tuple(meta.shape) != (5,):
            got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
            raise ValueError(f"{name}: {key} must be int32 [5] (format version, out_features, in_features, "
                             f"pattern code, block), got {got}")
        pattern_code = int(meta[3])
        if not 0 <= pattern_code < len(PATTERNS):
            raise ValueError(f"{name}: unknown pattern code {pattern_code} in {key}")
        shell = SparseInt8Linear(module.in_features, module.out_features, module.bias is not None,
                                 pattern=PATTERNS[pattern_code], backend=backend,
                                 device=module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
    model.load_state_dict(state_dict, strict=strict)
    from .fastpath import apply_fastpath  # as sparsify() does: fused QKV, lean layers

    apply_fastpath(model)
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    bin_file = path / "pytorch_model.bin"
    if bin_file.exists():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"in {path}")


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """`model.save_pretrained(path)` for Hugging Face models, a model.safetensors file otherwise."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


def from_pretrained(path: str | os.PathLike, model_class=None, *, backend: str = "auto",
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load a sparsified Hugging Face model saved with save_pretrained (no hub access).

    model_class: a transformers Auto class or model class (default AutoModel), e.g.
    AutoModelForSequenceClassification or BertForSequenceClassification for a saved classifier.
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained directory")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = model_class or AutoModel
    # Auto classes build from a config with from_config, concrete classes with their constructor
    model = (model_class.from_config(config) if hasattr(model_class, "from_config")
             else model_class(config))
    state = _read_weights(path)
    if not any(k.endswith(_META_SUFFIX) for k in state):
        raise ValueError(f"{path} holds no packed sparse_ofa layers; load it with "
                         "transformers' from_pretrained instead")
    load_sparse_state_dict(model, state, backend=backend, strict=True)
    return model.to(device).eval()
