"""Speed and size of the integer model (``fqvit_pl.quant.to_integer``) against timm's float model.

    python benchmarks/integer_speed.py                       # deit_tiny deit_small swin_tiny
    python benchmarks/integer_speed.py --models deit_tiny --reps 5 --no-compile

Batch 8 of 224x224 random images, random unit-gain weights (speed barely depends on their values;
unit gain gives attention scores of a trained model's range, which selects the float64 path of
the integer Log-Int-Softmax as real models do), one calibration batch. Rows, each paired with timm's float model (eager) in the same process:

- ``integer eager``: the integer model as is (oneDNN's int8 GEMM where available);
- ``integer compiled``: ``fqvit_pl.quant.compile_integer`` of it: one ``torch.compile`` graph with
  inductor's freezing (weights and oneDNN's packed int8 weights as graph constants), the GEMM
  backend ``--compile-backend`` (default: oneDNN's quantized linear where it runs, requantization
  fused; ``int_mm``: ``torch._int_mm``); its logits are checked bit-equal to the eager integer
  model's with the same backend before timing;
- ``torchao int8`` (optional): torchao's X86InductorQuantizer (int8 linears only), compiled, when
  torchao is installed and works with this torch.

The ratio is the median over ``--reps`` repetitions of ``float time / integer time`` for two runs
timed back to back, so a busy machine slows both sides of a pair. glibc's allocator returns large
freed blocks to the kernel by default, and the page faults of re-growing the heap made the float
model's eager time swing 150-260 ms; the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` raised to 1 GiB (``--default-malloc``
keeps glibc's defaults) and prints what it used. Sizes: bytes of parameters and buffers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cpu_timing import MALLOC, add_clock_option, clock, with_malloc_thresholds

TIMM = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small", "swin_tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--torchao", action="store_true", help="add torchao's int8 row")
    parser.add_argument(
        "--compile-backend",
        nargs="+",
        default=[None],
        choices=["onednn", "int_mm"],
        help="GEMM backend(s) of the compiled rows (default: compile_integer's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--default-malloc", action="store_true")
    add_clock_option(parser)
    return parser.parse_args()


def _state_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _paired(
    float_fn, int_fn, reps: int, sync, timer=time.perf_counter
) -> tuple[float, float, float]:
    """Median (float ms, integer ms, float / integer) over ``reps`` back-to-back pairs."""
    pairs = []
    for _ in range(reps):
        t0 = timer()
        float_fn()
        sync()
        t1 = timer()
        int_fn()
        sync()
        t2 = timer()
        pairs.append((t1 - t0, t2 - t1))
    ratio = statistics.median(a / b for a, b in pairs)
    return (
        1000 * statistics.median(a for a, _ in pairs),
        1000 * statistics.median(b for _, b in pairs),
        ratio,
    )


def _torchao_model(float_model, images):
    """timm's model with torchao's X86InductorQuantizer (int8 linears), compiled; None if unavailable."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as err:
        print(f"  torchao: not usable here ({err})")
        return None
    import torch

    exported = torch.export.export(float_model, (images,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config()
    )
    prepared = prepare_pt2e(exported, quantizer)
    prepared(images)
    converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True
    return torch.compile(converted)


def main() -> None:
    args = _args()
    if not args.default_malloc:
        with_malloc_thresholds()
    import timm
    import torch

    from fqvit_pl.models import create_model
    from fqvit_pl.quant import calibrate, compile_integer, to_integer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    malloc = (
        "glibc defaults"
        if args.default_malloc
        else ", ".join(f"{k}={v}" for k, v in MALLOC.items())
    )
    timer = clock(args.clock)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
        f"load average {os.getloadavg()[0]:.1f}, batch {args.batch}x3x224x224, "
        f"device {device}, allocator: {malloc}; ratio = median of {args.reps} paired runs"
    )
    print("| model | row | float, timm (ms) | integer (ms) | speed-up vs float | bytes vs float |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        reference = timm.create_model(TIMM[name], pretrained=False).eval()
        with torch.no_grad():  # unit-gain Linears: attention scores of trained-model magnitude
            for module in reference.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
        reference = reference.to(device)
        model = create_model(name)
        model.load_state_dict(reference.state_dict(), strict=False)
        model = model.to(device)
        images = torch.randn(args.batch, 3, 224, 224, device=device)
        with torch.no_grad():
            calibrate(model, [images])
            integer = to_integer(model)
            size = _state_bytes(integer) / _state_bytes(reference)
            rows = [("integer eager", integer)]
            if not args.no_compile:
                for backend in args.compile_backend:
                    source = to_integer(model)
                    compiled = compile_integer(source, backend)
                    if not torch.equal(compiled(images), source(images)):
                        raise SystemExit(f"{name}: compiled logits differ from eager ({backend})")
                    rows.append((f"integer compiled ({compiled.backend}, frozen)", compiled))
            if args.torchao:
                ao = _torchao_model(reference, images)
                if ao is not None:
                    rows.append(("torchao int8 (compiled, frozen)", ao))
            for label, runner in rows:
                for _ in range(2):  # warm up (and compile)
                    reference(images)
                    runner(images)
                sync()
                f_ms, i_ms, ratio = _paired(
                    lambda: reference(images), lambda: runner(images), args.reps, sync, timer
                )
                print(
                    f"| {name} | {label} | {f_ms:.0f} | {i_ms:.0f} | **{ratio:.2f}x** | "
                    f"{size if label.startswith('integer') else float('nan'):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
