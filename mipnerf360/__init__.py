"""Mip-NeRF 360 (with Ref-NeRF and RawNeRF) in PyTorch.

Module layout mirrors multinerf's ``internal/`` package: ``math``, ``stepfun``, ``coord``, ``geopoly``,
``render``, ``ref_utils``, ``image``, ``camera_utils``, ``models``, ``train_utils``, ``datasets``, ...
"""

__version__ = "0.1.0"
