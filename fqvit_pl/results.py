"""One row per evaluation run: the one-line summary and the results CSV (no Lightning import).

A row holds what identifies a cell of the paper's table (model, method, ptf, lis, bits) and what
the run measured (top-1/top-5 in percent, calibration seconds, images per second, …).
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["ResultRow", "RESULT_COLUMNS", "format_summary", "append_result"]


@dataclass(frozen=True)
class ResultRow:
    """The outcome of one validation/test run.

    Accuracies are percentages (as in ``paper_table.csv``); ``None`` marks a value the run did
    not measure (e.g. ``calib_seconds`` when a calibrated checkpoint was evaluated as is).
    """

    model: str
    method: str
    ptf: bool
    lis: bool
    bits: str
    top1: Optional[float]
    top5: Optional[float]
    calib_seconds: Optional[float]
    images_per_s: Optional[float]
    num_images: Optional[int] = None
    fp_top1: Optional[float] = None
    fp_agreement: Optional[float] = None
    loss: Optional[float] = None
    stage: str = "validate"
    timestamp: str = ""
    execution: str = "simulated"
    sim_agreement: Optional[float] = None


#: Column order of the results CSV.
RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ResultRow))


def _num(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(row: ResultRow) -> str:
    """The one-line summary of ``row``, e.g.

    ``deit_small minmax ptf=True lis=True W/A/Attn=8/8/4 top1=78.40 top5=94.12 calib=12.3s 810.2 img/s``
    (plus ``fp_top1`` and ``fp_agreement`` when measured).
    """
    parts = [
        row.model,
        row.method,
        f"ptf={row.ptf}",
        f"lis={row.lis}",
        f"W/A/Attn={row.bits}",
        *([f"execution={row.execution}"] if row.execution != "simulated" else []),
        f"top1={_num(row.top1, 2)}",
        f"top5={_num(row.top5, 2)}",
    ]
    if row.fp_top1 is not None:
        parts.append(f"fp_top1={_num(row.fp_top1, 2)}")
    if row.fp_agreement is not None:
        parts.append(f"fp_agreement={_num(row.fp_agreement, 2)}")
    if row.sim_agreement is not None:
        parts.append(f"sim_agreement={_num(row.sim_agreement, 2)}")
    parts.append("calib=n/a" if row.calib_seconds is None else f"calib={row.calib_seconds:.1f}s")
    parts.append(f"{_num(row.images_per_s, 1)} img/s")
    return " ".join(parts)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def append_result(path: str | os.PathLike, row: ResultRow) -> None:
    """Append ``row`` to the CSV at ``path``, creating the folders and the header when new.

    Raises:
        ValueError: the file exists with a different header (rows would land in wrong columns).
    """
    path = os.fspath(path)
    exists = os.path.isfile(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != RESULT_COLUMNS:
            raise ValueError(
                f"results CSV {path!r} has columns {header}, expected {list(RESULT_COLUMNS)}: "
                "choose another path or move the old file away"
            )
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if not exists:
            writer.writerow(RESULT_COLUMNS)
        writer.writerow([_cell(v) for v in asdict(row).values()])
