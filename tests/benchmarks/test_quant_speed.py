"""Smoke test of benchmarks/quant_speed.py: a tiny run prints every table (no timing is asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quant_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quant_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_is_the_median_of_back_to_back_ratios(bench):
    # reps: (quantized, float) = (10, 20), (30, 40), (5, 100): ratios 0.5, 0.75, 0.05
    assert bench.paired_ratio([10.0, 30.0, 5.0], [20.0, 40.0, 100.0]) == 0.5
    # not the ratio of the medians (10 / 40 = 0.25)


def test_tiny_run_prints_the_tables(bench, capsys, tmp_path):
    out = tmp_path / "raw.json"
    bench.main(
        [
            "--models",
            "deit_tiny",
            "--img-size",
            "32",
            "--batch-size",
            "2",
            "--methods",
            "minmax",
            "omse",
            "--reps",
            "2",
            "--calib-batches",
            "2",
            "--calib-reps",
            "1",
            "--no-compile",
            "--no-memory",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    report = capsys.readouterr().out
    assert "| deit_tiny | eager |" in report
    assert "| deit_tiny | omse, ptf on |" in report and "| deit_tiny | minmax, ptf off |" in report
    raw = json.loads(out.read_text())["results"][0]
    assert set(raw["eager_img_s"]) == {"float (timm)", "float (fqvit, quant off)", "minmax", "omse"}
    assert all(len(rates) == 2 and min(rates) > 0 for rates in raw["eager_img_s"].values())


def test_one_compiled_graph_takes_every_methods_calibration(bench):
    # The compile rows run all methods through the first method's compiled module by loading each
    # calibration into it; the configuration guard refuses that unless the labels are the host's.
    import torch

    from fqvit_pl.models import create_model
    from fqvit_pl.quant import CalibrationConfigError, calibrate

    tiny = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    host = create_model("deit_tiny", method="minmax", num_classes=4, model_kwargs=tiny)
    other = create_model("deit_tiny", method="omse", num_classes=4, model_kwargs=tiny)
    other.load_state_dict(host.state_dict())  # same float weights (uncalibrated: any config)
    calibrate(other, [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))])
    with pytest.raises(CalibrationConfigError):
        host.load_state_dict(other.state_dict())
    host.load_state_dict(bench.with_host_labels(host, other.state_dict()))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(host(x), other(x))  # the omse calibration, run by the minmax host
