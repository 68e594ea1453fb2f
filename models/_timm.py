"""Register the model zoo with timm: after ``models.register_timm()``, ``timm.create_model('fcanet50')`` works.

Importing timm costs seconds, and most users of this package (the trainer, the ablation tool, the tests) never
need it, so nothing here runs at ``import models``: callers that want timm names call
:func:`models.register_timm` (idempotent) once.

Plain ResNet names are left to timm's own ``resnet*`` models, which share torchvision's layout, and a name timm
already ships is never shadowed.
"""
from __future__ import annotations

from collections.abc import Callable

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


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


def families() -> list[str]:
    """The families registered with timm: every one but the plain ResNet."""
    from .registry import FAMILIES
    return [f for f in FAMILIES if f != "resnet"]


def register() -> list[str]:
    """Register every variant of :func:`families` with timm (imports timm); returns the names registered by
    this call (empty on a repeated call). Never shadows a model timm already ships."""
    from timm.models import is_model, register_model

    from .registry import DEPTHS
    added = []
    for family in families():
        for depth in DEPTHS:
            name = f"{family}{depth}"
            if not is_model(name):
                globals()[name] = register_model(_entrypoint(name))
                added.append(name)
    return added
