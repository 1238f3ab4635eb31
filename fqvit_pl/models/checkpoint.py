"""Loading weights into the quantized networks: timm, original-release and our own checkpoints.

Three kinds of state dict load, all strictly (every key accounted for, shapes equal):

- **float** (timm's layout, or a foreign layout timm's ``checkpoint_filter_fn`` converts, e.g. the
  original DeiT/Swin releases ``{"model": ...}``): every float key (parameter or persistent float
  buffer) of the model must be present; only the quantization buffers, which no float checkpoint
  has, may be missing. Any earlier calibration is discarded (it belonged to other weights).
- **full** (our own ``state_dict()``, with quantization buffers): every key must match; the
  calibration state and the quantize flags are restored with it.

Files: ``.safetensors`` through ``safetensors.torch.load_file``, anything else through
``torch.load(map_location="cpu", weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping, NoReturn, Union

import torch
from torch import Tensor, nn

from ..quant import QuantModule, reset_calibration

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "extract_state_dict",
    "quant_state_keys",
]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]

#: How many keys of each kind an error message lists.
_SHOWN = 5
#: Keys whose tensors timm's filters silently resample when their shape differs from the model's.
_RESAMPLED_SUFFIXES = ("patch_embed.proj.weight", "relative_position_bias_table")
_RESAMPLED_KEYS = ("pos_embed",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not a state dict, or does not fit the model."""


def _read_error(path: Path, err: Exception) -> str:
    """Why ``path`` could not be read, without torch's advice to load it unsafely."""
    if path.stat().st_size == 0:
        return "the file is empty (an interrupted save?): write it again"
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return (
            "it holds Python objects other than tensors and plain containers, which this project "
            "never loads (loading them can run code): re-save only the tensors, e.g. "
            "torch.save(model.state_dict(), path), or use a .safetensors file"
        )
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    if "weights_only" in detail:
        detail = ""
    return (
        f"it is not a .safetensors file or a torch.save'd state dict ({type(err).__name__}"
        f"{': ' + detail if detail else ''}): check that the file is complete and is a checkpoint"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint file on the CPU without executing pickled code.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for one that
    cannot be read (empty, not a checkpoint, or holding objects that only unsafe loading builds).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors have no common base
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {_read_error(path, err)}"
        ) from err


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside ``obj``: ``obj`` itself, or its ``"model"`` / ``"state_dict"`` entry.

    Raises :class:`CheckpointError` unless the result is a non-empty mapping of names to tensors.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{source} is not a state dict: expected a mapping of parameter names to tensors (possibly under a "
            f"'model' or 'state_dict' key), got {what}"
        )
    bad = [
        key
        for key, value in obj.items()
        if not isinstance(key, str) or not isinstance(value, Tensor)
    ]
    if bad:
        key = bad[0]
        raise CheckpointError(
            f"{source} is not a state dict: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} are not tensors named by "
            f"strings, first {key!r} → {type(obj[key]).__name__}"
        )
    return dict(obj)


def quant_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the quantization state (observers, quantizers, flags): buffers inside quantized layers."""
    parameters = {name for name, _ in model.named_parameters()}
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, QuantModule):
            for key in module.state_dict(prefix=f"{prefix}." if prefix else ""):
                if key not in parameters:
                    keys.add(key)
    return keys


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _fit_report(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """Empty when ``state`` has exactly ``expected``'s keys and shapes, else the first differences."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state and _shape(state[k]) != _shape(expected[k])
    ]
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
    ):
        if items:
            parts.append(f"{len(items)} {label} key(s), first {items[:_SHOWN]}")
    return "; ".join(parts)


def _raise_misfit(
    source: str, model: nn.Module, report: str, kind: str, extra: str = ""
) -> NoReturn:
    name = getattr(model, "model_name", type(model).__name__)
    raise CheckpointError(
        f"{source} does not fit {name} as a {kind}: {report}. A checkpoint of another architecture or size shows "
        f"up as missing/unexpected keys and shape mismatches; nothing was loaded.{extra}"
    )


def _check_not_resampled(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, model: nn.Module
) -> None:
    """Refuse what timm's filters would silently resample (another patch, grid or window size)."""
    for key, value in state.items():
        if key in expected and (key in _RESAMPLED_KEYS or key.endswith(_RESAMPLED_SUFFIXES)):
            target = expected[key]
            # timm's old linear patch embedding [O, I*p*p] is a reshape, not a resample.
            reshaped = (
                key.endswith("patch_embed.proj.weight")
                and value.dim() < 4
                and value.numel() == target.numel()
            )
            if _shape(value) != _shape(target) and not reshaped:
                _raise_misfit(source, model, _fit_report(state, expected), "float checkpoint")


def _convert(
    model: nn.Module, state: dict[str, Tensor], float_state: Mapping[str, Tensor], source: str
) -> dict[str, Tensor]:
    """Apply the model family's timm checkpoint filter (identity for a model without one)."""
    convert = getattr(model, "filter_checkpoint", None)
    if convert is None:
        return state
    try:
        return convert(state)
    except (
        Exception
    ) as err:  # the filters index the model with checkpoint keys: a misfit surfaces as any error
        _raise_misfit(
            source,
            model,
            _fit_report(state, float_state) or "no key difference",
            "float checkpoint",
            f" (timm's checkpoint filter failed: {type(err).__name__}: {err})",
        )


@torch.no_grad()
def load_checkpoint(
    model: nn.Module, checkpoint: Checkpoint, *, source: str | None = None
) -> nn.Module:
    """Load ``checkpoint`` (a file path or a state dict) into ``model`` strictly; returns ``model``.

    A float checkpoint (timm layout, or one timm's family filter converts) sets the weights and
    resets the calibration; our own full state dict also restores the calibration state. Raises
    :class:`CheckpointError` for an unreadable file, a non-state-dict, or keys that do not fit (the
    message names ``source``/the file and lists the first missing, unexpected and mis-shaped keys),
    and ``FileNotFoundError`` for a missing file.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or f"checkpoint {os.fspath(checkpoint)!r}"
        obj = read_checkpoint(checkpoint)
    else:
        source = source or "state dict"
        obj = checkpoint
    state = extract_state_dict(obj, source)
    model_state = model.state_dict()
    quant_keys = quant_state_keys(model)
    if any(key in quant_keys for key in state):
        report = _fit_report(state, model_state)
        if report:
            _raise_misfit(
                source,
                model,
                report,
                "full state dict (weights + calibration state)",
                " Calibration state only loads into a model built with the same method, ptf and lis.",
            )
        model.load_state_dict(state, strict=True)
        return model
    float_state = {key: value for key, value in model_state.items() if key not in quant_keys}
    _check_not_resampled(state, float_state, source, model)
    converted = _convert(model, state, float_state, source)
    report = _fit_report(converted, float_state)
    if report:
        _raise_misfit(source, model, report, "float checkpoint")
    reset_calibration(model)
    full = model.state_dict()
    full.update(converted)
    model.load_state_dict(full, strict=True)
    return model
