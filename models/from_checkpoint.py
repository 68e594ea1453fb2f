"""Rebuild a trained model from one of the trainer's checkpoint files alone.

The trainer's checkpoints (``checkpoints/last.pth``, ``last.prev.pth`` and ``best.pth``) record the
:func:`models.create_model` call that built their model under ``arch`` (``name``, ``num_classes`` and the
options, ``input_size`` included) and the class names in label order under ``classes``, so neither the run's
config nor hidden options such as the demo's ``input_size=32`` are needed::

    import models
    model = models.load_checkpoint("runs/fcanet_digits/checkpoints/best.pth")  # eval mode, CPU
"""
from __future__ import annotations

import os

from torch import nn

from .registry import create_model
from .weights import load_failure_reason, load_weights, torch_load_quiet


def load_checkpoint(path: str | os.PathLike) -> nn.Module:
    """The model a trainer checkpoint describes, with its weights, in eval mode on the CPU.

    Args:
        path: a ``last.pth``, ``last.prev.pth`` or ``best.pth`` written by ``train_imagenet.py``.

    Raises:
        ValueError: one line naming the file: not found, unreadable, not one of the trainer's checkpoints
            (e.g. the authors' or torchvision's weights: build the model with :func:`models.create_model`, then
            :func:`models.load_weights`), a model that cannot be built, or weights that do not fit it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        obj = torch_load_quiet(path)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, wrong file type, foreign pickle
        raise ValueError(f"checkpoint {path} {load_failure_reason(path, e)}") from None
    arch = obj.get("arch") if isinstance(obj, dict) else None
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs"), dict)
            and isinstance(obj.get("model"), dict)):
        raise ValueError(f"checkpoint {path} does not describe its model (no 'arch' entry): it is not a checkpoint "
                         "of this project's trainer; build the model with models.create_model, then "
                         "models.load_weights")
    try:
        model = create_model(arch["name"], num_classes=arch.get("num_classes", 1000), **arch["kwargs"])
        report = load_weights(model, obj["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"checkpoint {path}: {str(e).strip(chr(39)).splitlines()[0]}") from None
    if report.new:
        raise ValueError(f"checkpoint {path} lacks {len(report.new)} weight(s) of its model {arch['name']} "
                         f"(e.g. {report.new[0]})")
    return model.eval()
