"""FcaNet model zoo: ResNet-18/34/50/101/152 with none/SE/ECA/FCA channel attention.

Public API: :func:`create_model`, :func:`list_models`, :func:`load_weights`.

The names are loaded on first use (PEP 562), so ``import models.dct`` (the frequency orders, used by the
ablation planner) does not import torch or timm. Importing this package makes ``timm.create_model('fcanet50')``
work: the models are registered with timm as soon as timm is imported (now if it already is, otherwise by a
one-shot import hook when it is), instead of importing timm (about 2 s) on every start.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_API = {"create_model": "registry", "list_models": "registry", "count_params": "registry",
        "load_weights": "weights", "read_state_dict": "weights", "LoadReport": "weights",
        "ResNet": "resnet", "AttentionConfig": "resnet",
        "SE": "attention", "ECA": "attention", "FCA": "attention", "DCTPooling": "attention"}
__all__ = ["create_model", "list_models", "load_weights", "read_state_dict", "count_params", "LoadReport",
           "ResNet", "AttentionConfig", "SE", "ECA", "FCA", "DCTPooling"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


def _register_with_timm() -> None:
    try:
        importlib.import_module(f"{__name__}._timm")
    except ImportError:  # timm is optional
        pass


class _TimmImportHook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs timm's own loader, then registers our models: ``import timm`` anywhere later sees them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding this hook again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_with_timm()


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TimmImportHook())
