"""benchmarks/onnx_speed.py: the headline ratio is paired per repetition (no timing is asserted)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "onnx_speed.py"


def test_speedup_is_the_median_of_back_to_back_ratios():
    spec = importlib.util.spec_from_file_location("onnx_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # reps: (int8, float) = (10, 20), (30, 40), (5, 100): speedups 2, 4/3, 20 → median 2
    assert bench.paired_ratio([10.0, 30.0, 5.0], [20.0, 40.0, 100.0]) == 2.0
    # not the ratio of the medians (40 / 10 = 4)
