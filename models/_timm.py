"""Register the FcaNet/SENet/ECANet variants with timm (``timm.create_model('fcanet50')``).

ResNet names are left to timm's own ``resnet*`` models, which share torchvision's layout.
"""
from __future__ import annotations

from timm.models import register_model

from .registry import DEPTHS, create_model

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str):
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no downloadable weights; build it, then models.load_weights(model, path)")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)
    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"{name} from the fcanet package."
    return build


def _register_all() -> None:
    from timm.models import is_model
    for family in ("fcanet", "senet", "ecanet"):
        for depth in DEPTHS:
            name = f"{family}{depth}"
            if not is_model(name):  # idempotent; never shadow a model timm already ships
                globals()[name] = register_model(_entrypoint(name))


_register_all()
