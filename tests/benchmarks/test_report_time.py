"""Smoke test of benchmarks/report_time.py: a tiny run prints its table (no timing is asserted)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "report_time.py"


def test_tiny_run_prints_the_phases(capsys):
    spec = importlib.util.spec_from_file_location("report_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(
        [
            "--batch-size",
            "4",
            "--calib-batches",
            "2",
            "--reps",
            "1",
            "--data",
            "random",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "report analysis, with sensitivity" in out and "calibration" in out
    assert summary["calibration"] > 0 and summary["analysis_ratio"] > 0
