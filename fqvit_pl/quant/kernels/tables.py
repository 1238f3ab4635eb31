"""Lookup tables of the fast kernels, each read off the plain formula it replaces.

- :func:`lis_table`: the Log-Int-Softmax output for every exponent and first mantissa bit of ``y``.
- :func:`floor_log2_thresholds`: where ``floor(torch.log2(a))`` exceeds the exponent of ``a``.

Tables are cached per device and built in eager mode (:func:`build_kernel_tables`), so that a
model traced by torch.compile finds them instead of tracing their construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import log_rounding

__all__ = ["lis_table", "floor_log2_thresholds", "layernorm_power", "build_kernel_tables"]

#: ``(bit width, device)`` -> the Log-Int-Softmax output indexed by the top 9 bits of float32 ``y``.
_LIS_TABLES: dict[tuple[int, torch.device], Tensor] = {}
#: device -> the ``[256]`` thresholds of :func:`floor_log2_thresholds`.
_FLOOR_LOG2_THRESHOLDS: dict[torch.device, Tensor] = {}


def lis_table(bits: int, device: torch.device) -> Tensor:
    """Output of the §8 log rounding for every ``key = (y.view(int32) >> 22) & 511``.

    The key is the biased exponent ``E`` of ``y`` (8 bits) and the first mantissa bit ``h``. For a
    finite ``y >= 1``, ``floor(log2 y) = E - 127``, and ``y - 2**f >= 2**(f-1)`` (``y >= 1.5 * 2**f``)
    holds exactly when ``h = 1`` (both sides are exact in float32, by Sterbenz), so the rounding
    is ``r = E - 127 + h``. The plain formula computes ``f`` with ``torch.log2``, which may be off
    by one next to a power of two; it still yields the same ``r``:

    - rounded up (``f = F + 1`` for ``y`` just below ``2**(F+1)``, so ``y >= 1.5 * 2**F``):
      ``y - 2**(F+1) < 0 < 2**F`` gives ``r = F + 1 = F + h`` as ``h = 1``;
    - rounded down (``f = F - 1`` for ``y`` at or just above ``2**F``, so ``h = 0``):
      ``y - 2**(F-1) >= 2**(F-1) > 2**(F-2)`` gives ``r = F = F + h``.

    ``E = 255`` is inf (``e == 0``: output 0, as the formula's ``r = inf >= 2**bits``) or a quiet
    NaN with ``h = 1`` (a row of zeros: NaN). ``y < 1`` (never produced: ``y = round(S / e) >= 1``)
    gives ``r <= 0``, output 1, as the formula. The entries are computed by the formula's own log
    rounding on ``y = 2**(E-127) * (1 + h/2)``, so they are equal by construction.
    """
    key = (bits, torch.device(device))
    table = _LIS_TABLES.get(key)
    if table is None:
        codes = torch.arange(512, dtype=torch.int32)
        exponent, high = codes >> 1, codes & 1
        # The smallest float32 with that exponent and first mantissa bit: 2**(E-127) (1 + h/2).
        y = ((exponent << 23) | (high << 22)).view(torch.float32)
        table = log_rounding(y, bits)
        table[510] = 0.0  # inf: e == 0
        table[511] = float("nan")  # nan: a row of zeros
        table[:2] = 1.0  # E = 0 (y = 0 or subnormal, never produced): r <= 0 as for any y < 1
        table = _LIS_TABLES[key] = table.to(device)
    return table


def floor_log2_thresholds(device: torch.device, window: int = 2048) -> Tensor | None:
    """Where ``floor(torch.log2(a))`` exceeds the exponent of ``a``, per biased exponent ``E``.

    Returns ``[256]`` float32: for ``E`` in 1..254, the smallest float of the binade
    ``[2**(E-127), 2**(E-126))`` that ``torch.log2`` on ``device`` maps to ``E - 126`` or above,
    else ``inf`` (and ``inf`` for ``E`` 0 and 255). ``torch.log2`` is accurate to about one unit in
    the last place of its result, so it rounds a few floats just below a power of two ``2**k`` up
    to ``k`` (up to 44 floats below, for large ``|k|``, on CPU); ``floor(log2)`` can differ from
    the exponent only within ``window`` floats of a power of two (2048 floats below ``2**k`` are
    ``window * 2**-24 / ln 2`` below ``k``, over 5 units in the last place of any ``k`` in range).
    The table is read off ``torch.log2`` itself on the top and bottom ``window`` floats of every
    binade, so the lookup equals the formula by construction. It is checked: the rounded-up
    floats must be the top ones of their binade and no float at the bottom of a binade may fall
    below its exponent; otherwise ``None`` is returned and callers use ``torch.log2``. Built in
    eager mode only (a trace finds it cached or uses ``torch.log2``).
    """
    device = torch.device(device)
    if device in _FLOOR_LOG2_THRESHOLDS:
        return _FLOOR_LOG2_THRESHOLDS[device]
    if torch.compiler.is_compiling():
        return None
    with torch.no_grad():
        biased = torch.arange(1, 255, dtype=torch.int32, device=device)[:, None]
        steps = torch.arange(window, dtype=torch.int32, device=device)[None, :]
        # Descending from the binade's top, and ascending from its bottom.
        tops = (((biased + 1) << 23) - 1 - steps).view(torch.float32)
        bottoms = ((biased << 23) + steps).view(torch.float32)
        above = torch.floor(torch.log2(tops)) - (biased - 127).float()  # 1: rounded up
        rounded_up = (above == 1).sum(dim=1)
        top_ones = (above == 1) == (steps < rounded_up[:, None])
        ok = bool(
            ((above == 0) | (above == 1)).all() and top_ones.all() and (rounded_up < window).all()
        )
        ok = ok and bool((torch.floor(torch.log2(bottoms)) == (biased - 127).float()).all())
        if not ok:
            return None
        first_up = tops.gather(1, (rounded_up - 1).clamp(min=0)[:, None].long())[:, 0]
        table = torch.full((256,), float("inf"), device=device)
        table[1:255] = torch.where(
            rounded_up > 0, first_up, torch.full_like(first_up, float("inf"))
        )
    _FLOOR_LOG2_THRESHOLDS[device] = table
    return table


def power_of_two(k: Tensor) -> Tensor:
    """``2**k`` for integer-valued float32 ``k`` in ``[-126, 127]``, built from its bits (exact, as ``exp2``)."""
    return torch.bitwise_left_shift(k.to(torch.int32) + 127, 23).view(torch.float32)


def probabilities_from_keys(keys: Tensor, bits: int, exponent_bias: int) -> Tensor:
    """``2**-r`` (float32) for the keys ``2 E + h`` of the §8 log rounding, elementwise (a compiled
    graph fuses it, a table gather it does not).

    ``E`` is the biased exponent of ``y`` and ``h`` its first mantissa bit (:func:`lis_table`), so
    ``r = E - exponent_bias + h`` (127 for float32 ``y``, 1023 for float64); 1 where ``r <= 0``, 0
    where ``r >= 2**bits``. Exact for ``r <= 126`` (a normal float32 ``2**-r``): for every key when
    ``2**bits - 1 <= 126``.
    """
    levels = 2**bits
    r = torch.bitwise_right_shift(keys, 1) + torch.bitwise_and(keys, 1) - exponent_bias
    return torch.where(r >= levels, 0.0, power_of_two(-torch.clamp(r, 0, levels - 1)))


def layernorm_power(a: Tensor, bits: int) -> Tensor:
    """``2**N`` with ``N = clamp(bits - floor(torch.log2(a)), 0, 31)`` for ``a = |A| >= 0`` (§7 step 3).

    ``floor(torch.log2(a))`` is read off the exponent bits of ``a`` and the thresholds of
    :func:`floor_log2_thresholds` (no ``log2`` per element), and ``2**N`` is built from bits.
    The result equals the formula's for every ``a`` but NaN, where ``A`` is NaN and so is the
    output of the LayerNorm either way (``M`` is NaN). Used by the compiled kernel, where it fuses;
    eager runs the formula itself (an eager gather costs more than the ``log2``).
    """
    thresholds = floor_log2_thresholds(a.device)
    if thresholds is None:
        return torch.exp2(torch.clamp(bits - torch.floor(torch.log2(a)), 0, 31))
    biased = torch.bitwise_right_shift(a.view(torch.int32), 23)  # a >= 0: no sign bit
    rounded_up = torch.ge(a, thresholds[biased])
    # N = bits - floor_log2 = bits - (biased + rounded_up - 127), in place on the fresh int tensor
    n = biased.add_(rounded_up).neg_().add_(bits + 127).clamp_(0, 31)
    return n.add_(127).bitwise_left_shift_(23).view(torch.float32)


def build_kernel_tables(device: torch.device | str, lis_bits: int | None = None) -> None:
    """Build the integer LayerNorm's table (and Log-Int-Softmax's with ``lis_bits``) on ``device``
    now, in eager mode. The kernels build them on first use anyway; a model traced by torch.compile
    before any eager run on that device would otherwise trace the LIS table's construction into its
    graph and use ``torch.log2`` in the LayerNorm (same values, slower)."""
    floor_log2_thresholds(torch.device(device))
    if lis_bits is not None:
        lis_table(lis_bits, torch.device(device))


build_kernel_tables("cpu")
