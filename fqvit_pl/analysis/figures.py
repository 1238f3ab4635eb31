"""The report's figures (matplotlib, Agg, PNG), each drawn from the JSON-ready report alone.

Figures are built on :class:`matplotlib.figure.Figure` without pyplot, so drawing never touches
a global backend or an interactive window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

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
_DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=_DPI, facecolor="white")  # constrained layout fits: one draw
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    return math.ceil(n / cols), cols


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


def plot_layernorm_ranges(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """Per-channel min–max of every LayerNorm input, each channel coloured by its PTF factor.

    The paper's inter-channel variation figure: one panel per LayerNorm (execution order),
    channel index on x, the channel's observed range as a vertical bar.
    """
    entries = report.get("layernorm_inputs") or {}
    if not entries:
        return None
    names = list(entries)
    rows, cols = _grid(len(names))
    fig = Figure(figsize=(4.2 * cols, 2.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    any_ptf = False
    for ax, name, label in zip(axes, names, _short(names)):
        entry = entries[name]
        low = np.asarray(entry["channel_min"], dtype=float)
        high = np.asarray(entry["channel_max"], dtype=float)
        channels = np.arange(low.size)
        alpha = entry.get("ptf_alpha")
        if alpha is not None:
            any_ptf = True
            colors = [ALPHA_COLORS[min(int(a), 3)] for a in alpha]
        else:
            colors = "#7f7f7f"
        ax.vlines(channels, low, high, colors=colors, linewidth=1.0)
        ax.axhline(0.0, color="black", linewidth=0.5)
        spread = (high - low).max() / max((high - low).min(), 1e-12)
        ax.set_title(
            f"{label}\n{low.size} channels, widest/narrowest range {spread:.0f}×", fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.set_xlim(-1, low.size)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols :]:
        ax.set_xlabel("channel", fontsize=8)
    handles = [Patch(color=ALPHA_COLORS[a], label=f"PTF α={a} (scale s·2^{a})") for a in range(4)]
    if not any_ptf:
        handles = [Patch(color="#7f7f7f", label="no PTF (one scale for all channels)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    images = report.get("output", {}).get("num_images")
    fig.suptitle(
        f"Inter-channel variation of the LayerNorm inputs: min–max of each channel on {images} images",
        fontsize=10,
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
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    ax, bars = fig.subplots(1, 2, width_ratios=[2.2, 1])
    ax.stairs(counts, edges, fill=True, color="#9ecae1", label="attention probabilities")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(lo, 2.0**-16) / 1.5, 1.3)
    ax.set_ylim(0.8, max(counts.max(), 1.0) * 3)
    for level in lis_levels(bits):
        ax.axvline(level, color="#d62728", linewidth=0.9, alpha=0.8)
    for level in uniform_levels(bits)[1:]:
        ax.axvline(level, color="#2ca02c", linewidth=0.9, linestyle="--", alpha=0.9)
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
    labels = _short(list(entries))
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


def plot_sqnr(report: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """SQNR of every quantization point across depth: accumulated (bars) and alone (dots).

    Top: activation points, LN inputs, softmax and integer LayerNorms in execution order; bottom:
    the weights. Higher is better; a triangle at the top marks a point without any error.
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
    width = max(9.0, 0.13 * max(len(items) for _, items in panels))
    fig = Figure(figsize=(width, 3.6 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (title, items) in zip(axes, panels):
        names = [name for name, _ in items]
        entries = [entry for _, entry in items]
        x = np.arange(len(items))
        accumulated, exact_acc = _sqnr_values(entries, "accumulated")
        alone, exact_alone = _sqnr_values(entries, "alone")
        finite = np.concatenate([accumulated[np.isfinite(accumulated)], alone[np.isfinite(alone)]])
        top = (finite.max() if finite.size else 40.0) + 5
        colors = [_KIND_COLORS.get(e["kind"], "#4c72b0") for e in entries]
        ax.bar(x, np.where(np.isfinite(accumulated), accumulated, 0.0), color=colors, width=0.8)
        ax.scatter(x, np.where(np.isfinite(alone), alone, np.nan), color="black", s=8, zorder=3)
        if exact_acc.any():
            ax.scatter(x[exact_acc], np.full(exact_acc.sum(), top), marker="^", color="black", s=14)
        layers = [e.get("layer") for e in entries]
        for i in range(1, len(layers)):
            if layers[i] != layers[i - 1]:
                ax.axvline(i - 0.5, color="#bbbbbb", linewidth=0.6)
        ax.set_xticks(x, _short(names), rotation=90, fontsize=6)
        ax.set_xlim(-0.6, len(items) - 0.4)
        ax.set_ylim(min(0.0, np.nanmin(finite) - 2 if finite.size else 0.0), top + 3)
        ax.set_ylabel("SQNR vs float (dB)")
        ax.set_title(title, fontsize=10)
    kinds = sorted({e["kind"] for _, e in ordered}, key=list(_KIND_COLORS).index)
    handles = [Patch(color=_KIND_COLORS[k], label=k) for k in kinds]
    handles.append(Line2D([], [], color="black", marker="o", linestyle="", label="point alone"))
    handles.append(Line2D([], [], color="black", marker="^", linestyle="", label="no error (∞ dB)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8)
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
    fig = Figure(figsize=(8, 0.32 * len(rows) + 1.6), layout="constrained")
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
    fig = Figure(
        figsize=(max(7.0, 0.55 * len(labels) + 2), 3.4 * len(models)), layout="constrained"
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
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
