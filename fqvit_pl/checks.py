"""Checks of a run's inputs before any work is done: output paths, precision, checkpoints, data.

Each check raises an error that names the option or file at fault and says what to do. The
Lightning parts (CLI, callbacks, module) call them from their earliest hooks, so a wrong input
stops a run before it builds, downloads, calibrates or evaluates anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

__all__ = [
    "check_int",
    "check_writable_file",
    "check_precision",
    "check_data_root",
    "check_num_classes",
    "read_lightning_checkpoint",
    "hparam_conflicts",
    "check_checkpoint_hparams",
    "FLOAT32_PRECISIONS",
    "RUN_OPTIONS",
]


def check_int(name: str, value: int, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming the option unless ``value`` is an int ``>= minimum`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


#: Trainer precisions that keep the network in float32 (fake quantization is defined in float32).
FLOAT32_PRECISIONS = ("32", "32-true")
#: ``ckpt_path`` values Lightning resolves itself (no file to read).
_CKPT_KEYWORDS = ("last", "best", "hpc")


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def check_writable_file(path: str | os.PathLike[str], option: str) -> None:
    """Raise unless a file can be written at ``path`` (``option`` names the setting in the message).

    The file may exist (then it must be a writable regular file) or not (then its nearest existing
    ancestor must be a folder in which a file can be created: probed by creating and removing a
    temporary file, which also catches read-only file systems and root's privileges).

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: a parent of ``path`` is a file.
        PermissionError: the file or its folder cannot be written.
    """
    path = os.fspath(path)
    fix = f"choose another {option}"
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{option} {path!r} is a folder: give a file name, e.g. {path}/file"
        )
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{option} {path!r} exists and is not writable: {fix}")
        return
    ancestor = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(
            f"{option} {path!r} cannot be created: {ancestor!r} is a file, not a folder; {fix}"
        )
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise PermissionError(
            f"{option} {path!r} cannot be created: no file can be written in {ancestor!r} "
            f"({err.strerror or err}); {fix}"
        ) from err


def check_precision(precision: Any, option: str = "--trainer.precision") -> None:
    """Raise ``ValueError`` unless ``precision`` keeps the network in float32.

    Fake quantization (and its integer LayerNorm / Log-Int-Softmax) is defined in float32: half
    precision changes the rounding of every scale, and ``16-true`` does not run at all.
    """
    if str(precision) not in FLOAT32_PRECISIONS:
        raise ValueError(
            f"{option} {precision!r} is not supported: fake quantization is defined in float32. "
            f"Set {option} 32 (in Python: Trainer(precision='32-true'))."
        )


def check_data_root(root: Any, option: str = "--data.root") -> None:
    """Raise ``FileNotFoundError`` unless ``root`` is an existing folder."""
    if root is None or not os.path.isdir(os.fspath(root)):
        raise FileNotFoundError(
            f"{option} {root!r} does not exist or is not a folder: give the dataset folder "
            "(holding train/ and val/)"
        )


def check_num_classes(dataset_classes: int, head_classes: int, source: str) -> None:
    """Raise ``ValueError`` when the dataset's class count differs from the classifier's."""
    if dataset_classes != head_classes:
        raise ValueError(
            f"{source} has {dataset_classes} classes but the model's classifier has {head_classes} "
            f"(--model.num_classes): set --model.num_classes {dataset_classes}, or point the data "
            "at a dataset with the classes the model was built for"
        )


def read_lightning_checkpoint(path: str, option: str = "--ckpt_path") -> Optional[dict[str, Any]]:
    """Read the Lightning checkpoint ``path`` safely (``weights_only=True``); ``None`` for a keyword.

    Returns ``None`` for what Lightning resolves itself (``last``, ``best``, ``hpc``, ``registry``
    and remote URLs). Raises ``FileNotFoundError`` for a missing file and
    :class:`~fqvit_pl.models.CheckpointError` for an unreadable file or a file that is a plain
    state dict rather than a Lightning checkpoint.
    """
    if path in _CKPT_KEYWORDS or path.startswith("registry") or "://" in path:
        return None
    from fqvit_pl.models.checkpoint import CheckpointError, read_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{option} {path!r} does not exist: give a checkpoint written by fit or by "
            "--calibration.save_path"
        )
    try:
        obj = read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{option}: {err}") from err
    if (
        not isinstance(obj, dict)
        or "state_dict" not in obj
        or "pytorch-lightning_version" not in obj
    ):
        raise CheckpointError(
            f"{option} {path!r} is not a Lightning checkpoint (no 'state_dict' and "
            "'pytorch-lightning_version' entries; a plain state dict of weights?). Load float "
            f"weights with --model.checkpoint_path {path} (they are then calibrated), or give "
            "a checkpoint written by fit or by --calibration.save_path."
        )
    return obj


def _normalized(value: Any) -> Any:
    # YAML gives lists where Python code gave tuples; None and {} both mean "no extra arguments".
    if value is None or value == {}:
        return None
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def hparam_conflicts(
    stored: Mapping[str, Any], given: Mapping[str, Any], keys: Sequence[str]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, given value)}`` for each of ``keys`` whose values differ."""
    return {
        key: (stored.get(key), given.get(key))
        for key in keys
        if key in stored and _normalized(stored.get(key)) != _normalized(given.get(key))
    }


#: Module hyperparameters a command line may change when it evaluates or resumes a checkpoint:
#: where the initial weights come from (the checkpoint replaces them) and how the run measures.
#: Every other stored hyperparameter defines the network and must match the command line.
RUN_OPTIONS = frozenset(
    {
        "pretrained",
        "checkpoint_path",
        "fp_agreement",
        "label_smoothing",
        "execution",
        "optimizer",
        "lr_scheduler",
    }
)


def check_checkpoint_hparams(
    ckpt_path: Optional[str], given: Mapping[str, Any], option: str = "--ckpt_path"
) -> None:
    """Raise unless the Lightning checkpoint at ``ckpt_path`` was written for the model ``given``.

    ``given`` maps the module's argument names to the command line's values. Every hyperparameter
    stored in the checkpoint except :data:`RUN_OPTIONS` must equal the command line's value: a
    checkpoint must not silently replace the model, method or bits the command line asked for.

    Raises:
        ValueError: listing each differing key with both values and the flags that select the
            checkpoint's configuration; also the errors of :func:`read_lightning_checkpoint`.
    """
    if not ckpt_path:
        return
    checkpoint = read_lightning_checkpoint(os.fspath(ckpt_path), option)
    if checkpoint is None:
        return
    stored = checkpoint.get("hyper_parameters") or {}
    keys = [key for key in stored if not key.startswith("_") and key not in RUN_OPTIONS]
    conflicts = hparam_conflicts(stored, given, keys)
    if conflicts:
        listing = "; ".join(
            f"model.{key}: checkpoint {ckpt!r}, command line {cli!r}"
            for key, (ckpt, cli) in conflicts.items()
        )
        flags = " ".join(
            f"--model.{key} {json.dumps(ckpt) if not isinstance(ckpt, str) else ckpt}"
            for key, (ckpt, _) in conflicts.items()
        )
        raise ValueError(
            f"{option} {ckpt_path!r} was written for another model than the command line "
            f"describes ({listing}). Nothing was run. To evaluate the checkpoint as it is, add "
            f"{flags}; otherwise give the checkpoint of the configuration you asked for."
        )
