"""FcaNet model zoo: ResNet-10/18/34/50/101/152 with none/SE/ECA/FCA/CBAM/GC/GSoP attention.

Public API: :func:`create_model`, :func:`list_models`, :func:`model_options`, :func:`load_weights`,
:func:`load_checkpoint` (a model rebuilt from one of the trainer's checkpoints alone), :func:`register_timm`.

The names are loaded on first use (PEP 562), so ``import models`` (and ``import models.dct``, the frequency orders
the ablation planner uses) imports neither torch nor timm. ``timm.create_model('fcanet50')`` works after
:func:`register_timm`.
"""
from __future__ import annotations

import importlib

_API = {"create_model": "registry", "list_models": "registry", "count_params": "registry",
        "model_options": "registry",
        "load_weights": "weights", "read_state_dict": "weights", "LoadReport": "weights",
        "load_checkpoint": "from_checkpoint",
        "ResNet": "resnet", "AttentionConfig": "resnet",
        "SE": "attention", "ECA": "attention", "FCA": "attention", "DCTPooling": "attention",
        "CBAM": "attention", "GlobalContext": "attention", "GSoP": "attention"}
__all__ = ["create_model", "list_models", "model_options", "load_weights", "load_checkpoint", "read_state_dict",
           "count_params", "LoadReport", "ResNet", "AttentionConfig", "SE", "ECA", "FCA", "DCTPooling", "CBAM",
           "GlobalContext", "GSoP", "register_timm"]


def register_timm() -> list[str]:
    """Register every attention family (``fcanet*``, ``senet*``, ``ecanet*``, ``cbam*``, ``gcnet*``,
    ``gsopnet*``) with timm's model registry, so that ``timm.create_model('fcanet50')`` builds ours. Imports
    timm; idempotent (returns the names this call added: none the second time); never shadows a timm model."""
    from ._timm import register
    return register()


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
