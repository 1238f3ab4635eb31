"""``compile_integer``: one ``torch.compile`` graph per forward (no graph break, no recompile) whose
logits equal the eager integer model's bit for bit, for a DeiT and a (shifted-window) Swin."""

from __future__ import annotations

import pytest
import torch
from test_integer_models import _images, _randomize
from torch import nn
from torch._dynamo.utils import counters

from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, compile_integer, get_bit_type, to_integer
from fqvit_pl.quant.integer import kernels

TINY = {
    "deit_tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    # 8x8 tokens, windows of 4x4: the second block shifts them (the -100 mask)
    "swin_tiny": dict(
        img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2,), num_heads=(2,)
    ),
}
DEFAULT = "onednn" if kernels.onednn_available() else "int_mm"
# each case compiles a model (~30-40 s on 2 busy cores): both backends on DeiT, the default on Swin
CASES = [("deit_tiny", "int_mm"), ("swin_tiny", DEFAULT)] + (
    [("deit_tiny", "onednn")] if DEFAULT == "onednn" else []
)


def _integer(name: str) -> nn.Module:
    kwargs = TINY[name]
    model = _randomize(
        create_model(name, method="minmax", num_classes=10, model_kwargs=kwargs), 0, False
    )
    calibrate(model, [_images(8, kwargs["img_size"], s) for s in range(2)])
    return to_integer(model)


@pytest.mark.parametrize("name,backend", CASES)
@torch.no_grad()
def test_compiled_integer_model_is_one_graph_equal_to_eager(name, backend):
    torch._dynamo.reset()
    counters.clear()
    integer = _integer(name)
    compiled = compile_integer(integer, backend)
    assert compiled.backend == backend
    size = TINY[name]["img_size"]
    for seed in (5, 6):  # a second batch of the same shape must reuse the graph
        images = _images(4, size, seed)
        expected = integer(images)  # eager, same backend (compile_integer set it)
        assert torch.equal(compiled(images), expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"], dict(counters["recompiles"])


@torch.no_grad()
def test_compiled_integer_layernorm_equals_eager():
    """ATen's CPU ``sqrt`` and ``log2`` are not always inductor's correctly rounded ones (the std of
    about 1 token in 20 differed here before the kernel kept ATen's): every code must agree."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    channels = 192
    codes = torch.randint(0, 256, (16, 197, channels), generator=g).to(torch.float32)
    in_scale = 0.01 * 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()  # PTF steps
    weight = torch.randn(channels, generator=g) * 0.2 + 1
    bias = torch.randn(channels, generator=g) * 0.1
    bit_type = get_bit_type("uint8")

    def layernorm(c: torch.Tensor) -> torch.Tensor:
        return kernels.int_layernorm_codes(
            c, torch.tensor(128.0), in_scale, weight, bias, torch.tensor(0.03),
            torch.tensor(120.0), bit_type, sum_dtype=torch.float32,
        )  # fmt: skip

    assert torch.equal(torch.compile(layernorm)(codes), layernorm(codes))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_probabilities_from_keys_equal_the_table(bits):
    keys = torch.arange(4096, dtype=torch.int64)
    assert torch.equal(kernels.lis_prob_from_keys(keys, bits), kernels.lis_prob_table(bits))


@torch.no_grad()
def test_compiled_log_int_softmax_equals_eager():
    """The compiled kernel computes the probabilities from the keys, eager looks them up."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    table = kernels.lis_exp_table_2d(torch.tensor(0.037), torch.tensor(131.0))
    probs = kernels.lis_prob_table(4)
    codes = torch.randint(0, 256, (2, 4, 3, 49, 49), generator=g).to(torch.float32)
    mask = (torch.rand(4, 49, 49, generator=g) < 0.3)[None, :, None]  # Swin's masked pairs

    def lis(c: torch.Tensor) -> torch.Tensor:
        return kernels.log_int_softmax_codes(c, table, probs, mask, softmax_bits=4)

    assert torch.equal(torch.compile(lis)(codes), lis(codes))


def test_compile_integer_refuses_a_float_model():
    with pytest.raises(TypeError, match="to_integer"):
        compile_integer(nn.Linear(2, 2))
