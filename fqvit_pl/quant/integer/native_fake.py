"""Fake (meta) implementations of the ``fqvit_native`` operators, so ``torch.compile`` traces them.

Imported by :func:`fqvit_pl.quant.integer.native.native_ops` after the library is loaded.
"""

from __future__ import annotations

from . import native_lis  # noqa: F401
