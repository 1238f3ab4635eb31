"""How long the quantization report takes next to one calibration (paired, same process).

Default: the offline demo's network (configs/demo.yaml: deit_tiny at 32x32, embed 96, depth 4)
and its data (digits: calibration 4 batches of 32 training images, the report on 1 batch of 32
validation images, as ``--report.dir`` does by default). Per repetition, back to back:
calibration, the report's analysis without and with the layer sensitivity, and the figures and
files (``write_report``). Prints the medians and the median of the per-repetition ratios to the
calibration: (a) the analysis with the sensitivity, (b) the figures and files, (c) the whole
report, a + b. Also the first figures and files of the process, which import matplotlib.

``--cli N`` also runs the demo's validate step N times as a user does (``main.py validate
--config configs/demo.yaml --ckpt_path CKPT --report.dir ...``, a fresh process each, with
``--calibration.recalibrate true`` so that the process calibrates as well) and prints what the
QuantReport callback spent there next to the calibration callback (from report.json's timing).

    python benchmarks/report_time.py
    python benchmarks/report_time.py --ckpt runs/demo/checkpoints/last.ckpt --threads 1 --cli 3
    python benchmarks/report_time.py --model deit_small --img-size 224 --batch-size 16 \\
        --calib-batches 10 --report-batches 1 --data random                     # a published shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from fqvit_pl.analysis import quant_report, write_report
from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_network import demo_model  # noqa: E402


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="deit_tiny")
    p.add_argument("--img-size", type=int, default=None, help="default: the demo's 32 (deit_tiny)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--report-batches", type=int, default=1)
    p.add_argument("--data", choices=("digits", "random"), default="digits")
    p.add_argument(
        "--ckpt", default=None, help="a Lightning checkpoint of the demo (float weights)"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-files", action="store_true", help="skip the figures and files")
    p.add_argument(
        "--cli",
        type=int,
        default=0,
        metavar="N",
        help="also time N runs of the demo's `main.py validate --report.dir` (needs --ckpt)",
    )
    return p.parse_args(argv)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "deit_tiny" and args.img_size in (None, 32):
        return demo_model(args.ckpt)  # float weights: the benchmark times the calibration
    if args.ckpt:
        raise SystemExit("report_time.py: --ckpt is the demo's checkpoint, for the demo's network")
    return create_model(args.model, num_classes=10, model_kwargs={"img_size": args.img_size or 224})


def _data(args: argparse.Namespace, size: int) -> tuple[list, list]:
    if args.data == "digits":
        from datamodules import DigitsDataModule

        dm = DigitsDataModule(
            img_size=size,
            batch_size=args.batch_size,
            calib_batch_size=args.batch_size,
            num_calib_batches=args.calib_batches,
        )
        calib = [x for x, _ in dm.calibration_dataloader()]
        shown = list(dm.val_dataloader())[: args.report_batches]
        return calib, shown
    g = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randn(args.batch_size, 3, size, size, generator=g)

    calib = [batch() for _ in range(args.calib_batches)]
    shown = [
        (batch(), torch.randint(0, 10, (args.batch_size,), generator=g))
        for _ in range(args.report_batches)
    ]
    return calib, shown


def _cli_runs(args: argparse.Namespace) -> dict[str, float]:
    """The demo's validate step with a report, ``args.cli`` times: the callbacks' own timing."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, list[float]] = {}
    for _ in range(args.cli):
        with tempfile.TemporaryDirectory() as folder:
            command = [
                sys.executable,
                str(root / "main.py"),
                "validate",
                "--config",
                str(root / "configs" / "demo.yaml"),
                "--ckpt_path",
                args.ckpt,
                "--calibration.recalibrate",
                "true",
                "--report.dir",
                f"{folder}/report",
                "--results.csv_path",
                f"{folder}/results.csv",
                "--trainer.default_root_dir",
                folder,
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
            ]
            start = time.perf_counter()
            subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
            runs.setdefault("process", []).append(time.perf_counter() - start)
            timing = json.loads(Path(folder, "report", "report.json").read_text())["timing"]
        calibration = timing["calibration_seconds"]
        files = timing["files_seconds"] + (timing.get("table_figure_seconds") or 0.0)
        for key, value in (
            ("calibration", calibration),
            ("analysis", timing["analysis_seconds"]),
            ("files", files),
            ("total", timing["analysis_seconds"] + files),
        ):
            runs.setdefault(key, []).append(value)
            runs.setdefault(f"{key}_ratio", []).append(value / calibration)
    return {key: statistics.median(values) for key, values in runs.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args = parse(argv)
    if args.cli and not args.ckpt:
        raise SystemExit("report_time.py: --cli needs --ckpt (the demo's checkpoint)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _model(args)
    size = model.pretrained_cfg["input_size"][-1]
    calib, shown = _data(args, size)
    calibrate(model, calib)  # warm-up (kernel tables, allocator)
    report = quant_report(model, shown[:1])
    first_files = None
    if not args.no_files:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            write_report(report, folder)  # the first imports matplotlib
            first_files = time.perf_counter() - start
    times: dict[str, list[float]] = {
        "calibration": [],
        "analysis": [],
        "analysis_no_sens": [],
        "files": [],
        "total": [],
    }
    for _ in range(args.reps):
        start = time.perf_counter()
        calibrate(model, calib)
        times["calibration"].append(time.perf_counter() - start)
        start = time.perf_counter()
        quant_report(model, shown, sensitivity=False)
        times["analysis_no_sens"].append(time.perf_counter() - start)
        start = time.perf_counter()
        report = quant_report(model, shown)
        times["analysis"].append(time.perf_counter() - start)
        if not args.no_files:
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                write_report(report, folder)
                times["files"].append(time.perf_counter() - start)
            times["total"].append(times["analysis"][-1] + times["files"][-1])
    images_calib = sum(len(b) for b in calib)
    images_report = report["output"]["num_images"]
    print(
        f"{args.model} {size}x{size}, {torch.get_num_threads()} threads, {args.reps} reps; "
        f"calibration {len(calib)} batches ({images_calib} images), report {len(shown)} batch(es) "
        f"({images_report} images), {len(report['sensitivity'])} layers; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"{'phase':<44}{'median s':>10}{'x calibration':>16}")
    summary = {}
    for key, label in (
        ("calibration", "calibration (fqvit_pl.quant.calibrate)"),
        ("analysis_no_sens", "report analysis, no sensitivity"),
        ("analysis", "(a) report analysis, with sensitivity"),
        ("files", "(b) figures + report.json/.md"),
        ("total", "(c) whole report, a + b"),
    ):
        if not times[key]:
            continue
        ratio = statistics.median(t / c for t, c in zip(times[key], times["calibration"]))
        median = statistics.median(times[key])
        summary[key] = median
        summary[f"{key}_ratio"] = ratio
        print(f"{label:<44}{median:>10.3f}{ratio:>16.2f}")
    if first_files is not None:
        summary["first_files"] = first_files
        print(f"{'(b) first in the process (imports matplotlib)':<44}{first_files:>10.3f}")
    if args.cli:
        cli = _cli_runs(args)
        summary.update({f"cli_{key}": value for key, value in cli.items()})
        print(
            f"main.py validate --report.dir (demo, {args.cli} processes, medians; "
            f"validate step {cli['process']:.1f} s wall):"
        )
        for key, label in (
            ("calibration", "QuantCalibration callback"),
            ("analysis", "QuantReport: analysis"),
            ("files", "QuantReport: figures (table too) + files"),
            ("total", "QuantReport: whole report"),
        ):
            print(f"  {label:<42}{cli[key]:>10.3f}{cli[key + '_ratio']:>16.2f}")
    return summary


if __name__ == "__main__":
    main()
