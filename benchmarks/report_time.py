"""How long the quantization report takes next to one calibration (paired, same process).

Default: the offline demo's network (configs/demo.yaml: deit_tiny at 32x32, embed 96, depth 4)
and its data (digits: calibration 4 batches of 32 training images, the report on 1 batch of 32
validation images, as ``--report.dir`` does by default). Per repetition, back to back:
calibration, the report's analysis without and with the layer sensitivity, and the figures and
files. Prints the medians and the median of the per-repetition ratios to the calibration.

    python benchmarks/report_time.py
    python benchmarks/report_time.py --ckpt runs/demo/checkpoints/last.ckpt   # the trained demo
    python benchmarks/report_time.py --model deit_small --img-size 224 --batch-size 16 \\
        --calib-batches 10 --report-batches 1 --data random                     # a published shape
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Optional

import torch

from fqvit_pl.analysis import quant_report, write_report
from fqvit_pl.models import create_model, load_checkpoint, quant_state_keys, read_checkpoint
from fqvit_pl.quant import calibrate

DEMO = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}


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
    return p.parse_args(argv)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "deit_tiny" and args.img_size in (None, 32):
        model = create_model("deit_tiny", num_classes=10, model_kwargs=DEMO)
    else:
        model = create_model(
            args.model, num_classes=10, model_kwargs={"img_size": args.img_size or 224}
        )
    if args.ckpt:
        state = read_checkpoint(args.ckpt)["state_dict"]
        quant = quant_state_keys(model)
        float_state = {
            k[4:]: v for k, v in state.items() if k.startswith("net.") and k[4:] not in quant
        }
        load_checkpoint(model, float_state, source=args.ckpt)
    return model


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


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _model(args)
    size = model.pretrained_cfg["input_size"][-1]
    calib, shown = _data(args, size)
    calibrate(model, calib)  # warm-up (kernel tables, allocator)
    quant_report(model, shown[:1], sensitivity=False)
    times: dict[str, list[float]] = {
        "calibration": [],
        "analysis": [],
        "analysis_no_sens": [],
        "files": [],
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
    images_calib = sum(len(b) for b in calib)
    images_report = report["output"]["num_images"]
    print(
        f"{args.model} {size}x{size}, {torch.get_num_threads()} threads, {args.reps} reps; "
        f"calibration {len(calib)} batches ({images_calib} images), report {len(shown)} batch(es) "
        f"({images_report} images), {len(report['sensitivity'])} layers"
    )
    print(f"{'phase':<36}{'median s':>10}{'x calibration':>16}")
    summary = {}
    for key, label in (
        ("calibration", "calibration (fqvit_pl.quant.calibrate)"),
        ("analysis_no_sens", "report analysis, no sensitivity"),
        ("analysis", "report analysis, with sensitivity"),
        ("files", "figures + report.json/.md"),
    ):
        if not times[key]:
            continue
        ratio = statistics.median(t / c for t, c in zip(times[key], times["calibration"]))
        median = statistics.median(times[key])
        summary[key] = median
        summary[f"{key}_ratio"] = ratio
        print(f"{label:<36}{median:>10.3f}{ratio:>16.2f}")
    return summary


if __name__ == "__main__":
    main()
