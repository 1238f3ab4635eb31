"""Named errors for two silent faults: a calibration loaded into a model built for another
configuration, and NaN in the quantized output.

- :func:`check_calibration_config` compares the configuration label every calibrated point stores
  (``point_config``) with the model's points before anything loads;
  :func:`guard_calibration_config` makes ``model.load_state_dict`` run it first.
- :func:`check_finite_output` turns non-finite quantized logits into an error that names the first
  layer whose output was not finite and says what to do.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import CalibrationConfigError
from .modules import QuantAct, QuantLayerNorm, stored_point_label

__all__ = [
    "NonFiniteOutputError",
    "check_calibration_config",
    "guard_calibration_config",
    "first_nonfinite_layer",
    "check_finite_output",
]

#: How many differing configurations an error message lists.
_SHOWN = 3


class NonFiniteOutputError(FloatingPointError):
    """A quantized forward pass produced NaN or Inf."""


def check_calibration_config(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> None:
    """Raise :class:`CalibrationConfigError` if ``state_dict`` holds a point calibrated for another
    configuration than ``model``'s point of the same name; loads nothing.

    Points the state dict lacks or holds uncalibrated are not compared (a float checkpoint, or one
    saved before calibration, loads into any configuration). The message counts the differing
    points, names the first, lists the configuration pairs and, for a model with a ``qconfig``,
    gives the model's whole configuration.
    """
    differing: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantAct):
            key = f"{prefix}{name}." if name else prefix
            stored = stored_point_label(state_dict, key)
            if stored is not None and stored != module.config.label:
                differing.append((name, stored, module.config.label))
    if not differing:
        return
    pairs = Counter((stored, built) for _, stored, built in differing)
    listed = "; ".join(
        f"{count} point(s) calibrated as {stored}, built as {built}"
        for (stored, built), count in pairs.most_common(_SHOWN)
    )
    qconfig = getattr(model, "qconfig", None)
    built = f" The model is built with {qconfig.describe()}." if qconfig is not None else ""
    name = getattr(model, "model_name", type(model).__name__)
    raise CalibrationConfigError(
        f"the state dict holds a calibration made for another quantization configuration than "
        f"{name}'s: {len(differing)} point(s) differ, first {differing[0][0]!r} ({listed}).{built} "
        "Build the model with the checkpoint's configuration (method, ptf, lis, overrides), or load "
        "only its float weights and recalibrate; nothing was loaded."
    )


def _config_pre_hook(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any
) -> None:
    check_calibration_config(module, state_dict, prefix)


def guard_calibration_config(model: nn.Module) -> nn.Module:
    """Make ``model.load_state_dict`` (also as part of a larger module) run
    :func:`check_calibration_config` before any of its tensors load; returns ``model``.

    Every :class:`QuantAct` refuses a foreign calibration by itself, but only when its turn comes,
    after the modules before it have loaded; the guard refuses before anything changes.
    """
    model.register_load_state_dict_pre_hook(_config_pre_hook)
    return model


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, x: Tensor) -> tuple[str, nn.Module] | None:
    """Run ``model(x)`` and return ``(name, module)`` of the first submodule to finish with a
    non-finite tensor output (the innermost one: a parent finishes after its children), or None."""
    found: list[tuple[str, nn.Module]] = []

    def hook(name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not found and isinstance(output, Tensor) and output.is_floating_point():
                if not bool(torch.isfinite(output).all()):
                    found.append((name, module))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name  # the model itself would only repeat the logits' verdict
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def check_finite_output(model: nn.Module, x: Tensor, output: Tensor) -> None:
    """Raise :class:`NonFiniteOutputError` if ``output = model(x)`` holds NaN or Inf.

    One device-to-host read when the output is finite; otherwise ``model(x)`` runs once more with
    hooks to name the first layer whose output was not finite. For the integer LayerNorm (no
    epsilon, as published: a constant token divides by zero) the message says how to add one.
    """
    if bool(torch.isfinite(output).all()):
        return
    culprit = first_nonfinite_layer(model, x)
    what = "NaN" if bool(torch.isnan(output).any()) else "Inf"
    if culprit is None:
        where = "no layer's output was non-finite when the batch was run again"
        advice = "check the input batch"
    else:
        name, module = culprit
        where = f"the first layer with a non-finite output is {name!r} ({type(module).__name__})"
        if isinstance(module, QuantLayerNorm) and module.integer:
            advice = (
                "the integer LayerNorm has no epsilon (as published) and divides by zero on a "
                "token whose channels are all equal; build the model with an epsilon "
                "(create_model(..., ln_eps=1e-6), CLI --model.ln_eps 1e-6) or without ptf"
            )
        else:
            advice = "check this layer's input and calibration"
    raise NonFiniteOutputError(
        f"the quantized output of {getattr(model, 'model_name', type(model).__name__)} contains "
        f"{what} (input shape {tuple(x.shape)}): {where}; {advice}"
    )
