"""torch.hub entry points: ``torch.hub.load('<owner>/fcanet', 'fcanet50', checkpoint='fca50.pth')``.

Weights are never downloaded: the authors' checkpoints are distributed by hand, so pass the local path of
a checkpoint (ours, torchvision's or the authors' layout) as ``checkpoint``.
"""
dependencies = ["torch", "torchvision"]

from models import create_model as _create_model  # noqa: E402
from models import list_models as _list_models  # noqa: E402
from models import load_weights as _load_weights  # noqa: E402


def _entry(name):
    def build(checkpoint=None, **kwargs):
        model = _create_model(name, **kwargs)
        if checkpoint is not None:
            _load_weights(model, checkpoint)
        return model
    build.__name__ = name
    build.__doc__ = f"{name} (see models.create_model for keyword arguments; checkpoint: optional local path)"
    return build


for _name in _list_models():
    globals()[_name] = _entry(_name)
