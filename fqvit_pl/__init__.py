"""fqvit_pl: FQ-ViT fully quantized vision transformers, calibrated and evaluated with PyTorch Lightning.

``fqvit_pl.quant`` holds the quantization parts (no Lightning import); ``fqvit_pl.models`` the
quantized ViT/DeiT/Swin; ``fqvit_pl.callbacks`` the reusable calibration callback. Section
numbers (§N) in docstrings and messages refer to ``docs/method.md``, which states every formula.
"""

__version__ = "0.1.0"
