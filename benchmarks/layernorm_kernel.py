"""Microbenchmark: the integer LayerNorm (and the residual before it) on one tensor, pure PyTorch
kernels vs the fused C++ ones (``fqvit_pl/quant/integer/csrc/ln.cpp``), eager.

    python benchmarks/layernorm_kernel.py --shape 8 197 192 --threads 1

Prints milliseconds per call of each (the best of three interleaved rounds of the median of
``--reps`` calls; ``--clock cpu``: this process's CPU time, robust to other jobs with
``--threads 1``) and their ratio. The outputs are checked equal before timing. As
``integer_speed.py``, it re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised (the pure kernel's large temporaries otherwise page-fault).
"""

from __future__ import annotations

import argparse
import os

import torch
from cpu_timing import add_clock_option, clock, median_ms, with_malloc_thresholds

from fqvit_pl.quant import get_bit_type
from fqvit_pl.quant.integer import kernels, native_ln
from fqvit_pl.quant.integer.native import native_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 197, 192])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=50)
    add_clock_option(parser)
    args = parser.parse_args()
    with_malloc_thresholds()
    timer = clock(args.clock)
    torch.set_num_threads(args.threads)
    if native_ops() is None:
        raise SystemExit("the fused kernels are not available (FQVIT_NATIVE=0 or a failed build)")
    g = torch.Generator().manual_seed(0)
    shape, channels = tuple(args.shape), args.shape[-1]
    u8 = get_bit_type("uint8")
    codes = torch.randint(0, 256, shape, generator=g).to(torch.float32)  # as _residual gives them
    branch = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    in_scale = 0.01 * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()
    zp = torch.full((channels,), 128.0)
    weight = torch.randn(channels, generator=g) * 0.2 + 1
    bias = torch.randn(channels, generator=g) * 0.1
    s_out, zp_out = torch.tensor(0.03), torch.tensor(120.0)
    b_scale, b_zp = torch.tensor(0.05), torch.tensor(110.0)
    ln_args = (codes, zp, in_scale, weight, bias, s_out, zp_out, u8)
    res_args = (codes, in_scale, zp, branch, b_scale, b_zp, in_scale * 1.1, zp)

    def ln_pure():
        return kernels.int_layernorm_codes(*ln_args, sum_dtype=torch.float32)

    def ln_fused():
        return native_ln.int_layernorm_codes_native(*ln_args)

    def res_pure():
        x = kernels.dequantize(codes, in_scale, zp).add_(kernels.dequantize(branch, b_scale, b_zp))
        return kernels.quantize_float(x, in_scale * 1.1, zp, u8)

    def res_fused():
        return native_ln.residual_codes_native(*res_args, u8)

    with torch.no_grad():
        for name, pure, fused in (
            ("layernorm", ln_pure, ln_fused),
            ("residual", res_pure, res_fused),
        ):
            assert torch.equal(pure(), fused()), name
            pure_ms, fused_ms = [], []
            for _ in range(3):  # interleaved rounds
                pure_ms.append(median_ms(pure, args.reps, timer))
                fused_ms.append(median_ms(fused, args.reps, timer))
            p, f = min(pure_ms), min(fused_ms)
            print(
                f"{name:10s} shape={list(shape)} threads={args.threads} {args.clock} clock "
                f"load {os.getloadavg()[0]:.1f}: pure {p:.3f} ms, "
                f"fused {f:.3f} ms, speedup {p / f:.1f}x"
            )


if __name__ == "__main__":
    main()
