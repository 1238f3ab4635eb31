"""Model-level API, no Lightning needed: the calibration protocol of §9 and the quantization switch."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .modules import QuantAct, QuantModule
from .reduce import DistributedReducer, LocalReducer, StatReducer, use_reducer

__all__ = [
    "quant_modules",
    "calibrate",
    "enable_quantization",
    "disable_quantization",
    "reset_calibration",
    "is_calibrated",
    "default_reducer",
    "calibration_checksum",
]


def quant_modules(model: nn.Module) -> list[QuantModule]:
    """Every quantized layer of ``model``, named after its path (for error messages)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            module.set_name(name or type(module).__name__)
            found.append(module)
    return found


def _require_quant_modules(model: nn.Module, action: str) -> list[QuantModule]:
    modules = quant_modules(model)
    if not modules:
        raise ValueError(
            f"cannot {action} {type(model).__name__}: it contains no fqvit_pl.quant layers"
        )
    return modules


def is_calibrated(model: nn.Module) -> bool:
    """Whether every quantization point of ``model`` has its parameters."""
    return all(m.is_calibrated for m in quant_modules(model))


def enable_quantization(model: nn.Module) -> nn.Module:
    """Switch fake quantization (and integer LayerNorm / Log-Int-Softmax) on everywhere.

    Raises ``RuntimeError`` naming the first uncalibrated point, before changing anything.
    """
    modules = _require_quant_modules(model, "quantize")
    for module in modules:
        if not module.is_calibrated:
            raise RuntimeError(
                f"{module.qname}: cannot quantize before calibration (run fqvit_pl.quant.calibrate first)"
            )
    for module in modules:
        module.set_quantization(True)
    return model


def disable_quantization(model: nn.Module) -> nn.Module:
    """Switch fake quantization off everywhere: the model computes in float again (parameters kept)."""
    for module in _require_quant_modules(model, "dequantize"):
        module.set_quantization(False)
    return model


def reset_calibration(model: nn.Module) -> nn.Module:
    """Forget every observed statistic and computed parameter of ``model``; quantization off."""
    for module in _require_quant_modules(model, "reset"):
        module.reset_calibration()
    return model


def default_reducer() -> StatReducer:
    """Merge statistics over the default process group when one is initialized, else locally."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedReducer()
    return LocalReducer()


def _with_last_flag(batches: Iterable[Any], reducer: StatReducer) -> Iterator[tuple[Any, bool]]:
    """Yield ``(batch, is_last)``; every rank must agree on which batch is the last."""
    iterator = iter(batches)
    sentinel = object()
    current = next(iterator, sentinel)
    while current is not sentinel:
        upcoming = next(iterator, sentinel)
        last = upcoming is sentinel
        if reducer.distributed:
            flag = torch.tensor([float(last)])
            if reducer.reduce(flag, "min").item() != reducer.reduce(flag, "max").item():
                raise RuntimeError(
                    "calibration: the processes have different numbers of calibration batches; "
                    "every rank must observe the same number of batches"
                )
        yield current, last
        current = upcoming


def calibration_checksum(model: nn.Module) -> int:
    """A 63-bit digest of every quantization buffer of ``model`` (identical models give equal digests)."""
    digest = hashlib.sha256()
    for module in quant_modules(model):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def _check_ranks_agree(model: nn.Module, reducer: StatReducer) -> None:
    if not reducer.distributed:
        return
    checksum = torch.tensor([calibration_checksum(model)], dtype=torch.long)
    if not torch.equal(reducer.reduce(checksum, "min"), reducer.reduce(checksum, "max")):
        raise RuntimeError(
            "calibration: the processes ended with different quantization parameters "
            "(their calibration checksums differ); the merged statistics are inconsistent. A point "
            "built with QuantAct(..., replicated_input=True) must see the same tensor on every "
            "process; one whose input differs between processes must not be declared so"
        )


def _check_batch(batch: Any, index: int, dtype: torch.dtype | None) -> None:
    """Refuse an empty tensor batch, or one not in the model's float dtype (others: forward's job)."""
    if not isinstance(batch, Tensor):
        return
    if batch.numel() == 0:
        raise ValueError(
            f"calibration batch {index} is empty (shape {tuple(batch.shape)}): every calibration "
            "batch must hold at least one sample"
        )
    if dtype is not None and batch.dtype != dtype:
        how = (
            f"convert it with .to({dtype})"
            if batch.is_floating_point()
            else "convert the pixels to normalized float images (e.g. the DataModule's transform)"
        )
        raise TypeError(
            f"calibration batch {index} is a {batch.dtype} tensor but the model computes in "
            f"{dtype} (fake quantization is defined in float32): {how}"
        )


def _snapshot(modules: list[QuantModule]) -> list[dict[str, Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reducer: StatReducer | None = None,
) -> nn.Module:
    """Calibrate ``model`` on ``batches`` by the protocol of §9, then switch quantization on.

    Every batch is observed; on the last one each point computes its parameters as the forward pass
    reaches it. ``batches`` yields model inputs (e.g. ``[B, 3, H, W]`` tensors); ``forward(model,
    batch)`` overrides the default ``model(batch)``. Under an initialized process group the statistics
    merge across ranks (``reducer``, default :func:`default_reducer`). Any earlier calibration is
    discarded first. Under a process group every rank must pass the same number of batches, and
    the ranks' final parameters are compared by checksum (``RuntimeError`` if they differ). A
    tensor batch must be non-empty (``ValueError``) and in the model's float dtype (``TypeError``).
    On error (no batches, NaN/Inf, a point never reached …) the model's
    calibration state, flags and train/eval mode are restored and the error re-raised.
    """
    modules = _require_quant_modules(model, "calibrate")
    forward = forward or (lambda m, batch: m(batch))
    reducer = reducer or default_reducer()
    saved_state = _snapshot(modules)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    was_training = model.training
    seen = 0
    try:
        for module in modules:
            module.reset_calibration()
        model.eval()
        with use_reducer(reducer):
            for batch, last in _with_last_flag(batches, reducer):
                _check_batch(batch, seen, dtype)
                for module in modules:
                    module.set_observing(True, last_batch=last)
                forward(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError(
                f"cannot calibrate {type(model).__name__}: no calibration batches were given"
            )
        unreached = [m.qname for m in modules if isinstance(m, QuantAct) and not m.is_calibrated]
        if unreached:
            raise RuntimeError(
                f"calibration never reached {len(unreached)} quantization point(s), first {unreached[0]!r}: "
                "each point must run on every calibration batch"
            )
        for module in modules:
            module.set_observing(False)
        enable_quantization(model)
        _check_ranks_agree(model, reducer)
    except BaseException:
        for module, state in zip(modules, saved_state):
            module.set_observing(False)
            module.load_state_dict(state)
        raise
    finally:
        model.train(was_training)
    return model
