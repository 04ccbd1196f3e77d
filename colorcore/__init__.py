"""Colorful Image Colorization (Zhang, Isola, Efros, ECCV 2016) in pure PyTorch.

Modules: ``color`` (sRGB <-> Lab), ``quantize`` (ab bins, soft encoding), ``prior``
(ab histograms, rebalancing), ``model`` (the network), ``loss``, ``decode``,
``metrics`` and ``weights`` (checkpoints and the released ECCV16 weights).
Nothing here imports Ray or touches files or devices at import time.
"""
