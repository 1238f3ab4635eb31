"""Observers (contract §3, §5): modules that gather range statistics and turn them into qparams.

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

from .bit_type import BitType
from .functional import (
    channel_layout,
    exact_quantile,
    extreme_values,
    ptf_channel_errors,
    ptf_scales,
    quantile_tail_size,
    range_to_qparams,
)
from .omse_search import omse_search
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

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
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


class EmaObserver(Observer):
    """First batch sets the range, later ones move it 1% of the way: ``m += 0.01 * (batch_m - m)``."""

    momentum: float = 0.01

    def fold(self, stats: dict[str, Tensor]) -> None:
        first = self.num_batches == 0
        for name, batch in (("min_val", stats["min"]), ("max_val", stats["max"])):
            running = getattr(self, name)
            moved = running + self.momentum * (batch - running)
            running.copy_(torch.where(first, batch, moved))


class PercentileObserver(EmaObserver):
    """Per batch, the 0.99999 / 0.00001 quantiles of all elements (exact, any size), then the ema (§5)."""

    upper_q: float = 0.99999
    lower_q: float = 0.00001
    BATCH_MERGE: ClassVar[dict[str, MergeRule]] = {"upper_tail": "cat", "lower_tail": "cat"}

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
        if per_channel:
            raise ValueError("the percentile observer is per tensor only")
        super().__init__(bit_type, num_channels, per_channel, weight, replicated)

    def batch_statistics(self, channels: Tensor) -> dict[str, Tensor]:
        values = channels.t().reshape(-1)  # the same multiset, without copying the transposed view
        # Tails long enough for the quantile of the union of every process's batch.
        total = int(
            self.reducer().reduce(torch.tensor(values.numel(), device=values.device), "sum")
        )
        self._total = total
        upper_k = min(values.numel(), quantile_tail_size(total, self.upper_q, values.dtype))
        lower_k = min(values.numel(), quantile_tail_size(total, self.lower_q, values.dtype))
        upper, lower = extreme_values(values, upper_k, lower_k)
        return {"upper_tail": upper, "lower_tail": lower}

    def fold(self, stats: dict[str, Tensor]) -> None:
        super().fold(
            {
                "max": exact_quantile(stats["upper_tail"], self.upper_q, numel=self._total),
                "min": exact_quantile(stats["lower_tail"], self.lower_q, numel=self._total),
            }
        )


class OmseObserver(Observer):
    """Running min/max, then the clipping of 90 shrunk ranges with the least MSE on the last batch (§5).

    The search is :func:`~fqvit_pl.quant.omse_search.omse_search`: the full search's choice (its
    first minimum of the float64 errors, merged over processes by ``SEARCH_MERGE``), found by exact
    pruning; ``omse_candidate_errors`` remains the reference it reproduces.
    """

    SEARCH_MERGE: ClassVar[dict[str, MergeRule]] = {"errors": "sum"}
    num_candidates: int = 90

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
        if per_channel or bit_type.signed:
            raise ValueError("the omse observer is per tensor and unsigned (asymmetric) only")
        super().__init__(bit_type, num_channels, per_channel, weight, replicated)

    @torch.no_grad()
    def compute_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_observed()
        channels = self._layout(x).float()
        choice = omse_search(
            channels,
            self.min_val,
            self.max_val,
            self.bit_type,
            self.num_candidates,
            reducer=self.reducer(),
        )
        best = choice.index  # first minimum: the earliest candidate wins a tie
        return range_to_qparams(choice.mins[best], choice.maxs[best], self.bit_type)


class PtfObserver(Observer):
    """Per-channel range, shared zero point, and per-channel Power-of-Two Factors ``alpha`` (§5 ptf).

    ``alpha`` (``[C]``, int64 in 0..3) is kept as a buffer: the channel's scale is ``s1 * 2**alpha``.
    """

    SEARCH_MERGE: ClassVar[dict[str, MergeRule]] = {"errors": "sum"}

    def __init__(
        self,
        bit_type: BitType,
        num_channels: int,
        per_channel: bool = True,
        weight: bool = False,
        replicated: bool = False,
    ) -> None:
        if not per_channel or bit_type.signed:
            raise ValueError("the ptf observer is per channel and unsigned only")
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
        errors = ptf_channel_errors(channels, scales, zero_point, self.bit_type)
        errors = self.reducer().reduce(errors, self.SEARCH_MERGE["errors"])
        self.alpha.copy_(
            torch.argmin(errors, dim=1)
        )  # first minimum: the smallest scale wins a tie
        return scales[self.alpha], zero_point.expand(self.num_channels).clone()


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EmaObserver,
    "percentile": PercentileObserver,
    "omse": OmseObserver,
    "ptf": PtfObserver,
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
    if kind not in _OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; choose one of {tuple(_OBSERVERS)}")
    return _OBSERVERS[kind](bit_type, num_channels, per_channel, weight, replicated)
