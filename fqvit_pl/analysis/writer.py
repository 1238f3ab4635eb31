"""Writing a report to a folder: report.json (everything), report.md (tables, figures) and PNGs."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["write_report", "render_markdown", "FIGURES"]

#: File name and drawing function (in :mod:`fqvit_pl.analysis.figures`) of each figure, in order.
FIGURES = {
    "layernorm_ranges": ("ln_input_ranges.png", "plot_layernorm_ranges"),
    "attention": ("attention_distribution.png", "plot_attention"),
    "sqnr": ("sqnr_by_layer.png", "plot_sqnr"),
    "sensitivity": ("sensitivity.png", "plot_sensitivity"),
}
_CAPTIONS = {
    "layernorm_ranges": "Per-channel ranges of each LayerNorm input, coloured by the channel's PTF factor",
    "attention": "Attention probabilities with the 4-bit LIS levels and the uniform 4-bit levels",
    "sqnr": "SQNR of each quantization point across depth",
    "sensitivity": "Layer sensitivity",
    "table": "Top-1 of each cell against the paper",
}


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _num(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _sqnr(error: Mapping[str, Any]) -> str:
    if error["sqnr_db"] is None:
        return "∞" if error.get("mse") == 0 else "n/a"
    return f"{error['sqnr_db']:.1f}"


def _scale_text(scale: Any) -> str:
    if scale is None:
        return "—"
    if isinstance(scale, list):
        return f"{min(scale):.3g}…{max(scale):.3g} ({len(scale)} ch)"
    return f"{scale:.4g}"


def _zp_text(zero_point: Any) -> str:
    if zero_point is None:
        return "—"
    if isinstance(zero_point, list):
        values = sorted(set(zero_point))
        return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}…{values[-1]:g}"
    return f"{zero_point:g}"


def _alpha_text(alpha: Optional[list[int]]) -> str:
    if alpha is None:
        return "—"
    counts = Counter(alpha)
    return " ".join(f"{a}:{counts[a]}" for a in range(4) if counts[a])


def render_markdown(report: Mapping[str, Any], title: Optional[str] = None) -> str:
    """The report as Markdown: summary, figures, sensitivity ranking, points, LayerNorm inputs, attention."""
    info = report.get("model", {})
    out = report["output"]
    heading = title or " ".join(
        str(part)
        for part in (
            info.get("model"),
            info.get("method"),
            f"ptf={info['ptf']}" if "ptf" in info else None,
            f"lis={info['lis']}" if "lis" in info else None,
            f"W/A/Attn={info['bits']}" if "bits" in info else None,
        )
        if part is not None
    )
    lines = [f"# Quantization report: {heading}", ""]
    lines += [
        "| images | top-1 agreement with float | top-1 | float top-1 | logits SQNR (dB) | logits cosine |",
        "|---|---|---|---|---|---|",
        f"| {out['num_images']} | {_num(out['fp_agreement'])}% | {_num(out['top1'])} | "
        f"{_num(out['fp_top1'])} | {_num(out['logits_sqnr_db'], 1)} | {_num(out['logits_cosine'], 4)} |",
        "",
    ]
    for key, path in (report.get("figures") or {}).items():
        lines += [f"![{_CAPTIONS.get(key, key)}]({path})", ""]
    ranking = report.get("sensitivity") or []
    if ranking:
        lines += [
            "## Layer sensitivity",
            "",
            "*only*: only this layer quantized; *all but*: every other layer quantized. Agreement: % of "
            "images whose top-1 class equals the float model's. Ranked by the agreement lost with only "
            "the layer quantized, then by its logits SQNR.",
            "",
            "| rank | layer | only: agreement | only: top-1 | only: logits SQNR (dB) | all but: agreement | all but: top-1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in ranking:
            only, rest = row["only"], row["all_but"]
            lines.append(
                f"| {row['rank']} | {row['layer']} | {_num(only['fp_agreement'])} | {_num(only['top1'])} | "
                f"{_num(only['logits_sqnr_db'], 1)} | {_num(rest['fp_agreement'])} | {_num(rest['top1'])} |"
            )
        lines.append("")
    lines += [
        "## Quantization points",
        "",
        "SQNR against the float model: *alone* quantizes only this point (float input), *accumulated* "
        "is its output in the fully quantized network. Clipped: share of values whose code falls "
        "outside the grid (LIS: positive probabilities output as 0). ∞: no error.",
        "",
        "| # | point | kind | bits | observer | scale | zero point | PTF α (α:count) | clipped | SQNR alone | SQNR accumulated | cosine accumulated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in sorted(report["points"].items(), key=lambda item: item[1]["order"]):
        clip = entry.get("clipping_rate")
        lines.append(
            f"| {entry['order']} | `{name}` | {entry['kind']} | {entry.get('bit_type') or '—'} | "
            f"{entry.get('observer') or '—'} | {_scale_text(entry.get('scale'))} | "
            f"{_zp_text(entry.get('zero_point'))} | {_alpha_text(entry.get('ptf_alpha'))} | "
            f"{'—' if clip is None else f'{100 * clip:.3f}%'} | {_sqnr(entry['alone'])} | "
            f"{_sqnr(entry['accumulated'])} | {_num(entry['accumulated']['cosine'], 5)} |"
        )
    lines.append("")
    norms = report.get("layernorm_inputs") or {}
    if norms:
        lines += [
            "## LayerNorm inputs",
            "",
            "| LayerNorm | input point | channels | channel range min…max | widest / narrowest channel range | PTF α (α:count) |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in norms.items():
            widths = [hi - lo for lo, hi in zip(entry["channel_min"], entry["channel_max"])]
            ratio = max(widths) / max(min(widths), 1e-12)
            lines.append(
                f"| `{name}` | `{entry['input_point']}` | {len(widths)} | "
                f"{min(entry['channel_min']):.3g}…{max(entry['channel_max']):.3g} | {ratio:.1f} | "
                f"{_alpha_text(entry['ptf_alpha'])} |"
            )
        lines.append("")
    attention = report.get("attention") or {}
    if attention:
        lines += [
            "## Attention probabilities",
            "",
            "| softmax | LIS | values | max | → 0 under LIS 4-bit | → 0 under uniform 4-bit [0, 1] |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in attention.items():
            lines.append(
                f"| `{name}` | {entry['lis']} | {entry['num_values']} | {entry['max_probability']:.3f} | "
                f"{100 * entry['lis_flush_rate']:.2f}% | {100 * entry['uniform4_zero_rate']:.2f}% |"
            )
        lines.append("")
    timing = report.get("timing") or {}
    if timing:
        lines.append(
            "Analysis "
            + _num(timing.get("analysis_seconds"), 2, " s")
            + (
                f", figures and files {timing['files_seconds'] + (timing.get('table_figure_seconds') or 0.0):.2f} s"
                if timing.get("files_seconds") is not None
                else ""
            )
            + "."
        )
        lines.append("")
    return "\n".join(lines)


def write_report(
    report: dict[str, Any],
    out_dir: str | Path,
    *,
    figures: bool = True,
    title: Optional[str] = None,
    extra_figures: Optional[Mapping[str, str]] = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with ``figures``) the PNGs into ``out_dir``.

    Adds ``report["figures"]`` (file names relative to ``out_dir``) and
    ``report["timing"]["files_seconds"]``; ``extra_figures`` (key → file already in ``out_dir``)
    are embedded too. Returns the paths written, by key (``json``, ``markdown``, figure keys).
    """
    start = time.perf_counter()
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"quant_report: cannot create the report folder {str(folder)!r}: {err}"
        ) from err
    written: dict[str, Path] = {}
    names: dict[str, str] = {}
    if figures:
        from . import figures as plots  # matplotlib only when drawing

        for key, (filename, function) in FIGURES.items():
            path = getattr(plots, function)(report, folder / filename)
            if path is not None:
                written[key] = path
                names[key] = filename
    for key, filename in (extra_figures or {}).items():
        names[key] = filename
        written[key] = folder / filename
    report["figures"] = names
    report.setdefault("timing", {})["files_seconds"] = time.perf_counter() - start
    written["json"] = folder / "report.json"
    with open(written["json"], "w") as f:
        json.dump(_json_ready(report), f, allow_nan=False)
    written["markdown"] = folder / "report.md"
    written["markdown"].write_text(render_markdown(report, title))
    return written
