"""COCO detection and instance segmentation (paper Sec. 4.3, Tables 3 and 4) on the training engine.

:mod:`.config` the config schema, :mod:`.data` the COCO data set, samplers and the generated shapes demo set,
:mod:`.evaluation` exact distributed COCO evaluation, :mod:`.trainer` the train / eval loops.
"""
