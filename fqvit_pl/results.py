"""One row per evaluation run: the one-line summary and the results CSV (no Lightning import).

A row holds what identifies a cell of the paper's table (model, method, ptf, lis, bits) and what
the run measured (top-1/top-5 in percent, calibration seconds, images per second, …).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import IO, Iterator, Optional

from fqvit_pl.checks import check_writable_file

__all__ = ["ResultRow", "RESULT_COLUMNS", "format_summary", "append_result", "check_results_path"]


@dataclass(frozen=True)
class ResultRow:
    """The outcome of one validation/test run.

    Accuracies are percentages (as in ``fqvit_pl/reference/paper_table.csv``); ``None`` marks a value the run did
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
    ln_eps: float = 0.0


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
        *([f"ln_eps={row.ln_eps:g}"] if row.ln_eps else []),
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


def _read_header(path: str) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _check_header(path: str, header: list[str]) -> None:
    if tuple(header) != RESULT_COLUMNS:
        raise ValueError(
            f"results CSV {path!r} has columns {header}, expected {list(RESULT_COLUMNS)}: "
            "choose another path (--results.csv_path) or move the old file away"
        )


def _line(values: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()


def _create_with_header(path: str) -> None:
    """Create ``path`` holding only the header, atomically: no other process sees it half-written,
    and of several processes creating it at once exactly one succeeds (``os.link`` never replaces)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".results-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(_line(list(RESULT_COLUMNS)))
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first; its header is the same
        except OSError:
            pass  # no hard links here: the locked append below writes the header of an empty file
    finally:
        os.unlink(temporary)


@contextmanager
def _exclusive(f: IO[str]) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``f`` (POSIX ``flock``; elsewhere only the atomic
    create and the single appending write below order concurrent writers)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_results_path(path: str | os.PathLike, option: str = "--results.csv_path") -> None:
    """Raise before a run when a row could not be appended to ``path`` later.

    Raises:
        IsADirectoryError, NotADirectoryError, PermissionError: see
            :func:`fqvit_pl.checks.check_writable_file`.
        ValueError: the file exists with other columns.
    """
    path = os.fspath(path)
    check_writable_file(path, option)
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        _check_header(path, _read_header(path))


def append_result(path: str | os.PathLike, row: ResultRow) -> None:
    """Append ``row`` to the CSV at ``path``, creating the folders and the header when new.

    Safe for several processes appending to the same file at once: the file is created with its
    header atomically, and each row is written under an exclusive lock in one appending write.

    Raises:
        ValueError: the file exists with a different header (rows would land in wrong columns).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        _create_with_header(path)
    with open(path, "a+", newline="") as f, _exclusive(f):
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:  # an existing empty file: its header is still missing
            f.write(_line(list(RESULT_COLUMNS)))
        else:
            _check_header(path, _read_header(path))
        f.write(_line([_cell(v) for v in asdict(row).values()]))
        f.flush()  # inside the lock
