"""Speed of the integer model's two attention matmuls on the model's shapes, per candidate kernel.

Each candidate starts from what the integer model has: the qkv codes (``uint8 [B, N, 3 * dim]``)
and, for ``attn @ V``, Log-Int-Softmax probabilities (float32 ``[B, heads, N, N]``, 0 or
``2**-r``); each time includes the conversions and copies the candidate needs, and ends with
``q @ k^T`` as float32 ``[B, heads, N, N]`` or the context with heads merged ``[B, N, dim]``:

- ``fp32``: the reference path (``kernels.attention_scores/attention_context`` with
  ``native=False``): codes to float32 minus the zero point, permuted views, float32 ``bmm``.
- ``native``: ``csrc/attnmm.cpp`` (uint8 x int8 VNNI for ``q @ k^T``, bf16 pairs with float32
  sums for ``attn @ V``), exact, bit-equal to ``fp32``. ``native, bf16 probs given``: the same
  with the probabilities already bfloat16 (what a Log-Int-Softmax kernel emitting bf16 would give;
  the conversion is not timed).
- ``bf16 bmm``: ``torch.bmm`` on bfloat16 copies. NOT exact (bf16 output rounds the sums): shown
  for its speed only.
- ``int_mm loop``: ``torch._int_mm`` (int8 x int8 -> int32, the 2-D op only) per (batch, head), on
  ``codes - 128`` (the zero-point terms left out: timing only), output to float32.

Times are medians over ``--reps`` rounds in which the candidates run back to back (paired), in ms
per call; "x" is the fp32 time over the candidate's. A DeiT forward calls each matmul once per
block (12); Swin-T per block of its stage (2, 2, 6, 2). As ``integer_speed.py``, the script
re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised to
1 GiB (page faults of re-grown large outputs otherwise dominate some shapes).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from cpu_timing import add_clock_option, clock, with_malloc_thresholds

from fqvit_pl.quant.integer import kernels

# name: (batch * windows, tokens, heads, head_dim) at batch 8, 224x224
SHAPES = {
    "deit_tiny": (8, 197, 3, 64),
    "deit_small": (8, 197, 6, 64),
    "deit_base": (8, 197, 12, 64),
    "swin_tiny.1": (8 * 64, 49, 3, 32),
    "swin_tiny.2": (8 * 16, 49, 6, 32),
    "swin_tiny.3": (8 * 4, 49, 12, 32),
    "swin_tiny.4": (8, 49, 24, 32),
}
ZERO_POINT = 128


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-int-mm", action="store_true", help="skip the int_mm loop")
    add_clock_option(parser)
    return parser.parse_args()


def _inputs(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, heads, head_dim = shape
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randint(0, 256, (batch, tokens, 3 * heads * head_dim), generator=generator)
    r = torch.randint(9, 17, (batch, heads, tokens, tokens), generator=generator)
    probs = torch.where(r == 16, 0.0, torch.pow(2.0, -r.to(torch.float32)))
    return qkv.to(torch.uint8), probs


def _candidates(
    shape: tuple[int, int, int, int], qkv: torch.Tensor, probs: torch.Tensor, int_mm: bool
) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    batch, tokens, heads, head_dim = shape
    dim = heads * head_dim

    def split(dtype: torch.dtype) -> list[torch.Tensor]:
        x = qkv.to(dtype).sub_(ZERO_POINT)
        return list(x.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4))

    def bf16_scores() -> torch.Tensor:
        q, k, _ = split(torch.bfloat16)
        return (q @ k.transpose(-2, -1)).to(torch.float32)

    def bf16_context() -> torch.Tensor:
        v = split(torch.bfloat16)[2]
        return (probs.to(torch.bfloat16) @ v).to(torch.float32).transpose(1, 2).reshape(-1, dim)

    def int_mm_scores() -> torch.Tensor:
        shifted = (qkv.to(torch.int16) - 128).to(torch.int8)
        q, k, _ = shifted.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = q.contiguous(), k.transpose(-2, -1).contiguous()
        out = torch.empty(batch, heads, tokens, tokens)
        for b in range(batch):
            for h in range(heads):
                out[b, h] = torch._int_mm(q[b, h], k[b, h])
        return out

    native = kernels.native_attention_matmul(head_dim)
    scores = {
        "fp32": lambda: kernels.attention_scores(qkv, heads, ZERO_POINT),
        "bf16 bmm (inexact)": bf16_scores,
    }
    context = {
        "fp32": lambda: kernels.attention_context(probs, qkv, heads, ZERO_POINT),
        "bf16 bmm (inexact)": bf16_context,
    }
    if int_mm and tokens > 16:
        scores["int_mm loop"] = int_mm_scores
    if native:
        scores["native"] = lambda: kernels.attention_scores(qkv, heads, ZERO_POINT, native=True)
        context["native"] = lambda: kernels.attention_context(
            probs, qkv, heads, ZERO_POINT, native=True
        )
        as_bf16 = probs.to(torch.bfloat16)
        context["native, bf16 probs given"] = lambda: kernels.attention_context(
            as_bf16, qkv, heads, ZERO_POINT, native=True
        )
    return {"q@k^T": scores, "attn@V": context}


def _paired(
    candidates: dict[str, Callable[[], torch.Tensor]], reps: int, timer: Callable[[], float]
) -> dict[str, float]:
    for fn in candidates.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            start = timer()
            fn()
            times[name].append(timer() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    args = _args()
    with_malloc_thresholds()
    timer = clock(args.clock)
    print(
        f"torch {torch.__version__}, {args.clock} clock, load average {os.getloadavg()[0]:.1f}, "
        f"median of {args.reps} paired rounds, ms per call (x = fp32 / candidate)"
    )
    print("| shape [B, N, heads, hd] | threads | matmul | candidate | ms | x |")
    print("|---|---:|---|---|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.shapes:
            shape = SHAPES[name]
            qkv, probs = _inputs(shape)
            for matmul, candidates in _candidates(shape, qkv, probs, not args.no_int_mm).items():
                times = _paired(candidates, args.reps, timer)
                for candidate, ms in times.items():
                    print(
                        f"| {name} {list(shape)} | {threads} | {matmul} | {candidate} | "
                        f"{ms:.2f} | {times['fp32'] / ms:.2f} |"
                    )


if __name__ == "__main__":
    main()
