"""Pure functions of the quantization report: error sums, SQNR, cosine, clipping and ranges.

Nothing here touches a model. Tensors follow the layout rules of docs/method.md §3: a weight's
channel is dim 0; an activation's channel is its last dim, except a 4-D activation (NCHW) whose
channel is dim 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "ErrorStats",
    "sqnr_db",
    "cosine_similarity",
    "channel_axis",
    "channel_view",
    "channel_min_max",
    "clipped_counts",
    "lis_levels",
    "lis_flush_threshold",
    "uniform_levels",
    "log2_histogram",
    "HISTOGRAM_BINS",
    "HISTOGRAM_MIN_LOG2",
]

#: Bins of the attention-probability histogram (the maintainers' recipe: 2048).
HISTOGRAM_BINS = 2048
#: The histogram spans probabilities from ``2**HISTOGRAM_MIN_LOG2`` to 1, log-spaced.
HISTOGRAM_MIN_LOG2 = -32


def sqnr_db(signal: float, noise: float) -> float:
    """``10 * log10(signal / noise)`` in dB from the sums ``signal = Σ x²`` and ``noise = Σ (x - x̂)²``.

    ``inf`` when there is no error at all (``noise == 0``: an identity point); ``-inf`` when the
    reference is zero but the approximation is not.
    """
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(cross: float, signal: float, approx: float) -> Optional[float]:
    """``Σ x x̂ / sqrt(Σ x² · Σ x̂²)``; ``None`` when either vector is zero (undefined)."""
    if signal == 0.0 or approx == 0.0:
        return None
    return cross / math.sqrt(signal * approx)


@dataclass
class ErrorStats:
    """Running float64 sums comparing a reference ``x`` with its approximation ``x̂`` over many tensors.

    ``signal = Σ x²``, ``noise = Σ (x - x̂)²``, ``cross = Σ x x̂``, ``approx = Σ x̂²``; every element
    of every update counts once, so the metrics are those of all updates concatenated.
    """

    signal: float = 0.0
    noise: float = 0.0
    cross: float = 0.0
    approx: float = 0.0
    count: int = 0

    def update(self, reference: Tensor, approximation: Tensor) -> None:
        """Add one pair of same-shaped tensors."""
        if reference.shape != approximation.shape:
            raise ValueError(
                f"cannot compare tensors of shapes {tuple(reference.shape)} and {tuple(approximation.shape)}"
            )
        # float64 dot products: one pass each, no squared temporaries; one read back to the host
        x = reference.detach().reshape(-1).double()
        y = approximation.detach().reshape(-1).double()
        difference = x - y  # not in place: .double() of a float64 input is the input itself
        signal, cross, approx, noise = torch.stack(
            [torch.dot(x, x), torch.dot(x, y), torch.dot(y, y), torch.dot(difference, difference)]
        ).tolist()
        self.signal += signal
        self.cross += cross
        self.approx += approx
        self.noise += noise
        self.count += x.numel()

    @property
    def sqnr_db(self) -> float:
        """SQNR in dB (``inf`` without error), see :func:`sqnr_db`."""
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> Optional[float]:
        """Cosine similarity, see :func:`cosine_similarity`."""
        return cosine_similarity(self.cross, self.signal, self.approx)

    @property
    def mse(self) -> Optional[float]:
        """Mean squared error per element (``None`` before any update)."""
        return self.noise / self.count if self.count else None

    def summary(self) -> dict[str, Optional[float]]:
        """``{"sqnr_db", "cosine", "mse"}`` for a JSON report: a non-finite SQNR becomes ``None``
        (``None`` with ``mse == 0`` means no error at all)."""
        value = self.sqnr_db
        return {
            "sqnr_db": value if math.isfinite(value) else None,
            "cosine": self.cosine,
            "mse": self.mse,
        }


def channel_axis(x: Tensor, *, weight: bool = False) -> int:
    """The channel dimension of ``x`` (§3): 0 for a weight, 1 for a 4-D activation, else the last."""
    if weight or x.dim() <= 1:
        return 0
    return 1 if x.dim() == 4 else x.dim() - 1


def channel_view(param: Tensor, x: Tensor, *, weight: bool = False) -> Tensor:
    """``param`` (``[C]`` or ``[]``) shaped to broadcast against ``x`` on its channel axis."""
    if param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[channel_axis(x, weight=weight)] = -1
    return param.reshape(shape)


def channel_min_max(x: Tensor, *, weight: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel minimum and maximum of ``x`` (``[C]`` each, float32) over every other axis."""
    axis = channel_axis(x, weight=weight)
    x = x.detach()
    if axis == x.dim() - 1 and x.dim() > 1:  # [..., C]: reduce the rows, no transposed copy
        channels = x.reshape(-1, x.shape[-1])
        low, high = torch.aminmax(channels, dim=0)
    else:
        channels = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        low, high = torch.aminmax(channels, dim=1)
    return low.float(), high.float()


def clipped_counts(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    weight: bool = False,
    bounds: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Number of values that the clamp of §4 moves: ``round(x / s + zp)`` outside ``[qmin, qmax]``.

    ``scale``/``zero_point`` are ``[C]`` (per channel: returns int64 ``[C]`` counts over ``x``'s
    channels, §3 layout) or ``[]`` (per tensor: returns ``[1]``, all values). The codes are
    computed in float32 as the fake quantizer does.

    ``bounds``: the minimum and maximum of ``x`` (``[C]`` per channel, ``[1]`` per tensor), when
    already known. The code is monotonic in ``x`` (``s > 0``; division, addition and rounding are
    monotonic), so when the codes of the bounds lie in ``[qmin, qmax]`` no value is clipped and
    the counts are 0 without a pass over ``x``.
    """
    channels = scale.numel() if scale.dim() else 1
    if bounds is not None and all(b.numel() == channels for b in bounds):
        low, high = (b.detach().float().reshape(scale.shape) for b in bounds)
        code_low = (low / scale.float()).add_(zero_point.float()).round_()
        code_high = (high / scale.float()).add_(zero_point.float()).round_()
        if bool((code_low >= qmin).all()) and bool((code_high <= qmax).all()):
            return torch.zeros(channels, dtype=torch.long, device=x.device)
    x = x.detach().float()
    codes = x / channel_view(scale.float(), x, weight=weight)
    codes.add_(channel_view(zero_point.float(), x, weight=weight)).round_()
    outside = (codes < qmin).logical_or_(codes > qmax)
    if scale.dim() == 0:
        return outside.sum().reshape(1)
    axis = channel_axis(x, weight=weight)
    if axis == x.dim() - 1:
        return outside.reshape(-1, x.shape[-1]).sum(dim=0)
    return outside.movedim(axis, 0).reshape(x.shape[axis], -1).sum(dim=1)


def lis_levels(bits: int) -> list[float]:
    """The non-zero outputs of Log-Int-Softmax with ``bits``-bit codes (§8): ``2**-r``, r = 0 … 2**bits - 1."""
    return [2.0**-r for r in range(2**bits)]


def lis_flush_threshold(bits: int) -> float:
    """The probability at or below which Log-Int-Softmax outputs 0, were it given ``p`` exactly.

    §8 rounds ``y = 1/p`` to ``r = floor(log2 y)`` (+1 when ``y >= 1.5 * 2**floor(log2 y)``) and
    outputs 0 for ``r >= 2**bits``, i.e. for ``y >= 1.5 * 2**(2**bits - 1)``. (The integer path
    derives ``y`` from its integer exponentials, so this is the float picture of that rule.)
    """
    return 1.0 / (1.5 * 2.0 ** (2**bits - 1))


def uniform_levels(bits: int, low: float = 0.0, high: float = 1.0) -> list[float]:
    """The ``2**bits`` levels of an unsigned uniform quantizer of ``[low, high]`` (§4, zero point 0 for low = 0)."""
    steps = 2**bits - 1
    scale = (high - low) / steps
    zero_point = round(-low / scale)
    return [(q - zero_point) * scale for q in range(steps + 1)]


def log2_histogram(p: Tensor) -> tuple[Tensor, int, int]:
    """Counts of ``p`` in :data:`HISTOGRAM_BINS` log-spaced bins over ``[2**HISTOGRAM_MIN_LOG2, 1]``.

    Returns ``(counts [HISTOGRAM_BINS] int64, below, zeros)``: ``below`` counts the positive values
    under the first edge, ``zeros`` the exact zeros (neither fits a log axis).
    """
    p = p.detach().float().reshape(-1)
    positive = p[p > 0]
    logs = torch.log2(positive)
    counts = torch.histc(logs, bins=HISTOGRAM_BINS, min=float(HISTOGRAM_MIN_LOG2), max=0.0)
    below = int((logs < HISTOGRAM_MIN_LOG2).sum())
    zeros = int(p.numel() - positive.numel())
    return counts.round().long(), below, zeros
