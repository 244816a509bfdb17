"""Backend registry and dispatch.

Backends are looked up by name; `backend="auto"` walks AUTO_ORDER for the input's device, picks the
first available backend that supports the layer and `prefers` the token count, and falls back to
dense INT8 (then the reference) otherwise. New backends register with `register_backend`.
"""
from __future__ import annotations

import importlib
import os

import torch

from .base import Backend, LayerInfo

# name -> "module:Class"; imported on first use so that a backend's build cost is paid only if asked.
_FACTORIES: dict[str, str] = {
    "reference": "sparse_ofa.backends.reference:ReferenceBackend",
    "dense": "sparse_ofa.backends.dense:DenseInt8Backend",
    "cpu": "sparse_ofa.backends.cpu:CpuBackend",
    "triton": "sparse_ofa.backends.triton:TritonBackend",
    "cuda": "sparse_ofa.backends.cuda:CudaBackend",
}
# Sparse backends tried first under backend="auto", per device type; "dense" and "reference" close
# every chain.
# cuda: Triton first. Measured on an H200 (bench/NOTES.md), the 2:4 CUDA kernel is 1.0-2.2x slower
# than cuBLASLt int8 (Triton's dense route) at every BERT-base shape and token count, so auto uses
# it only where Triton is missing; backend="cuda" still selects it.
AUTO_ORDER: dict[str, list[str]] = {"cpu": ["cpu"], "cuda": ["triton", "cuda"]}
_FALLBACKS = ["dense", "reference"]
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: str, auto_for: tuple[str, ...] = ()) -> None:
    """Register "module:Class" under `name`; `auto_for` lists the device types where auto tries it."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    _ATTENTION.clear()
    for device_type in auto_for:
        order = AUTO_ORDER.setdefault(device_type, [])
        if name not in order:
            order.append(name)


def backend_names() -> list[str]:
    return list(_FACTORIES)


def _instance(name: str) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {backend_names()} or 'auto'")
    if name not in _INSTANCES:
        module, cls = _FACTORIES[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def availability(name: str) -> tuple[bool, str]:
    try:
        return _instance(name).availability()
    except Exception as exc:  # a backend whose import or build fails is unavailable, with the reason
        return False, f"{type(exc).__name__}: {exc}"


def list_backends() -> list[tuple[str, bool, str]]:
    """[(name, available, reason if not)] for every registered backend."""
    return [(name, *availability(name)) for name in _FACTORIES]


def get_backend(name: str) -> Backend:
    """The backend called `name`; raises RuntimeError with the reason if it can't run here."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {backend_names()} or 'auto'")
    ok, why = availability(name)
    if not ok:
        raise RuntimeError(f"sparse_ofa backend {name!r} is not available: {why}")
    return _instance(name)


def resolve(requested: str, device: torch.device, info: LayerInfo) -> list[Backend]:
    """The dispatch chain for a layer: [explicit backend] or the auto candidates, best first."""
    if requested != "auto":
        backend = get_backend(requested)
        if not backend.supports(device, info):
            raise ValueError(f"backend {requested!r} does not run {info.pattern} weights on "
                             f"{device.type} (it runs on {backend.device_types})")
        return [backend]
    chain = []
    for name in AUTO_ORDER.get(device.type, []) + _FALLBACKS:
        if availability(name)[0] and _instance(name).supports(device, info):
            chain.append(_instance(name))
    return chain


# CPython keeps the process environment in a dict of encoded keys behind os.environ; reading it
# directly skips os.environ.get's ~0.5 us exception path for an unset variable (the call plans ask
# for $SPARSE_OFA_CPU_ISA several times per layer). Same values: os.environ writes go through it.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODE_KEY = getattr(os.environ, "encodekey", None)
_DECODE_VALUE = getattr(os.environ, "decodevalue", None)


def env_value(name: str) -> str | None:
    """os.environ.get(name), fast when the variable is unset."""
    if isinstance(_ENVIRON_DATA, dict) and _ENCODE_KEY is not None and _DECODE_VALUE is not None:
        value = _ENVIRON_DATA.get(_encoded_key(name))
        return None if value is None else _DECODE_VALUE(value)
    return os.environ.get(name)


_ENCODED_KEYS: dict[str, object] = {}


def _encoded_key(name: str):
    key = _ENCODED_KEYS.get(name)
    if key is None:
        key = _ENCODED_KEYS[name] = _ENCODE_KEY(name)
    return key


def plan_context() -> tuple:
    """What a cached call plan depends on besides its input: the CPU ISA override and the intra-op
    thread count (backend="auto" has other limits at one thread than at several)."""
    return env_value("SPARSE_OFA_CPU_ISA"), torch.get_num_threads()


_ATTENTION: dict[str, list[Backend]] = {}


def attention_backend(x: torch.Tensor, mask) -> Backend | None:
    """The backend whose attention kernel takes a fused q|k|v like x with this mask (Backend.attention),
    first in AUTO_ORDER for x's device; None where none does (the caller runs torch's SDPA)."""
    device_type = x.device.type
    candidates = _ATTENTION.get(device_type)
    if candidates is None:  # available backends of this device that offer attention, resolved once
        candidates = _ATTENTION[device_type] = [
            _instance(name) for name in AUTO_ORDER.get(device_type, [])
            if availability(name)[0] and type(_instance(name)).attention_runs is not Backend.attention_runs]
    for backend in candidates:
        if backend.attention_runs(x, mask):
            return backend
    return None


def select(chain: list[Backend], m: int, info: LayerInfo) -> Backend:
    """First backend in the chain that expects to win at M tokens; the last one otherwise."""
    for backend in chain[:-1]:
        if backend.prefers(m, info):
            return backend
    return chain[-1]


__all__ = ["Backend", "LayerInfo", "AUTO_ORDER", "register_backend", "backend_names", "list_backends",
           "get_backend", "resolve", "select", "attention_backend", "availability", "plan_context", "env_value"]
