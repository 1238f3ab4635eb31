"""Observers (docs/method.md §3, §5): modules that gather range statistics and turn them into qparams.

Every statistic lives in a registered buffer of final shape, so a checkpoint carries it. Each
observer declares how its per-batch statistics merge (``BATCH_MERGE``) and how the errors of its
final search merge (``SEARCH_MERGE``), which lets calibration merge them across processes.
An observer built with ``replicated=True`` watches a tensor that is the same on every process (a
parameter, e.g. a position embedding): it merges nothing, since each process already holds what a
single process would see, and merging copies would count the same values once per process.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from . import kernels
from .bit_type import BitType
from .functional import (
    channel_layout,
    exact_quantile,
    omse_candidates,
    ptf_scales,
    quantile_tail_size,
    range_to_qparams,
)
from .reduce import LocalReducer, MergeRule, StatReducer, get_reducer

#: The reducer of a replicated input: nothing to merge.
_LOCAL = LocalReducer()

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EmaObserver",
    "PercentileObserver",
    "OmseObserver",
    "PtfObserver",
    "build_observer",
    "OBSERVER_CLASSES",
]


class Observer(nn.Module):
    """Base observer: running ``min_val``/``max_val`` buffers, shape ``[C]`` per channel or ``[]`` per tensor.

    ``update(x)`` folds one batch in; ``compute_qparams(x)`` returns ``(scale, zero_point)`` using the
    running statistics and, for searching observers, ``x`` (the last batch). ``replicated=True``
    declares that ``x`` is the same tensor on every process: its statistics are then not merged
    across processes (see the module docstring).
    """

    BATCH_MERGE: ClassVar[dict[str, MergeRule]] = {"min": "min", "max": "max"}
    SEARCH_MERGE: ClassVar[dict[str, MergeRule]] = {}
    #: The name configurations use, and what the observer supports (see :meth:`check_supported`).
    NAME: ClassVar[str] = "observer"
    PER_CHANNEL: ClassVar[bool] = True
    PER_TENSOR: ClassVar[bool] = True
    SIGNED: ClassVar[bool] = True

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
        self.check_supported(bit_type, per_channel)
        super().__init__()
        self.bit_type = bit_type
        self.replicated = replicated
        self.num_channels = num_channels
        self.per_channel = per_channel
        self.weight = weight
        shape = (num_channels,) if per_channel else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.name = type(self).__name__

    @classmethod
    def check_supported(cls, bit_type: BitType, per_channel: bool) -> None:
        """Raise ``ValueError`` unless this observer supports the granularity and the bit type."""
        if not (cls.PER_CHANNEL if per_channel else cls.PER_TENSOR):
            only = "channel" if cls.PER_CHANNEL else "tensor"
            raise ValueError(
                f"the {cls.NAME} observer is per {only} only: granularity must be {only!r}"
            )
        if bit_type.signed and not cls.SIGNED:
            raise ValueError(
                f"the {cls.NAME} observer is asymmetric: it needs an unsigned bit type, "
                f"got {bit_type.name}"
            )

    def extra_repr(self) -> str:
        replicated = ", replicated" if self.replicated else ""
        return f"{self.bit_type.name}, channels={self.num_channels}, per_channel={self.per_channel}{replicated}"

    def reducer(self) -> StatReducer:
        """How this observer's statistics merge across processes: the current reducer, or none
        (:class:`LocalReducer`) for a replicated input."""
        return _LOCAL if self.replicated else get_reducer()

    def reset(self) -> None:
        """Forget everything observed."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.num_batches.zero_()

    def _layout(self, x: Tensor) -> Tensor:
        try:
            channels = channel_layout(x, weight=self.weight)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        if self.per_channel and channels.shape[0] != self.num_channels:
            raise ValueError(
                f"{self.name}: expected {self.num_channels} channels, got {channels.shape[0]} (input shape {tuple(x.shape)})"
            )
        return channels

    def batch_statistics(self, channels: Tensor) -> dict[str, Tensor]:
        """Per-batch statistics of a ``[C, n]`` tensor, merged by ``BATCH_MERGE``."""
        if self.per_channel:
            return {"min": channels.amin(dim=1), "max": channels.amax(dim=1)}
        return {"min": channels.amin(), "max": channels.amax()}

    def fold(self, stats: dict[str, Tensor]) -> None:
        """Fold merged per-batch statistics into the running ones (running min/max by default)."""
        torch.minimum(self.min_val, stats["min"], out=self.min_val)
        torch.maximum(self.max_val, stats["max"], out=self.max_val)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Observe one batch. Raises ``ValueError`` naming the observer on NaN/Inf or a bad rank."""
        channels = self._layout(x.detach())
        reducer = self.reducer()
        stats = self.batch_statistics(channels.float())
        # NaN and Inf reach the statistics (min/max propagate NaN; the tails hold the extremes), which
        # is much cheaper than a pass over the data. The verdict is shared, so every rank raises.
        finite = all(bool(torch.isfinite(value).all()) for value in stats.values())
        if reducer.distributed:
            finite = bool(reducer.reduce(torch.tensor([float(finite)]), "min").item())
        if not finite:
            raise ValueError(
                f"{self.name}: observed NaN or Inf values (input shape {tuple(x.shape)})"
            )
        stats = {key: reducer.reduce(value, self.BATCH_MERGE[key]) for key, value in stats.items()}
        self.fold(stats)
        self.num_batches += 1

    def _check_observed(self) -> None:
        if int(self.num_batches) == 0:
            raise RuntimeError(
                f"{self.name}: cannot compute quantization parameters before observing any batch"
            )

    @torch.no_grad()
    def compute_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` from the running range (§4), shapes like ``min_val``."""
        self._check_observed()
        return range_to_qparams(self.min_val, self.max_val, self.bit_type)


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches (§5 minmax)."""

    NAME: ClassVar[str] = "minmax"


class EmaObserver(Observer):
    """First batch sets the range, later ones move it 1% of the way: ``m += 0.01 * (batch_m - m)``."""

    NAME: ClassVar[str] = "ema"
    momentum: float = 0.01

    def fold(self, stats: dict[str, Tensor]) -> None:
        first = self.num_batches == 0
        for name, batch in (("min_val", stats["min"]), ("max_val", stats["max"])):
            running = getattr(self, name)
            moved = running + self.momentum * (batch - running)
            running.copy_(torch.where(first, batch, moved))


class PercentileObserver(EmaObserver):
    """Per batch, the 0.99999 / 0.00001 quantiles of all elements (exact, any size), then the ema (§5)."""

    NAME: ClassVar[str] = "percentile"
    PER_CHANNEL: ClassVar[bool] = False
    upper_q: float = 0.99999
    lower_q: float = 0.00001
    # ``numel`` is already the total over processes when the batch statistics are taken (the
    # tails' lengths depend on it): every rank holds the same value, kept by "max".
    BATCH_MERGE: ClassVar[dict[str, MergeRule]] = {
        "upper_tail": "cat",
        "lower_tail": "cat",
        "numel": "max",
    }

    def batch_statistics(self, channels: Tensor) -> dict[str, Tensor]:
        values = channels.t().reshape(-1)  # the same multiset, without copying the transposed view
        # Tails long enough for the quantile of the union of every process's batch.
        numel = self.reducer().reduce(torch.tensor(values.numel(), device=values.device), "sum")
        total = int(numel)
        upper_k = min(values.numel(), quantile_tail_size(total, self.upper_q, values.dtype))
        lower_k = min(values.numel(), quantile_tail_size(total, self.lower_q, values.dtype))
        upper, lower = kernels.extreme_values(values, upper_k, lower_k)
        return {"upper_tail": upper, "lower_tail": lower, "numel": numel}

    def fold(self, stats: dict[str, Tensor]) -> None:
        total = int(stats["numel"])
        super().fold(
            {
                "max": exact_quantile(stats["upper_tail"], self.upper_q, numel=total),
                "min": exact_quantile(stats["lower_tail"], self.lower_q, numel=total),
            }
        )


class OmseObserver(Observer):
    """Running min/max, then the clipping of 90 shrunk ranges with the least MSE on the last batch (§5).

    The errors of the candidates (:func:`~fqvit_pl.quant.functional.omse_candidate_errors`) are
    summed over processes by ``SEARCH_MERGE``; the first minimum wins (the earliest candidate wins
    a tie). :func:`fqvit_pl.quant.kernels.omse_best_candidate` finds it.
    """

    SEARCH_MERGE: ClassVar[dict[str, MergeRule]] = {"errors": "sum"}
    NAME: ClassVar[str] = "omse"
    PER_CHANNEL: ClassVar[bool] = False
    SIGNED: ClassVar[bool] = False
    num_candidates: int = 90

    @torch.no_grad()
    def compute_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_observed()
        channels = self._layout(x).float()
        mins, maxs = omse_candidates(self.min_val, self.max_val, self.num_candidates)
        best = kernels.omse_best_candidate(channels, mins, maxs, self.bit_type, self.reducer())
        return range_to_qparams(mins[best], maxs[best], self.bit_type)


class PtfObserver(Observer):
    """Per-channel range, shared zero point, and per-channel Power-of-Two Factors ``alpha`` (§5 ptf).

    ``alpha`` (``[C]``, int64 in 0..3) is kept as a buffer: the channel's scale is ``s1 * 2**alpha``.
    """

    SEARCH_MERGE: ClassVar[dict[str, MergeRule]] = {"errors": "sum"}
    NAME: ClassVar[str] = "ptf"
    PER_TENSOR: ClassVar[bool] = False
    SIGNED: ClassVar[bool] = False

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool = True,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
        super().__init__(bit_type, num_channels, per_channel, weight, replicated)
        self.register_buffer("alpha", torch.zeros(num_channels, dtype=torch.long))

    def reset(self) -> None:
        super().reset()
        self.alpha.zero_()

    @torch.no_grad()
    def compute_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_observed()
        channels = self._layout(x).float()
        scales, zero_point = ptf_scales(self.min_val, self.max_val, self.bit_type)
        errors = kernels.ptf_channel_errors(channels, scales, zero_point, self.bit_type)
        errors = self.reducer().reduce(errors, self.SEARCH_MERGE["errors"])
        self.alpha.copy_(
            torch.argmin(errors, dim=1)
        )  # first minimum: the smallest scale wins a tie
        return scales[self.alpha], zero_point.expand(self.num_channels).clone()


#: Every observer by the name configurations use.
OBSERVER_CLASSES: dict[str, type[Observer]] = {
    cls.NAME: cls
    for cls in (MinMaxObserver, EmaObserver, PercentileObserver, OmseObserver, PtfObserver)
}


def build_observer(
    kind: str,
    bit_type: BitType,
    num_channels: int,
    per_channel: bool,
    weight: bool = False,
    replicated: bool = False,
) -> Observer:
    """Instantiate the observer named ``kind`` (minmax, ema, percentile, omse, ptf)."""
    if kind not in OBSERVER_CLASSES:
        raise ValueError(f"unknown observer {kind!r}; choose one of {tuple(OBSERVER_CLASSES)}")
    return OBSERVER_CLASSES[kind](bit_type, num_channels, per_channel, weight, replicated)
