"""Speed of the integer attention's Log-Int-Softmax alone: the fused kernel against the PyTorch path.

    python benchmarks/lis_kernel.py                  # 1 thread, deit_tiny and swin_tiny shapes
    python benchmarks/lis_kernel.py --threads 2 --reps 50

From the ``q @ k^T`` accumulator to the probabilities ``2**-r`` (what ``IntegerAttention`` does
between its two matmuls), on deit_tiny's attention at 224 (``[8, 3, 197, 197]``) and swin_tiny's
first stage (``[8 * 64, 3, 49, 49]`` with the relative position bias and the shift mask), random
integer accumulators scaled to scores of a trained model's range. Rows:

- ``pytorch eager``: ``kernels.quantize_float`` (Swin: dequantize, + bias, quantize again) then
  ``kernels.log_int_softmax_codes`` with its two table gathers, as the integer model ran before;
- ``pytorch compiled``: the same function under ``torch.compile`` (what ``compile_integer``'s
  graph ran: one fused loop, the probabilities from the keys);
- ``fused kernel``: ``torch.ops.fqvit_native.lis_softmax`` (csrc/lis.cpp), float32 out, and with
  ``dtype=torch.bfloat16`` (the same values, half the bytes written);
- ``float softmax``: ``torch.softmax`` of the float32 scores (what the float model pays) and a
  copy of the accumulator (the memory traffic floor of one read and one write).

Every row is checked equal to the eager one before it is timed. Median of ``--reps`` calls, in
this process's CPU time by default (robust to other jobs on a shared machine; with ``--threads``
above 1 it sums the threads: use ``--clock wall`` there).
"""

from __future__ import annotations

import argparse
import os

import torch
from cpu_timing import add_clock_option, clock, median_ms

from fqvit_pl.quant import get_bit_type
from fqvit_pl.quant.integer import kernels, native

UINT8 = get_bit_type("uint8")


def _case(name: str, g: torch.Generator):
    """Accumulator, quantization parameters and (Swin) bias and mask of one attention."""
    t = torch.tensor
    if name == "deit_tiny":
        acc = torch.randint(-40000, 40001, (8, 3, 197, 197), generator=g).float()
        return dict(acc=acc, step=t(1e-4), scale=t(0.04), zp=t(130.0), bias=None, mask=None)
    acc = torch.randint(-40000, 40001, (8 * 64, 3, 49, 49), generator=g).float()
    mask = torch.where(torch.rand(64, 49, 49, generator=g) < 0.3, -100.0, 0.0)
    mask[:, torch.arange(49), torch.arange(49)] = 0.0
    bias = torch.randn(3, 49, 49, generator=g)
    return dict(acc=acc, step=t(1e-4), scale=t(0.04), zp=t(130.0), bias=bias, mask=mask,
                bias_scale=t(0.05), bias_zp=t(120.0))  # fmt: skip


def _pytorch(c: dict, table: torch.Tensor, probs: torch.Tensor):
    def run() -> torch.Tensor:
        scores = kernels.quantize_float(c["acc"] * c["step"], c["scale"], c["zp"], UINT8)
        mask = None
        if c["bias"] is not None:
            value = kernels.dequantize(scores, c["scale"], c["zp"]).add_(c["bias"])
            scores = kernels.quantize_float(value, c["bias_scale"], c["bias_zp"], UINT8)
        if c["mask"] is not None:
            batch, heads, n, _ = scores.shape
            scores = scores.view(-1, c["mask"].shape[0], heads, n, n)
            mask = (c["mask"] != 0)[None, :, None]
        out = kernels.log_int_softmax_codes(scores, table, probs, mask, softmax_bits=4)
        return out.view(c["acc"].shape)

    return run


def _fused(c: dict, table: torch.Tensor, dtype: torch.dtype | None = None):
    ops = native.native_ops()

    def run() -> torch.Tensor:
        return ops.lis_softmax(
            c["acc"], c["step"], c["scale"], c["zp"], 0, 255, c["bias"],
            c.get("bias_scale"), c.get("bias_zp"), 0, 255, c["mask"], table, 4, True, dtype,
        )  # fmt: skip

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--cases", nargs="+", default=["deit_tiny", "swin_tiny"])
    parser.add_argument("--no-compile", action="store_true")
    add_clock_option(parser, default="cpu")
    args = parser.parse_args()
    timer = clock(args.clock)
    torch.set_num_threads(args.threads)
    if native.native_ops() is None:
        raise SystemExit("the fused kernels are not built (FQVIT_NATIVE=0 or no compiler)")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, load average "
        f"{os.getloadavg()[0]:.1f}, median of {args.reps} calls"
    )
    print("| shape | row | ms | vs pytorch eager |")
    print("|---|---|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name in args.cases:
        c = _case(name, g)
        point = ("bias_scale", "bias_zp") if c["bias"] is not None else ("scale", "zp")
        table = kernels.lis_exp_table_2d(c[point[0]], c[point[1]])
        probs = kernels.lis_prob_table(4)
        eager = _pytorch(c, table, probs)
        expected = eager()
        rows = [("pytorch eager", eager)]
        if not args.no_compile:
            with torch.no_grad():
                compiled = torch.compile(eager)
                rows.append(("pytorch compiled", compiled))
        rows += [
            ("fused kernel, float32 out", _fused(c, table)),
            ("fused kernel, bfloat16 out", _fused(c, table, torch.bfloat16)),
        ]
        for label, fn in rows:
            if not torch.equal(fn().float(), expected):
                raise SystemExit(f"{name}: {label} differs from the PyTorch path")
        scores = c["acc"] * c["step"]
        rows += [
            ("float softmax (float model)", lambda s=scores: torch.softmax(s, -1)),
            ("copy of the accumulator", lambda a=c["acc"]: a.clone()),
        ]
        base = None
        shape = "x".join(map(str, c["acc"].shape))
        for label, fn in rows:
            ms = median_ms(fn, args.reps, timer, warmup=2)
            base = base or ms
            print(f"| {name} {shape} | {label} | {ms:.2f} | {base / ms:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
