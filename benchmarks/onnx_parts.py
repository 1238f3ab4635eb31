"""Accuracy of each part of ``export_onnx``'s fast form, alone, against our integer model.

For each model (the reduced random networks of ``tests/export/export_helpers.py``: unit-gain
weights, calibrated on random images), the graph is exported with one part in its fast form and
the rest exact, run by ONNX Runtime (``gemm="u8u8"``, exact on every x86 CPU), and compared with
the integer model computed exactly (``int_mm`` GEMMs, IEEE float32 ``sqrt``, as the exact tests):
``‖ort − integer‖ / ‖simulated − float‖`` (the issue's bar: 0.05), top-1 agreement (bar: 99%) and
the share of images whose logits are equal bit for bit.

With ``--ckpt`` the network is instead the offline demo's trained one (``configs/demo.yaml``,
with the calibration its checkpoint carries) on the digits' validation images: the same
measurements on trained weights.

    python benchmarks/onnx_parts.py                          # deit_tiny and swin_tiny, 64 images
    python benchmarks/onnx_parts.py --models deit_tiny --images 32
    python benchmarks/onnx_parts.py --ckpt runs/demo/checkpoints/last.ckpt   # the trained demo
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "export"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

PARTS = ("none", "scores", "quantize", "linear", "layernorm", "softmax", "all")


def reduced_network(name: str, count: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The reduced random test network ``name``, calibrated, and ``count`` random images."""
    from export_helpers import ARCHS, calibrated, images

    return calibrated(name), images(count, ARCHS[name]["img_size"], 100)


def demo_network(ckpt: str, count: int | None) -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo's trained network with its checkpoint's calibration, and its validation images."""
    from demo_network import demo_model, demo_model_args

    from datamodules import DigitsDataModule

    size = demo_model_args()["model_kwargs"]["img_size"]
    x = torch.cat([images for images, _ in DigitsDataModule(img_size=size).val_dataloader()])
    return demo_model(ckpt, calibration=True), x[:count]


@torch.no_grad()
def measure(label: str, model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """One row per part: distance to the exact integer model, top-1 agreement, bit-equal images."""
    import onnxruntime as ort

    from fqvit_pl.export.onnx_graph import _FAST_PARTS, _Exporter
    from fqvit_pl.quant import disable_quantization, enable_quantization, to_integer

    enable_quantization(model)  # a loaded checkpoint's calibration starts switched off
    simulated = model(x)
    disable_quantization(model)
    full = model(x)
    enable_quantization(model)
    error = (simulated - full).norm()
    from export_helpers import ieee_sqrt

    sqrt, torch.sqrt = torch.sqrt, ieee_sqrt
    try:
        integer = to_integer(model).set_backend("int_mm")
        reference = integer(x)
    finally:
        torch.sqrt = sqrt
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    rows = []
    for part in PARTS:
        exporter = _Exporter(integer, exact=part == "none", gemm="u8u8")
        exporter.fast = set(_FAST_PARTS) if part == "all" else set() if part == "none" else {part}
        session = ort.InferenceSession(
            exporter.build().SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        out = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        rows.append({
            "model": label, "fast part": part,
            "distance / quantization error": float((out - reference).norm() / error),
            "top-1 agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
            "bit-equal images": float((out == reference).all(1).float().mean()),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "swin_tiny"])
    parser.add_argument("--images", type=int, default=None, help="default: 64 (--ckpt: all 359)")
    parser.add_argument(
        "--ckpt", help="the demo's Lightning checkpoint: measure its trained network"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.ckpt:
        rows = measure("demo", *demo_network(args.ckpt, args.images))
    else:
        count = args.images or 64
        rows = [row for name in args.models for row in measure(name, *reduced_network(name, count))]
    print(
        f"{'model':10s} {'fast part':10s} {'‖ort−int‖/‖sim−float‖':>22s} {'top-1':>6s} {'bit-equal':>9s}"
    )
    for r in rows:
        print(
            f"{r['model']:10s} {r['fast part']:10s} {r['distance / quantization error']:22.3f} "
            f"{100 * r['top-1 agreement']:5.1f}% {100 * r['bit-equal images']:8.1f}%"
        )
    return rows


if __name__ == "__main__":
    main()
