"""ONNX Runtime speed and file sizes of the exported integer model, against timm's float model.

For each model, in one process and with the same random weights: timm's float model exported to
ONNX (``torch.onnx.export``, opset 17) and our integer model exported by
:func:`fqvit_pl.export.export_onnx`, both run by ONNX Runtime's CPU provider with the same session
options (``--threads`` intra-op threads, all graph optimizations). The two sessions alternate within
every repetition, so that load on the machine hits them alike; the headline *int8 ÷ float speedup*
is the median over repetitions of the ratio of the two runs timed back to back. Also printed: the
int8 safetensors artifact against the float safetensors file, both ONNX files, and the integer GEMM
kernels ONNX Runtime kept in its optimized graph.

Weights are random, calibrated on random images (no download): ``--weights unit`` (default:
unit-gain Linear weights, LayerNorm gains around 1, score ranges like a trained network's) or
``--weights timm`` (timm's initialization, tiny weights). Speed depends on the values only in the
exact form's Log-Int-Softmax, which divides in int64 where a row's exponentials may sum past 2**52
(small score scales: timm's initialization).

    python benchmarks/onnx_speed.py                                # deit_tiny, batch 8, 2 threads
    python benchmarks/onnx_speed.py --models deit_tiny swin_tiny --reps 7
    python benchmarks/onnx_speed.py --profile                      # + time per ONNX op type
    python benchmarks/onnx_speed.py --form exact                   # the bit-exact graph
    python benchmarks/onnx_speed.py --fast-parts layernorm softmax # exact but for these parts
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fqvit_pl.export.onnx_graph import _FAST_PARTS  # noqa: E402  (after the path)

INTEGER_GEMMS = ("MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul")


def paired_ratio(fast: list[float], slow: list[float]) -> float:
    """Median over repetitions of ``slow[i] / fast[i]`` (each pair timed back to back)."""
    return statistics.median(s / f for f, s in zip(fast, slow))


@torch.no_grad()
def unit_gain(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights of unit gain (``N(0, 1 / fan_in)``), LayerNorm gains ``N(1, 0.2)``, in place."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(
                torch.randn(module.weight.shape, generator=generator) * fan_in**-0.5
            )
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        elif isinstance(module, torch.nn.LayerNorm):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2 + 1)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def _session(path: str, threads: int, optimized: str | None = None, profile: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _time(session: Any, images: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(None, {"images": images})
    return time.perf_counter() - start


def _op_times(session: Any, images: np.ndarray, runs: int = 2) -> list[tuple[str, float, int]]:
    for _ in range(runs):
        session.run(None, {"images": images})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    return [(op, us / runs / 1000, count[op] // runs) for op, us in total.most_common(12)]


def bench_model(name: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Export both models of ``name``, compare file sizes, time both sessions; returns the row."""
    import onnx
    import timm
    from safetensors.torch import save_file

    from fqvit_pl.export import export_onnx, save_quantized
    from fqvit_pl.models import create_model
    from fqvit_pl.quant import calibrate

    torch.manual_seed(0)
    model = create_model(name)
    if args.weights == "unit":
        unit_gain(model)
    size = model.pretrained_cfg["input_size"][-1]
    float_model = timm.create_model(model.pretrained_cfg["architecture"], pretrained=False).eval()
    float_model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in float_model.state_dict()}
    )
    float_weights = os.path.join(workdir, f"{name}_float.safetensors")
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, float_weights)
    generator = torch.Generator().manual_seed(0)
    calibrate(
        model,
        [torch.randn(args.batch, 3, size, size, generator=generator) for _ in range(2)],
    )
    int8_weights = os.path.join(workdir, f"{name}_int8.safetensors")
    save_quantized(model, int8_weights)
    int8_onnx = os.path.join(workdir, f"{name}_int8.onnx")
    if args.fast_parts:  # the exact graph with only these parts in their fast form
        from fqvit_pl.export.artifact import as_integer_model
        from fqvit_pl.export.onnx_graph import _Exporter

        exporter = _Exporter(as_integer_model(model), exact=False, gemm=args.gemm)
        exporter.fast = set(args.fast_parts)
        onnx.save(exporter.build(), int8_onnx)
    else:
        export_onnx(model, int8_onnx, exact=args.form == "exact", gemm=args.gemm)
    float_onnx = os.path.join(workdir, f"{name}_float.onnx")
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    with torch.no_grad():
        torch.onnx.export(
            float_model, (images,), float_onnx, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    optimized = os.path.join(workdir, f"{name}_int8.optimized.onnx")
    int8 = _session(int8_onnx, args.threads, optimized)
    fp32 = _session(float_onnx, args.threads)
    kernels = collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)
    x = images.numpy()
    for _ in range(args.warmup):
        int8.run(None, {"images": x})
        fp32.run(None, {"images": x})
    t_int8, t_fp32 = [], []
    for _ in range(args.reps):
        t_fp32.append(_time(fp32, x))
        t_int8.append(_time(int8, x))
    row = {
        "model": name,
        "form": f"fast:{'+'.join(args.fast_parts)}/{args.gemm}"
        if args.fast_parts
        else f"{args.form}/{args.gemm}",
        "weights": args.weights,
        "batch": args.batch,
        "threads": args.threads,
        "float_ms": 1000 * statistics.median(t_fp32),
        "int8_ms": 1000 * statistics.median(t_int8),
        "speedup": paired_ratio(t_int8, t_fp32),
        "float_safetensors_mb": os.path.getsize(float_weights) / 2**20,
        "int8_safetensors_mb": os.path.getsize(int8_weights) / 2**20,
        "float_onnx_mb": os.path.getsize(float_onnx) / 2**20,
        "int8_onnx_mb": os.path.getsize(int8_onnx) / 2**20,
        "integer_gemms": {op: kernels[op] for op in INTEGER_GEMMS if kernels[op]},
        "float_matmuls": sum(kernels[op] for op in ("MatMul", "FusedMatMul", "Gemm")),
    }
    if args.profile:
        row["int8_op_ms"] = _op_times(_session(int8_onnx, args.threads, profile=True), x)
        row["float_op_ms"] = _op_times(_session(float_onnx, args.threads, profile=True), x)
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The table of speeds and sizes, then the kernels and (with --profile) time per op type."""
    width = max(10, *(len(r["form"]) for r in rows))
    print(
        f"{'model':10s} {'form':{width}s} {'batch':>5s} {'thr':>3s} {'float ms':>9s} {'int8 ms':>8s} "
        f"{'int8/float speedup':>18s} {'float st MB':>11s} {'int8 st MB':>10s} {'ratio':>5s} "
        f"{'float onnx MB':>13s} {'int8 onnx MB':>12s}"
    )
    for r in rows:
        print(
            f"{r['model']:10s} {r['form']:{width}s} {r['batch']:5d} {r['threads']:3d} {r['float_ms']:9.1f} "
            f"{r['int8_ms']:8.1f} {r['speedup']:17.2f}x {r['float_safetensors_mb']:11.2f} "
            f"{r['int8_safetensors_mb']:10.2f} "
            f"{r['int8_safetensors_mb'] / r['float_safetensors_mb']:5.2f} "
            f"{r['float_onnx_mb']:13.2f} {r['int8_onnx_mb']:12.2f}"
        )
    for r in rows:
        print(
            f"{r['model']}: integer GEMM kernels in ONNX Runtime's optimized graph "
            f"{r['integer_gemms']}, float MatMul/Gemm {r['float_matmuls']} (LIS attn @ V, exact)"
        )
        for key in ("int8_op_ms", "float_op_ms"):
            if key in r:
                ops = ", ".join(f"{op} {ms:.1f} ms ({n})" for op, ms, n in r[key])
                print(f"  {key[:-6]} time per op type: {ops}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the rows (also printed, and written with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also print time per op type")
    parser.add_argument(
        "--form", choices=["exact", "fast"], default="fast", help="export_onnx(exact=...)"
    )
    parser.add_argument(
        "--fast-parts",
        nargs="+",
        choices=_FAST_PARTS,
        help="export the exact form with only these parts fast (overrides --form)",
    )
    parser.add_argument("--gemm", choices=["u8s8", "u8u8"], default="u8s8", help="export_onnx gemm")
    parser.add_argument(
        "--weights", choices=["unit", "timm"], default="unit", help="random weights: see above"
    )
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows.append(bench_model(name, args, workdir))
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
