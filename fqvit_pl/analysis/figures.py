"""The report's figures (matplotlib, Agg, PNG), each drawn from the JSON-ready report alone.

Figures are built on :class:`matplotlib.figure.Figure` without pyplot, so drawing never touches
a global backend or an interactive window. Speed (the report is timed against one calibration,
``benchmarks/report_time.py``): margins are fixed in inches instead of a layout engine (constrained
layout measures every text once more before drawing), one axes holds many layers where a panel
each would repeat the ticks, minor ticks are off, and the PNGs are compressed lightly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullLocator

from .metrics import lis_levels, uniform_levels

__all__ = [
    "plot_layernorm_ranges",
    "plot_attention",
    "plot_sqnr",
    "plot_sensitivity",
    "plot_table",
    "ALPHA_COLORS",
]

#: Colour of each PTF factor alpha = 0..3 (channel scale s1 * 2**alpha).
ALPHA_COLORS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728")
_KIND_COLORS = {
    "activation": "#4c72b0",
    "ln_input": "#dd8452",
    "softmax": "#55a868",
    "softmax_lis": "#55a868",
    "layernorm_integer": "#8172b3",
    "weight": "#937860",
}
_DPI = 100
#: zlib level of the PNGs: 1 writes about as fast as raw, files stay small (flat colours).
_PNG_COMPRESSION = 1


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=_DPI, facecolor="white", pil_kwargs={"compress_level": _PNG_COMPRESSION})
    return path


def _margins(
    fig: Figure,
    *,
    left: float,
    right: float = 0.25,
    top: float,
    bottom: float,
    hspace: float = 0.2,
    wspace: float = 0.2,
) -> None:
    """Fixed margins in inches (a layout engine would measure every text once more)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        hspace=hspace,
        wspace=wspace,
    )


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_of_ten(value: float, _position: Any = None) -> str:
    """Tick label ``10⁻⁴`` in plain text (mathtext, matplotlib's default, is parsed per label)."""
    if value <= 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) > 1e-9:
        return f"{value:.3g}"
    return "1" if round(exponent) == 0 else "10" + str(round(exponent)).translate(_SUPERSCRIPT)


def _label_inches(labels: Sequence[str], fontsize: float) -> float:
    """Width that the longest of ``labels`` takes at ``fontsize`` (DejaVu Sans: ~0.6 em a char)."""
    longest = max((len(label) for label in labels), default=0)
    return 0.55 * fontsize / 72 * longest


def _short(names: Sequence[str]) -> list[str]:
    """Names without their common leading components (``net.blocks.0.x`` → ``blocks.0.x``)."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(
        len(p) > common + 1 and p[common] == parts[0][common] and not p[common + 1].isdigit()
        for p in parts
    ):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _alpha_colors(alpha: Optional[Sequence[int]], channels: int) -> Any:
    if alpha is None:
        return "#7f7f7f"
    return [ALPHA_COLORS[min(int(a), 3)] for a in alpha][:channels]


def _spread(low: np.ndarray, high: np.ndarray) -> float:
    """Widest over narrowest channel range."""
    widths = high - low
    return float(widths.max() / max(widths.min(), 1e-12))


def plot_layernorm_ranges(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """Per-channel min–max of every LayerNorm input, each channel coloured by its PTF factor.

    The paper's inter-channel variation figure. Top: the LayerNorm input whose channel ranges
    differ most (widest / narrowest), channel index on x, each channel's observed range as a
    vertical bar in its own units. Bottom: every LayerNorm input (execution order, one row each),
    the same bars scaled to the row's largest magnitude, so that the variation of all of them
    can be compared at a glance.
    """
    entries = report.get("layernorm_inputs") or {}
    if not entries:
        return None
    names = list(entries)
    labels = _short(names)
    lows = [np.asarray(entries[n]["channel_min"], dtype=float) for n in names]
    highs = [np.asarray(entries[n]["channel_max"], dtype=float) for n in names]
    spreads = [_spread(lo, hi) for lo, hi in zip(lows, highs)]
    widest = int(np.argmax(spreads))
    any_ptf = any(entries[n].get("ptf_alpha") is not None for n in names)
    channels = max(lo.size for lo in lows)
    rows_height = max(1.2, len(names) * max(0.22, min(0.4, 8.0 / len(names))))
    fig = Figure(figsize=(10.0, 2.3 + rows_height + 1.6))
    left = max(0.7, _label_inches(labels, 7) + 0.6)
    _margins(fig, left=left, top=0.95, bottom=0.45, hspace=0.55 / ((2.3 + rows_height) / 2))
    detail, overview = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2.3, rows_height]})
    lo, hi = lows[widest], highs[widest]
    x = np.arange(lo.size)
    alpha = entries[names[widest]].get("ptf_alpha")
    detail.vlines(x, lo, hi, colors=_alpha_colors(alpha, lo.size), linewidth=1.2)
    detail.axhline(0.0, color="black", linewidth=0.5)
    detail.set_xlim(-1, lo.size)
    detail.set_ylabel("input value", fontsize=8)
    detail.set_title(
        f"{labels[widest]}: the widest channel range is {spreads[widest]:.0f}× the narrowest",
        fontsize=9,
    )
    segments_x, segments_low, segments_high, colors = [], [], [], []
    for row, (lo, hi, name) in enumerate(zip(lows, highs, names)):
        magnitude = max(float(np.abs(lo).max()), float(np.abs(hi).max()), 1e-12)
        segments_x.append(np.arange(lo.size))
        segments_low.append(row - 0.45 * hi / magnitude)  # y grows downwards: rows top to bottom
        segments_high.append(row - 0.45 * lo / magnitude)
        color = _alpha_colors(entries[name].get("ptf_alpha"), lo.size)
        colors += [color] * lo.size if isinstance(color, str) else color
    overview.vlines(
        np.concatenate(segments_x),
        np.concatenate(segments_low),
        np.concatenate(segments_high),
        colors=colors,
        linewidth=1.0,
    )
    overview.hlines(np.arange(len(names)), -1, channels, color="#999999", linewidth=0.3)
    overview.set_ylim(len(names) - 0.5, -0.5)
    overview.set_xlim(-1, channels)
    magnitudes = [
        max(float(np.abs(lo).max()), float(np.abs(hi).max())) for lo, hi in zip(lows, highs)
    ]
    overview.set_yticks(
        np.arange(len(names)),
        [f"{label} (±{m:.3g})" for label, m in zip(labels, magnitudes)],
        fontsize=7,
    )
    overview.set_xlabel("channel", fontsize=8)
    overview.set_title(
        "every LayerNorm input, each row scaled to its largest |value| (0 on the thin line)",
        fontsize=9,
    )
    for ax in (detail, overview):
        ax.tick_params(labelsize=7)
    handles = [Patch(color=ALPHA_COLORS[a], label=f"PTF α={a} (scale s·2^{a})") for a in range(4)]
    no_ptf = Patch(color="#7f7f7f", label="no PTF (one scale for all channels)")
    if not any_ptf:
        handles = [no_ptf]
    elif any(entries[n].get("ptf_alpha") is None for n in names):
        handles.append(no_ptf)
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_size_inches()[1]),
        ncols=len(handles),
        fontsize=8,
        frameon=False,
    )
    images = report.get("output", {}).get("num_images")
    fig.suptitle(
        f"Inter-channel variation of the LayerNorm inputs: min–max of each channel on {images} images",
        fontsize=10,
        y=1 - 0.08 / fig.get_size_inches()[1],
        va="top",
    )
    return _save(fig, path)


def plot_attention(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """Distribution of the attention probabilities (log x) with the 4-bit LIS and uniform levels.

    Left: histogram of every attention layer's float probabilities together (2048 log2 bins), the
    16 levels 2**-r of 4-bit Log-Int-Softmax and the 16 levels k/15 of a uniform 4-bit quantizer of
    [0, 1], shaded where each outputs 0. Right: per layer, the share of probabilities each 4-bit
    grid sets to 0.
    """
    entries = report.get("attention") or {}
    if not entries:
        return None
    first = next(iter(entries.values()))
    hist = first["histogram"]
    bins = hist["bins"]
    edges = np.exp2(np.linspace(hist["log2_min"], hist["log2_max"], bins + 1))
    counts = np.zeros(bins)
    for entry in entries.values():
        counts += np.asarray(entry["histogram"]["counts"], dtype=float)
    bits = 4
    flush = first["lis_flush_threshold"] if first["lis_bits"] == bits else 1.0 / (1.5 * 2**15)
    used = np.nonzero(counts)[0]
    lo = edges[used[0]] if used.size else edges[0]
    labels = _short(list(entries))
    fig = Figure(figsize=(13, 4.6))
    gap = _label_inches(labels, 7) + 0.35
    inner = 13 - 0.75 - 0.25
    _margins(fig, left=0.75, top=0.35, bottom=0.55, wspace=2 * gap / (inner - gap))
    ax, bars = fig.subplots(1, 2, width_ratios=[2.2, 1])
    # the histogram as one filled step polygon (empty bins at 0.5, under the axis), in a
    # collection: the limits are set below, and a patch would walk its 4096 vertices for them
    heights = np.repeat(np.where(counts > 0, counts, 0.5), 2)
    outline = np.column_stack(
        [
            np.concatenate([[edges[0]], np.repeat(edges, 2)[1:-1], [edges[-1]]]),
            np.concatenate([[0.5], heights, [0.5]]),
        ]
    )
    ax.add_collection(PolyCollection([outline], facecolors="#9ecae1", linewidths=0), autolim=False)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(lo, 2.0**-16) / 1.5, 1.3)
    ax.set_ylim(0.8, max(counts.max(), 1.0) * 3)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(NullLocator())
        axis.set_major_formatter(FuncFormatter(_power_of_ten))
    on_x = ax.get_xaxis_transform()  # x in data, y in axes fraction: lines span the height
    ax.vlines(lis_levels(bits), 0, 1, transform=on_x, color="#d62728", linewidth=0.9, alpha=0.8)
    ax.vlines(
        uniform_levels(bits)[1:],
        0,
        1,
        transform=on_x,
        color="#2ca02c",
        linewidth=0.9,
        linestyle="--",
        alpha=0.9,
    )
    ax.axvspan(ax.get_xlim()[0], flush, color="#d62728", alpha=0.08)
    ax.axvspan(ax.get_xlim()[0], uniform_levels(bits)[1] / 2, color="#2ca02c", alpha=0.08)
    ax.set_xlabel("attention probability (log scale)")
    ax.set_ylabel("count (log scale)")
    total = sum(e["num_values"] for e in entries.values())
    lis_zero = sum(e["lis_flush_rate"] * e["num_values"] for e in entries.values()) / total
    uni_zero = sum(e["uniform4_zero_rate"] * e["num_values"] for e in entries.values()) / total
    ax.legend(
        handles=[
            Patch(color="#9ecae1", label=f"float probabilities, {len(entries)} attention layers"),
            Line2D(
                [], [], color="#d62728", label=f"LIS 4-bit levels 2^-r (→0: {100 * lis_zero:.1f}%)"
            ),
            Line2D(
                [],
                [],
                color="#2ca02c",
                linestyle="--",
                label=f"uniform 4-bit levels k/15 (→0: {100 * uni_zero:.1f}%)",
            ),
            Patch(color="#d62728", alpha=0.15, label="LIS outputs 0 here"),
            Patch(color="#2ca02c", alpha=0.15, label="uniform 4-bit outputs 0 here"),
        ],
        loc="upper left",
        fontsize=8,
    )
    images = report.get("output", {}).get("num_images")
    ax.set_title(
        f"Attention probabilities on {images} images ({bins} log bins): where the 4-bit levels lie",
        fontsize=10,
    )
    y = np.arange(len(labels))
    bars.barh(
        y - 0.2,
        [100 * e["uniform4_zero_rate"] for e in entries.values()],
        height=0.4,
        color="#2ca02c",
        label="uniform 4-bit",
    )
    bars.barh(
        y + 0.2,
        [100 * e["lis_flush_rate"] for e in entries.values()],
        height=0.4,
        color="#d62728",
        label="LIS 4-bit",
    )
    bars.set_yticks(y, labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("% of probabilities quantized to 0")
    bars.set_xlim(
        0,
        max(
            1.0,
            100
            * max(max(e["uniform4_zero_rate"], e["lis_flush_rate"]) for e in entries.values())
            * 1.1,
        ),
    )
    bars.set_title("Per attention layer", fontsize=10)
    bars.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _sqnr_values(entries: Sequence[Mapping[str, Any]], which: str) -> tuple[np.ndarray, np.ndarray]:
    """SQNR values (nan where unknown) and a mask of exact points (no error: infinite SQNR)."""
    values, exact = [], []
    for entry in entries:
        error = entry[which]
        values.append(np.nan if error["sqnr_db"] is None else error["sqnr_db"])
        exact.append(error["sqnr_db"] is None and error["mse"] == 0)
    return np.asarray(values, dtype=float), np.asarray(exact)


def _layer_spans(layers: Sequence[Optional[str]]) -> list[tuple[str, int, int]]:
    """``(layer, first index, last index)`` of each run of equal layer names."""
    spans: list[tuple[str, int, int]] = []
    for i, layer in enumerate(layers):
        if spans and spans[-1][0] == str(layer):
            spans[-1] = (spans[-1][0], spans[-1][1], i)
        else:
            spans.append((str(layer), i, i))
    return spans


def plot_sqnr(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """SQNR of every quantization point across depth: accumulated (bars) and alone (dots).

    Top: activation points, LN inputs, softmax and integer LayerNorms in execution order; bottom:
    the weights. One bar per point, coloured by kind, grouped by layer (named on the x axis;
    every point's name and value is in report.md). Higher is better; a triangle at the top marks
    a point without any error; the point with the lowest SQNR alone is named in each panel.
    """
    points = report.get("points") or {}
    if not points:
        return None
    ordered = sorted(points.items(), key=lambda item: item[1]["order"])
    panels = [
        (
            "activations (accumulated: bars; alone: dots)",
            [p for p in ordered if p[1]["kind"] != "weight"],
        ),
        ("weights", [p for p in ordered if p[1]["kind"] == "weight"]),
    ]
    panels = [(title, items) for title, items in panels if items]
    most = max(len(items) for _, items in panels)
    width = max(9.0, 0.09 * most + 1.0)
    layer_names = {str(entry.get("layer")) for entry in points.values()}
    band = 0.6 * _label_inches(list(layer_names), 8) + 0.3  # labels rotated 30°
    panel = 2.6
    fig = Figure(figsize=(width, 0.5 + len(panels) * (panel + band + 0.3)))
    _margins(fig, left=0.7, top=0.5 + 0.3, bottom=band, hspace=(band + 0.3) / panel)
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (title, items) in zip(axes, panels):
        names = [name for name, _ in items]
        entries = [entry for _, entry in items]
        x = np.arange(len(items))
        accumulated, exact_acc = _sqnr_values(entries, "accumulated")
        alone, exact_alone = _sqnr_values(entries, "alone")
        finite = np.concatenate([accumulated[np.isfinite(accumulated)], alone[np.isfinite(alone)]])
        top = (finite.max() if finite.size else 40.0) + 5
        bottom = min(0.0, np.nanmin(finite) - 2 if finite.size else 0.0)
        colors = [_KIND_COLORS.get(e["kind"], "#4c72b0") for e in entries]
        bar_points = 0.8 * (width - 0.95) * 72 / len(items)  # 0.8 of a slot, in points
        ax.vlines(  # one collection instead of a rectangle per bar
            x,
            0.0,
            np.where(np.isfinite(accumulated), accumulated, 0.0),
            colors=colors,
            linewidth=bar_points,
            capstyle="butt",
        )
        ax.plot(x, np.where(np.isfinite(alone), alone, np.nan), "o", color="black", ms=2.5)
        if exact_acc.any():
            ax.plot(x[exact_acc], np.full(exact_acc.sum(), top), "^", color="black", ms=4)
        spans = _layer_spans([e.get("layer") for e in entries])
        for _, first, _ in spans[1:]:
            ax.axvline(first - 0.5, color="#bbbbbb", linewidth=0.6)
        slot = (width - 0.95) / len(items)  # inches per point
        fits = all(
            _label_inches([layer], 8) <= (last - first + 1) * slot for layer, first, last in spans
        )
        ax.set_xticks(
            [(first + last) / 2 for _, first, last in spans],
            [layer for layer, _, _ in spans],
            rotation=0 if fits else 30,
            ha="center" if fits else "right",
            fontsize=8,
        )
        ax.tick_params(axis="x", length=0)
        if np.isfinite(alone).any():
            worst = int(np.nanargmin(np.where(np.isfinite(alone), alone, np.nan)))
            ax.plot(worst, alone[worst], "o", mfc="none", mec="#d62728", ms=8, mew=1.5)
            title += f"; lowest alone (red ring): {_short(names)[worst]}, {alone[worst]:.1f} dB"
        ax.set_xlim(-0.6, len(items) - 0.4)
        ax.set_ylim(bottom, top + 3)
        ax.set_ylabel("SQNR vs float (dB)")
        ax.set_title(title, fontsize=10)
    kinds = sorted({e["kind"] for _, e in ordered}, key=list(_KIND_COLORS).index)
    handles = [Patch(color=_KIND_COLORS[k], label=k) for k in kinds]
    handles.append(Line2D([], [], color="black", marker="o", linestyle="", label="point alone"))
    handles.append(Line2D([], [], color="black", marker="^", linestyle="", label="no error (∞ dB)"))
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=len(handles),
        fontsize=8,
        frameon=False,
    )
    return _save(fig, path)


def plot_sensitivity(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """Per layer (depth order): agreement with float lost when only it is quantized, and regained
    when everything but it is quantized."""
    rows = report.get("sensitivity") or []
    if not rows:
        return None
    points = report.get("points") or {}
    order = {}
    for entry in points.values():
        layer = entry.get("layer")
        order[layer] = min(order.get(layer, entry["order"]), entry["order"])
    rows = sorted(rows, key=lambda r: order.get(r["layer"], 0))
    labels = [f"{r['layer']} (#{r['rank']})" for r in rows]
    y = np.arange(len(rows))
    fig = Figure(figsize=(8, 0.32 * len(rows) + 1.6))
    _margins(fig, left=_label_inches(labels, 8) + 0.25, top=0.35, bottom=0.55)
    ax = fig.subplots()
    ax.barh(
        y - 0.2,
        [r["only_agreement_drop"] for r in rows],
        height=0.4,
        color="#c44e52",
        label="lost when only this layer is quantized",
    )
    ax.barh(
        y + 0.2,
        [r["all_but_agreement_gain"] for r in rows],
        height=0.4,
        color="#55a868",
        label="regained when all but this layer are quantized",
    )
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 agreement with the float model (percentage points)")
    images = report.get("output", {}).get("num_images")
    ax.set_title(f"Layer sensitivity on {images} images (#rank: most sensitive = 1)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_table(
    cells: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Top-1 per cell"
) -> Optional[Path]:
    """Top-1 of each (method, ptf, lis) cell, ours next to the paper's where it has one.

    ``cells``: dicts with ``model``, ``label`` (row name, e.g. ``MinMax w/ PTS``), ``top1``
    (ours, or ``None``) and ``paper`` (or ``None``).
    """
    cells = [c for c in cells if c.get("top1") is not None or c.get("paper") is not None]
    if not cells:
        return None
    models = list(dict.fromkeys(c["model"] for c in cells))
    labels = list(dict.fromkeys(c["label"] for c in cells))
    labels_inches = 0.6 * _label_inches(labels, 8) + 0.35  # rotated 35°: sin 35° ≈ 0.57
    panel = 2.4
    fig = Figure(
        figsize=(
            max(7.0, 0.55 * len(labels) + 2),
            0.4 + len(models) * (panel + labels_inches + 0.3),
        )
    )
    _margins(
        fig,
        left=0.7,
        top=0.4 + 0.3,
        bottom=labels_inches,
        hspace=(labels_inches + 0.3) / panel,
    )
    axes = fig.subplots(len(models), 1, squeeze=False).ravel()
    for ax, model in zip(axes, models):
        by_label = {c["label"]: c for c in cells if c["model"] == model}
        x = np.arange(len(labels))
        ours = [by_label.get(label, {}).get("top1") for label in labels]
        paper = [by_label.get(label, {}).get("paper") for label in labels]
        ax.bar(
            x - 0.2,
            [np.nan if v is None else v for v in ours],
            width=0.4,
            color="#4c72b0",
            label="ours",
        )
        if any(v is not None for v in paper):
            ax.bar(
                x + 0.2,
                [np.nan if v is None else v for v in paper],
                width=0.4,
                color="#bbbbbb",
                label="paper",
            )
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(0, 100)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_size_inches()[1], va="top")
    return _save(fig, path)
