"""Inputs and a bitwise comparison shared by the kernel tests (not a test module)."""

import torch

from fqvit_pl.quant import functional as Fq
from fqvit_pl.quant import get_bit_type
from fqvit_pl.quant.kernels import buffers

UINT8 = get_bit_type("uint8")

#: Reduced networks for whole-model tests.
TINY = {
    "deit_tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    "swin_tiny": dict(
        img_size=56, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=7
    ),
}

MODES = ["no_grad", "inference_mode"]


def assert_bits_equal(got, expected):
    """Same shape and dtype, NaN at the same places, identical bits everywhere else."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64}[got.dtype]
    assert torch.equal(
        got[~nan].contiguous().view(int_type), expected[~nan].contiguous().view(int_type)
    )


def run(mode, fn):
    """``fn()`` without autograd, after which every pooled buffer is overwritten with NaN bits:
    a result sharing pooled memory would change."""
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        result = fn()
        for buffer in getattr(buffers._THREAD_STATE, "pool", {}).values():
            buffer.view(torch.uint8).fill_(0xFF)
        return result


def gen(seed):
    return torch.Generator().manual_seed(seed)


def scores(shape, scale, seed):
    """Fake-quantized attention scores on the grid of ``scale`` (as the score point outputs them)."""
    g = gen(seed)
    raw = torch.randn(shape, generator=g) * 4
    s, zp = torch.tensor(scale), torch.tensor(128.0)
    return Fq.fake_quantize(raw, s, zp, UINT8), s


def ln_inputs(shape, channels_in, seed, per_tensor=False):
    """A LayerNorm input on the grid of its Power-of-Two scales, and the norm's weight and bias."""
    g = gen(seed)
    if per_tensor:
        s_in = torch.tensor(0.03)
    else:
        s_in = 0.004 * 2.0 ** torch.randint(0, 4, (channels_in,), generator=g).float()
    x = torch.randn(shape, generator=g) * 2
    scale = s_in if per_tensor else s_in.repeat(shape[-1] // channels_in)
    x = Fq.fake_quantize(x, scale, torch.tensor(80.0), UINT8)
    gamma = torch.randn(shape[-1], generator=g)
    gamma[:3] = torch.tensor([0.0, -1.0, 1e-30])  # a zero, a negative and an underflowing weight
    beta = torch.randn(shape[-1], generator=g) * 0.1
    return x, s_in, gamma, beta
