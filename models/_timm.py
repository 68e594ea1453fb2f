"""Register the FcaNet/SENet/ECANet variants with timm (``timm.create_model('fcanet50')``), lazily.

Importing timm costs seconds, and most users of this package (the trainer, the ablation tool, the tests) never
call it, so ``import models`` does not import timm. Registration happens when both are loaded:

* timm already imported when ``models`` is: :func:`register` runs at once;
* otherwise :func:`install_import_hook` puts a one-shot finder on ``sys.meta_path`` that registers right after
  timm's own import finishes, so ``import models; import timm; timm.create_model('fcanet50')`` works;
* :func:`register` may also be called explicitly (it is idempotent).

ResNet names are left to timm's own ``resnet*`` models, which share torchvision's layout.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable


_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
FAMILIES = ("fcanet", "senet", "ecanet")


def _entrypoint(name: str) -> Callable:
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no downloadable weights; build it, then models.load_weights(model, path)")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        from .registry import create_model
        return create_model(name, **kwargs)
    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"{name} from the fcanet package."
    return build


def register() -> list[str]:
    """Register every ``fcanet*``/``senet*``/``ecanet*`` variant with timm (imports timm); returns the names
    registered now. Idempotent, and never shadows a model timm already ships."""
    from timm.models import is_model, register_model

    from .registry import DEPTHS
    added = []
    for family in FAMILIES:
        for depth in DEPTHS:
            name = f"{family}{depth}"
            if not is_model(name):
                globals()[name] = register_model(_entrypoint(name))
                added.append(name)
    return added


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """One-shot finder: locates ``timm`` with the other finders and wraps its loader so that :func:`register`
    runs once the package has executed. It never changes what is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            try:
                register()
            except Exception as e:  # never break timm's import because of us
                warnings.warn(f"could not register the fcanet models with timm: {e}", RuntimeWarning)

        spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Register with timm now if it is loaded, else as soon as it gets imported (no-op without timm)."""
    if "timm" in sys.modules:
        try:
            register()
        except ImportError:  # a partially importable timm: nothing to register with
            pass
        return
    if importlib.util.find_spec("timm") is None:  # timm is optional
        return
    if not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmImport())
