"""inspectd training: datasets and splits, augmentation, the training loop, evaluation, calibration, export.

Needs the ``train`` extra (torch, torchvision, onnx). Never imported by the daemon at run time.
"""
