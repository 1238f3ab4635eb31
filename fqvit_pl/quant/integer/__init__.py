"""Integer execution of a calibrated FQ-ViT model (docs/method.md §12, docs/integer.md).

``to_integer(model)`` converts a calibrated network of :func:`fqvit_pl.models.create_model` into a
module that runs on integer codes: int8 GEMMs with int32 accumulation, ``q @ k^T``, Log-Int-Softmax
and ``attn @ V`` on codes, the PTF LayerNorm with integer statistics. Its state is plain tensors
plus ``integer_config``; :func:`build_integer_model` rebuilds an empty one from that description.
Does not import Lightning.
"""

from . import kernels
from .compiled import CompiledIntegerModel, compile_integer
from .convert import IntegerConversionError, to_integer
from .layers import IntegerAttention, IntegerLayerNorm, IntegerLinear, IntegerMlp, IntPoint
from .models import IntegerSwin, IntegerViT, build_integer_model

__all__ = [
    "to_integer",
    "compile_integer",
    "CompiledIntegerModel",
    "IntegerConversionError",
    "build_integer_model",
    "IntegerViT",
    "IntegerSwin",
    "IntPoint",
    "IntegerLinear",
    "IntegerLayerNorm",
    "IntegerAttention",
    "IntegerMlp",
    "kernels",
]
