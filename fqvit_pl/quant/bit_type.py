"""Integer types of the quantization grid (docs/method.md §1)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BitType", "get_bit_type", "BIT_TYPES"]


@dataclass(frozen=True)
class BitType:
    """An integer grid: ``bits`` wide, signed (two's complement range) or unsigned.

    ``lower``/``upper`` are the inclusive integer bounds, e.g. int8 → [-128, 127], uint4 → [0, 15].
    """

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bit width must lie in 1..16, got {self.bits}")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def lower(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def upper(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        """``upper - lower``: the number of steps between the bounds."""
        return self.upper - self.lower


#: The three types the published method uses.
BIT_TYPES: dict[str, BitType] = {
    t.name: t for t in (BitType(4, False), BitType(8, True), BitType(8, False))
}

_NAME = re.compile(r"^(u?)int(\d+)$")


def get_bit_type(name: str | BitType) -> BitType:
    """Parse ``"uint4"``, ``"int8"``, ``"uint6"`` … (any width 1..16) into a :class:`BitType`."""
    if isinstance(name, BitType):
        return name
    match = _NAME.match(str(name).strip().lower())
    if match is None or not 1 <= int(match.group(2)) <= 16:
        raise ValueError(
            f"unknown bit type {name!r}: expected 'int<N>' or 'uint<N>' with 1 <= N <= 16 "
            f"(the method uses {', '.join(BIT_TYPES)})"
        )
    return BitType(int(match.group(2)), signed=match.group(1) != "u")
