"""The paper's table (fqvit_pl/reference/paper_table.csv), other methods' numbers
(fqvit_pl/reference/peer_results.csv) and the
Markdown table of our results next to them. Pure functions over CSV rows; no Lightning.

A *cell* is one (model, method, ptf, lis) evaluation; the paper's rows are, per method, plain
(``ptf=False, lis=False``), "w/ PTS" (``ptf=True, lis=False``) and "w/ PTS, LIS" (``ptf=True,
lis=True``), plus Full Precision.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

__all__ = [
    "Cell",
    "METHOD_NAMES",
    "ROW_KINDS",
    "FULL_PRECISION",
    "reference_path",
    "plan_cells",
    "read_paper_table",
    "read_peer_results",
    "read_results",
    "result_key",
    "format_table",
]

#: Display names of the methods, as the paper writes them.
METHOD_NAMES = {"minmax": "MinMax", "ema": "EMA", "percentile": "Percentile", "omse": "OMSE"}
#: The three rows of each method: name → (ptf, lis).
ROW_KINDS = {"plain": (False, False), "pts": (True, False), "pts_lis": (True, True)}
#: The paper's label of its float row.
FULL_PRECISION = "Full Precision"


@dataclass(frozen=True)
class Cell:
    """One evaluation of the table: a model under (method, ptf, lis)."""

    model: str
    method: str
    ptf: bool
    lis: bool

    @property
    def label(self) -> str:
        """The paper's row name: ``MinMax``, ``MinMax w/ PTS``, ``MinMax w/ PTS, LIS``."""
        name = METHOD_NAMES.get(self.method, self.method)
        if self.ptf and self.lis:
            return f"{name} w/ PTS, LIS"
        if self.ptf:
            return f"{name} w/ PTS"
        if self.lis:
            return f"{name} w/ LIS"
        return name


def reference_path(filename: str) -> Path:
    """``fqvit_pl/reference/<filename>``: the published numbers, shipped inside the package (so
    that an installed, non-editable ``fqvit_pl`` finds them too)."""
    return Path(__file__).resolve().parents[1] / "reference" / filename


def plan_cells(models: Sequence[str], methods: Sequence[str], rows: Sequence[str]) -> list[Cell]:
    """Every cell, in the paper's order (per model: method by method, plain → PTS → PTS+LIS)."""
    unknown_methods = [m for m in methods if m not in METHOD_NAMES]
    if unknown_methods:
        raise ValueError(f"unknown method(s) {unknown_methods}; choose from {list(METHOD_NAMES)}")
    unknown_rows = [r for r in rows if r not in ROW_KINDS]
    if unknown_rows:
        raise ValueError(f"unknown row(s) {unknown_rows}; choose from {list(ROW_KINDS)}")
    return [
        Cell(model, method, *ROW_KINDS[row])
        for model in models
        for method in methods
        for row in rows
    ]


def _bool(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes")


def _float(text: Optional[str]) -> Optional[float]:
    text = (text or "").strip()
    return float(text) if text else None


def _read_csv(path: str | os.PathLike, what: str) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist (it ships as docs/ in the project's source; "
            "point the option at a copy)"
        )
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_paper_table(path: str | os.PathLike | None = None) -> dict[str, dict[str, object]]:
    """The paper's top-1 by row label: ``{label: {"bits": "8/8/4", "<model>": float, ...}}``."""
    table: dict[str, dict[str, object]] = {}
    for row in _read_csv(path or reference_path("paper_table.csv"), "paper table"):
        method = row["method"]
        if method == "full_precision":
            label = FULL_PRECISION
        else:
            label = Cell("", method, _bool(row["ptf"]), _bool(row["lis"])).label
        entry: dict[str, object] = {"bits": f"{row['w_bits']}/{row['a_bits']}/{row['attn_bits']}"}
        for key, value in row.items():
            if key not in ("method", "ptf", "lis", "w_bits", "a_bits", "attn_bits"):
                entry[key] = _float(value)
        table[label] = entry
    return table


def read_peer_results(path: str | os.PathLike | None = None) -> list[dict[str, object]]:
    """Other methods' published numbers: dicts with method, model, w_bits, a_bits, top1, notes."""
    rows = []
    for row in _read_csv(path or reference_path("peer_results.csv"), "peer results"):
        rows.append(
            {
                "method": row["method"],
                "source": row.get("source", ""),
                "model": row["model"],
                "bits": f"{row['w_bits']}/{row['a_bits']}",
                "top1": _float(row["top1"]),
                "layernorm_softmax": row.get("layernorm_softmax", ""),
            }
        )
    return rows


def result_key(model: str, method: str, ptf: object, lis: object, bits: str) -> tuple:
    """The identity of a results-CSV row (the columns written by ``fqvit_pl.results``)."""
    return (str(model), str(method), _bool(str(ptf)), _bool(str(lis)), str(bits))


def read_results(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results CSV (``fqvit_pl.results.RESULT_COLUMNS``); none when the file is absent."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _latest(rows: Iterable[Mapping[str, str]]) -> dict[tuple, Mapping[str, str]]:
    """The last row of each key with a top-1 (later rows replace earlier ones)."""
    out: dict[tuple, Mapping[str, str]] = {}
    for row in rows:
        if _float(row.get("top1")) is None:
            continue
        out[result_key(row["model"], row["method"], row["ptf"], row["lis"], row["bits"])] = row
    return out


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def _diff(ours: Optional[float], paper: Optional[float]) -> str:
    return "—" if ours is None or paper is None else f"{ours - paper:+.2f}"


def format_table(
    cells: Sequence[Cell],
    bits: Mapping[Cell, str],
    results: Iterable[Mapping[str, str]],
    paper: Optional[Mapping[str, Mapping[str, object]]] = None,
    comparable: Optional[Mapping[str, bool]] = None,
    peers: Optional[Sequence[Mapping[str, object]]] = None,
) -> tuple[str, list[dict[str, object]]]:
    """The Markdown table of ``cells`` (ours, the paper's, the difference) and its cells as dicts.

    ``bits`` gives each cell's ``W/A/Attn`` (the key into the results CSV). The paper's value
    shows where ``comparable[model]`` (the published network, not a reduced one) and the bits
    equal the paper row's. ``peers`` (see :func:`read_peer_results`) adds a second table of other
    methods' published numbers for the same (comparable) models, labelled as such. Returns ``(markdown,
    [{"model", "label", "bits", "top1", "paper", "diff"}])``.
    """
    latest = _latest(results)
    paper = paper or {}
    comparable = comparable or {}
    models = list(dict.fromkeys(c.model for c in cells))
    labels: list[str] = []
    label_bits: dict[str, str] = {}
    for cell in cells:
        if cell.label not in labels:
            labels.append(cell.label)
            label_bits[cell.label] = bits[cell]
    by_label = {(c.model, c.label): c for c in cells}

    def fp_value(model: str) -> Optional[float]:
        values = [
            _float(row.get("fp_top1"))
            for key, row in latest.items()
            if key[0] == model and _float(row.get("fp_top1")) is not None
        ]
        return values[-1] if values else None

    header = ["Method", "W/A/Attn"]
    for model in models:
        header += [model, "paper", "Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (3 * len(models))]
    out_cells: list[dict[str, object]] = []

    def paper_value(label: str, model: str, cell_bits: str) -> Optional[float]:
        row = paper.get(label)
        if not comparable.get(model) or row is None or row.get("bits") != cell_bits:
            return None
        value = row.get(model)
        return value if isinstance(value, float) else None

    rows = [(FULL_PRECISION, "32/32/32")] + [(label, label_bits[label]) for label in labels]
    for label, row_bits in rows:
        parts = [label, row_bits]
        for model in models:
            if label == FULL_PRECISION:
                ours = fp_value(model)
            else:
                cell = by_label.get((model, label))
                row = (
                    None
                    if cell is None
                    else latest.get(result_key(model, cell.method, cell.ptf, cell.lis, bits[cell]))
                )
                ours = None if row is None else _float(row.get("top1"))
            reference = paper_value(label, model, row_bits)
            parts += [_fmt(ours), _fmt(reference), _diff(ours, reference)]
            out_cells.append(
                {
                    "model": model,
                    "label": label,
                    "bits": row_bits,
                    "top1": ours,
                    "paper": reference,
                    "diff": None if ours is None or reference is None else ours - reference,
                }
            )
        lines.append("| " + " | ".join(parts) + " |")
    notes = [
        f"*{m}*: not the published network (reduced architecture or classes): no paper value."
        for m in models
        if not comparable.get(m)
    ]
    if notes:
        lines += [""] + notes
    if peers:
        relevant = [p for p in peers if p["model"] in models and comparable.get(p["model"])]
        if relevant:
            lines += [
                "",
                "Other methods' published top-1 for the same models (for comparison only: they keep "
                "LayerNorm and softmax in floating point, FQ-ViT quantizes them):",
                "",
                "| Method (published) | W/A | " + " | ".join(models) + " |",
                "|---|---|" + "---:|" * len(models),
            ]
            groups: dict[tuple, dict[str, Optional[float]]] = {}
            for peer in relevant:
                groups.setdefault((peer["method"], peer["bits"]), {})[peer["model"]] = peer["top1"]
            for (method, peer_bits), values in groups.items():
                lines.append(
                    f"| {method} | {peer_bits} | "
                    + " | ".join(_fmt(values.get(m)) for m in models)
                    + " |"
                )
    return "\n".join(lines) + "\n", out_cells
