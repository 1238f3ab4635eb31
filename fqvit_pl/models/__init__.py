"""fqvit_pl.models: quantized ViT, DeiT and Swin that load timm's weights under timm's parameter names.

``create_model(name, method=..., ptf=..., lis=..., pretrained=..., checkpoint_path=...)`` builds one of
the eight networks of the published table (:func:`list_models`); :func:`load_checkpoint` loads timm,
original-release or our own checkpoints strictly; :func:`create_eval_transform` is the §10
preprocessing of a model. Before :func:`fqvit_pl.quant.calibrate` a network computes in float and
equals timm's model with the same weights. Section numbers refer to ``docs/method.md``.
"""

from .checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_checkpoint,
    quant_state_keys,
    read_checkpoint,
)
from .factory import create_model, use_fast_float_ops
from .preprocess import create_eval_transform, resolve_data_config
from .registry import MODELS, ModelSpec, get_model_spec, list_models, resolve_model_name
from .swin import QuantSwinTransformer
from .vit import QuantVisionTransformer

__all__ = [
    "create_model",
    "use_fast_float_ops",
    "list_models",
    "get_model_spec",
    "resolve_model_name",
    "ModelSpec",
    "MODELS",
    "load_checkpoint",
    "read_checkpoint",
    "extract_state_dict",
    "quant_state_keys",
    "CheckpointError",
    "resolve_data_config",
    "create_eval_transform",
    "QuantVisionTransformer",
    "QuantSwinTransformer",
]
