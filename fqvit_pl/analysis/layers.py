"""Grouping the quantized modules of a network into layers, for the sensitivity ranking.

Pure functions of module names (dotted paths as in ``named_modules``), listed in the order the
forward pass first reaches them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["layer_groups", "layer_units"]


def _numbered_prefix(name: str) -> str | None:
    """The path up to its last numeric component (``blocks.3.attn.qkv_quant`` → ``blocks.3``)."""
    parts = name.split(".")
    last = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
    return None if last is None else ".".join(parts[: last + 1])


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Map each layer to its quantized modules; ``names`` in execution order, layers likewise.

    A layer is an element of a numbered container (``blocks.3``, ``layers.0.blocks.1``); a numbered
    element that also holds other layers is split by its next component (``layers.1.downsample``).
    The modules outside every numbered container form ``embed`` (before the first layer), ``head``
    (after the last) or, in between, their top-level name. A network without numbered containers is
    grouped by top-level name.
    """
    raw = {name: _numbered_prefix(name) for name in names}
    keys = {key for key in raw.values() if key is not None}
    groups: dict[str, list[str]] = {}
    if not keys:
        for name in names:
            groups.setdefault(name.split(".")[0], []).append(name)
        return groups
    assigned: dict[str, str | None] = {}
    for name, key in raw.items():
        if key is not None and any(other.startswith(key + ".") for other in keys):
            rest = name[len(key) + 1 :].split(".")
            key = f"{key}.{rest[0]}" if rest[0] else key
        assigned[name] = key
    numbered = [i for i, name in enumerate(names) if assigned[name] is not None]
    first, last = numbered[0], numbered[-1]
    for i, name in enumerate(names):
        key = assigned[name]
        if key is None:
            key = "embed" if i < first else "head" if i > last else name.split(".")[0]
        groups.setdefault(key, []).append(name)
    return groups


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_units(groups: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Per layer, the shallowest modules whose quantized modules all belong to that layer.

    Running these modules computes the layer: e.g. ``blocks.3`` for a block, or ``input_quant``,
    ``patch_embed``, ``cls_quant`` … for ``embed``.
    """
    owner = {name: group for group, names in groups.items() for name in names}
    units: dict[str, list[str]] = {}
    for group, names in groups.items():
        if all(_covers(group, name) for name in names):
            units[group] = [group]  # a numbered element: the module that the container calls
            continue
        found: list[str] = []
        for name in names:
            if any(_covers(unit, name) for unit in found):
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                if all(owner[other] == group for other in owner if _covers(prefix, other)):
                    found.append(prefix)
                    break
        units[group] = found
    return units
