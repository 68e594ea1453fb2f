"""Input pipeline: data sets, transforms, GPU decode and loaders.

Modules (leaves first; none imports this package's ``__init__`` or a module after it in this list):

* :mod:`engine.data.errors`: the error types (``DataError``, ``CorruptImageError``, ...).
* :mod:`engine.data.transforms`: CPU decode and crops (``fast`` and ``torchvision`` building blocks),
  ``to_model_input``.
* :mod:`engine.data.gpu_decode`: the ``gpu`` pipeline (nvjpeg decode, crops on the device).
* :mod:`engine.data.datasets`: ImageFolder scan, synthetic and digits data, samplers, collate.
* :mod:`engine.data.loader`: DataLoader construction and the device prefetcher.
* :mod:`engine.data.pipeline`: the factory: ``cfg.data`` to data sets and loaders.
"""
