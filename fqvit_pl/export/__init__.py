"""Deployable artifacts of a calibrated FQ-ViT model.

- :func:`save_quantized` / :func:`load_quantized`: one safetensors file with the integer model
  (int8 weights, scales, zero points, PTF and LIS settings, metadata); loads without float weights,
  download, calibration data or pickle.
- :func:`export_onnx`: an ONNX graph of the integer model for ONNX Runtime (needs the ``onnx``
  extra: ``pip install fqvit_pl[onnx]``).
"""

from .artifact import (
    FORMAT,
    FORMAT_VERSION,
    ArtifactCorruptError,
    ArtifactError,
    ArtifactMismatchError,
    ArtifactVersionError,
    as_integer_model,
    load_quantized,
    read_metadata,
    save_quantized,
)

__all__ = [
    "save_quantized",
    "load_quantized",
    "read_metadata",
    "as_integer_model",
    "export_onnx",
    "ArtifactError",
    "ArtifactCorruptError",
    "ArtifactVersionError",
    "ArtifactMismatchError",
    "FORMAT",
    "FORMAT_VERSION",
]


def __getattr__(name: str):  # export_onnx imports onnx only when asked for
    if name == "export_onnx":
        from .onnx_graph import export_onnx

        return export_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
