"""FcaNet model zoo: ResNet-18/34/50/101/152 with none/SE/ECA/FCA channel attention.

Public API: :func:`create_model`, :func:`list_models`, :func:`load_weights`, :func:`load_checkpoint` (a model
rebuilt from one of the trainer's checkpoints alone).

The names are loaded on first use (PEP 562), so ``import models.dct`` (the frequency orders, used by the
ablation planner) does not import torch or timm. Importing this package makes ``timm.create_model('fcanet50')``
work: the models are registered with timm as soon as timm is imported (now if it already is, otherwise by a
one-shot import hook when it is), instead of importing timm (about 2 s) on every start.
"""
from __future__ import annotations

import importlib

_API = {"create_model": "registry", "list_models": "registry", "count_params": "registry",
        "load_weights": "weights", "read_state_dict": "weights", "LoadReport": "weights",
        "load_checkpoint": "from_checkpoint",
        "ResNet": "resnet", "AttentionConfig": "resnet",
        "SE": "attention", "ECA": "attention", "FCA": "attention", "DCTPooling": "attention"}
__all__ = ["create_model", "list_models", "load_weights", "load_checkpoint", "read_state_dict", "count_params",
           "LoadReport", "ResNet", "AttentionConfig", "SE", "ECA", "FCA", "DCTPooling"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


# ``timm.create_model('fcanet50')`` works once both this package and timm are imported, in either order;
# neither timm nor torch is imported here.
from ._timm import install_import_hook as _install_timm_hook  # noqa: E402

_install_timm_hook()
