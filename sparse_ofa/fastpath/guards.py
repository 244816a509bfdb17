"""The fast path's safety rails, shared by every fast-path module (attention, layer, embeddings, model).

A fast-path module is the model's own module with a mixin in front of its class (`fast_class`); its
lean forward never fails a forward the model's own forward runs:
- `first_call`: the first call runs both forwards, returns the model's own output, and keeps the lean
  forward only if the two match;
- `lean_or_own`: later calls run the lean forward; if it raises, the model's own forward runs, and if
  that works the lean forward is what failed;
- either way a failure turns the module off for good (`turn_off`) with one FastPathWarning that names
  the module class, the reason and the versions.
Pickling (torch.save(model), deepcopy) goes by the model's own class (`FastMixin.__reduce_ex__`).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

_FAST_CLASSES: dict[type, type] = {}


def traced_or_hooked_globally() -> bool:
    """Under torch.compile / jit tracing, or with global module hooks: the lean forwards step aside."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def uses_cache(args, kwargs) -> bool:
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


def has_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks of its own (they must run: call it as a module)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


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
