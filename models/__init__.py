"""FcaNet model zoo: ResNet-18/34/50/101/152 with none/SE/ECA/FCA channel attention.

Public API: :func:`create_model`, :func:`list_models`, :func:`load_weights`.
"""
from .attention import ECA, FCA, SE, DCTPooling
from .registry import count_params, create_model, list_models
from .resnet import AttentionConfig, ResNet
from .weights import LoadReport, load_weights, read_state_dict

__all__ = ["create_model", "list_models", "load_weights", "read_state_dict", "count_params", "LoadReport",
           "ResNet", "AttentionConfig", "SE", "ECA", "FCA", "DCTPooling"]

# ``timm.create_model('fcanet50')`` works once both this package and timm are imported, in either order;
# timm itself (seconds of start-up) is not imported here.
from ._timm import install_import_hook as _install_timm_hook  # noqa: E402

_install_timm_hook()
