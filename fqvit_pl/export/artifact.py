"""The int8 artifact: one safetensors file holding an integer model and everything needed to rebuild it.

Tensors: the integer model's persistent buffers (int8 weights, float32 biases, scales and zero
points of every quantization point, PTF LayerNorm gamma/beta, uint8 position-embedding codes, ...).
Metadata (safetensors' string map): the format and its version, the ``integer_config`` (architecture,
its arguments and the full quantization configuration, LIS settings included), the §10 data config,
the class count and the package version. Loading reads no pickle, downloads nothing and needs no
float weights: :func:`fqvit_pl.quant.integer.build_integer_model` rebuilds the empty model from the
metadata and the tensors fill it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArtifactError",
    "ArtifactCorruptError",
    "ArtifactVersionError",
    "ArtifactMismatchError",
    "as_integer_model",
    "save_quantized",
    "load_quantized",
    "read_metadata",
]

#: The ``format`` metadata entry of every artifact.
FORMAT = "fqvit_pl.int8"
#: Bumped whenever the tensor names or the metadata change incompatibly.
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact file that cannot be loaded; the message names the file and what to do."""


class ArtifactCorruptError(ArtifactError):
    """Not a complete safetensors file (truncated, damaged, or another kind of file)."""


class ArtifactVersionError(ArtifactError):
    """Another artifact format (or format version) than this package reads."""


class ArtifactMismatchError(ArtifactError):
    """Metadata that does not describe the file's tensors (names, shapes or dtypes differ)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """A LightningModule holding the network as ``net`` (``QuantViTModule``) → the network."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def as_integer_model(model: nn.Module) -> nn.Module:
    """The integer model of ``model``: itself if it is one, else ``to_integer(model)``.

    ``model`` is an integer model (:func:`fqvit_pl.quant.to_integer`, :func:`load_quantized`), a
    calibrated network of :func:`fqvit_pl.models.create_model`, or a LightningModule holding one as
    ``net``. Raises :class:`fqvit_pl.quant.IntegerConversionError` for anything else (an
    uncalibrated model included).
    """
    from ..quant import to_integer

    model = _unwrap(model)
    if isinstance(getattr(model, "integer_config", None), dict):
        return model
    return to_integer(model)


def _data_config(source: nn.Module, integer: nn.Module) -> dict[str, Any]:
    """The §10 preprocessing of the model (its ``pretrained_cfg``, else the family's defaults)."""
    from ..models import resolve_data_config

    cfg = getattr(source, "pretrained_cfg", None) or getattr(integer, "pretrained_cfg", None)
    config = integer.integer_config
    if not cfg:
        height = int(config["arch"]["img_size"][0])
        cfg = resolve_data_config(config["model_name"], img_size=height)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in keys}


@torch.no_grad()
def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``model``'s integer model to one safetensors file at ``path``; returns its metadata.

    ``model``: an integer model, a calibrated ``create_model`` network (converted with
    :func:`fqvit_pl.quant.to_integer`; the input is left untouched) or a LightningModule holding
    one as ``net``. :func:`load_quantized` rebuilds the same model from the file alone.
    """
    from .. import __version__

    source = _unwrap(model)
    integer = as_integer_model(source)
    config = integer.integer_config
    tensors = {k: v.detach().cpu().contiguous() for k, v in integer.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "integer_config": json.dumps(config, sort_keys=True),
        "data_config": json.dumps(_data_config(source, integer), sort_keys=True),
        "architecture": str(config["model_name"]),
        "num_classes": str(config["num_classes"]),
        "package_version": __version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # written by a plain open(): safetensors' save_file creates the file readable by its owner
    # only, and an artifact is made to be shared
    with open(path, "wb") as f:
        f.write(save(tensors, metadata=metadata))
    return metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an artifact, checked for its format and version (tensors are not read).

    Raises:
        FileNotFoundError: no such file.
        ArtifactCorruptError: not a complete safetensors file.
        ArtifactVersionError: another format or format version.
    """
    metadata, _ = _open(path, read_tensors=False)
    return metadata


def _open(
    path: str | os.PathLike[str], read_tensors: bool
) -> tuple[dict[str, str], dict[str, Tensor]]:
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"quantized model file {name!r} does not exist")
    try:
        with safe_open(name, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ArtifactCorruptError(
            f"{name}: not a complete safetensors file (truncated or damaged?): {error}. "
            "Write it again with fqvit_pl.export.save_quantized."
        ) from error
    if metadata.get("format") != FORMAT:
        raise ArtifactVersionError(
            f"{name}: not an fqvit_pl int8 artifact (format {metadata.get('format')!r}, expected "
            f"{FORMAT!r}); save one with fqvit_pl.export.save_quantized"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactVersionError(
            f"{name}: artifact format version {metadata.get('format_version')!r}; this fqvit_pl "
            f"({_package_version()}) reads version {FORMAT_VERSION}: save it again with this version, "
            f"or load it with the fqvit_pl {metadata.get('package_version', '?')} that wrote it"
        )
    return metadata, tensors


def _package_version() -> str:
    from .. import __version__

    return __version__


def _json(metadata: Mapping[str, str], key: str, name: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as error:
        raise ArtifactMismatchError(
            f"{name}: metadata entry {key!r} is missing or not JSON ({error})"
        ) from error


def _check_tensors(
    expected: Mapping[str, Tensor], tensors: Mapping[str, Tensor], name: str
) -> None:
    """Every tensor the description implies is in the file with its shape and dtype, and no other."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if want.shape != got.shape or want.dtype != got.dtype:
            problems.append(
                f"{key}: file has {got.dtype} {tuple(got.shape)}, the metadata implies "
                f"{want.dtype} {tuple(want.shape)}"
            )
    if problems:
        raise ArtifactMismatchError(
            f"{name}: the metadata does not describe the tensors of this file: "
            + "; ".join(problems[:8])
        )


def load_quantized(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the integer model saved by :func:`save_quantized` from the file alone.

    No pickle, no download, no float weights, no calibration data. Returns the model in eval mode
    (``[B, C, H, W]`` images → ``[B, num_classes]`` logits, equal bit for bit to the saved model's);
    its ``pretrained_cfg`` is the saved §10 data config (for :func:`fqvit_pl.models.create_eval_transform`).

    Raises:
        FileNotFoundError: no such file.
        ArtifactCorruptError: truncated or damaged file.
        ArtifactVersionError: another format or format version.
        ArtifactMismatchError: metadata that does not describe the tensors.
    """
    from ..quant.integer import build_integer_model

    name = os.fspath(path)
    metadata, tensors = _open(path, read_tensors=True)
    config = _json(metadata, "integer_config", name)
    data_config = _json(metadata, "data_config", name)
    if str(config.get("num_classes")) != metadata.get("num_classes") or config.get(
        "model_name"
    ) != metadata.get("architecture"):
        raise ArtifactMismatchError(
            f"{name}: metadata entries disagree: architecture/num_classes "
            f"{metadata.get('architecture')!r}/{metadata.get('num_classes')!r} vs the integer_config's "
            f"{config.get('model_name')!r}/{config.get('num_classes')!r}"
        )
    try:
        model = build_integer_model(config)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactMismatchError(
            f"{name}: its integer_config does not describe a model this fqvit_pl builds: {error!r}"
        ) from error
    _check_tensors(model.state_dict(), tensors, name)
    model.load_state_dict(tensors, strict=True)
    model.pretrained_cfg = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()
    }
    model.pretrained_cfg["num_classes"] = config["num_classes"]
    return model.eval()
