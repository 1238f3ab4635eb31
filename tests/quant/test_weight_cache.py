"""A weight point caches its fake-quantized weight while no gradient is needed, and refreshes it
whenever the weight or its quantization parameters change."""

import copy

import pytest
import torch

from fqvit_pl.quant import (
    QuantConfig,
    QuantLinear,
    calibrate,
    disable_quantization,
    enable_quantization,
    get_bit_type,
)
from fqvit_pl.quant import functional as Fq

INT8 = get_bit_type("int8")


def assert_bits_equal(got, expected):
    assert got.shape == expected.shape and torch.equal(
        got.contiguous().view(torch.int32), expected.contiguous().view(torch.int32)
    )


def calibrated_linear():
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, config=QuantConfig().point("weight"))
    return calibrate(layer, [torch.randn(4, 16)])


def quantized_weight(layer):
    return Fq.fake_quantize(
        layer.weight.detach(),
        layer.weight_quant.scale.reshape(-1, 1),
        layer.weight_quant.quantizer.zero_point.reshape(-1, 1),
        INT8,
    )


def test_weight_cache_is_reused_and_equal():
    layer = calibrated_linear()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer.weight_quant(layer.weight)
        assert layer.weight_quant(layer.weight) is first  # reused
        assert_bits_equal(first, quantized_weight(layer))
        out = layer(x)
    with torch.inference_mode():
        assert layer.weight_quant(layer.weight) is first
    expected = torch.nn.functional.linear(x, quantized_weight(layer), layer.bias)
    assert torch.equal(out, expected.detach())


@pytest.mark.parametrize("change", ["in_place", "data", "load_state_dict", "qparams", "optimizer"])
def test_weight_cache_refreshes_when_the_weight_or_its_scale_changes(change):
    layer = calibrated_linear()
    with torch.no_grad():
        stale = layer.weight_quant(layer.weight).clone()
    if change == "in_place":
        with torch.no_grad():
            layer.weight.mul_(3.0)
    elif change == "data":
        layer.weight.data = torch.randn_like(layer.weight)
    elif change == "load_state_dict":
        state = layer.state_dict()
        state["weight"] = torch.randn_like(layer.weight)
        layer.load_state_dict(state)
    elif change == "qparams":
        with torch.no_grad():
            layer.weight_quant.quantizer.scale.mul_(2.0)
    elif change == "optimizer":
        opt = torch.optim.SGD(layer.parameters(), lr=10.0)
        layer(torch.randn(4, 16)).pow(2).sum().backward()  # grad mode: the cache is not used
        layer.bias.grad = None
        layer.weight.grad = torch.ones_like(layer.weight)
        opt.step()
    with torch.no_grad():
        fresh = layer.weight_quant(layer.weight)
    assert_bits_equal(fresh, quantized_weight(layer))
    assert not torch.equal(fresh, stale)


def test_weight_cache_unused_when_quantization_is_off_or_grad_is_needed():
    layer = calibrated_linear()
    disable_quantization(layer)
    with torch.no_grad():
        assert layer.weight_quant(layer.weight) is layer.weight  # float: the weight itself
    assert layer.weight_quant._weight_cache is None
    enable_quantization(layer)
    out = layer.weight_quant(layer.weight)  # grad mode on: a fresh tensor in the autograd graph
    assert out.requires_grad and layer.weight_quant._weight_cache is None
    assert_bits_equal(out.detach(), quantized_weight(layer))


def test_weight_cache_is_not_state():
    layer = calibrated_linear()
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert layer.weight_quant._weight_cache is not None
    assert not any("cache" in key for key in layer.state_dict())
    clone = copy.deepcopy(layer)
    assert clone.weight_quant._weight_cache is None
    with torch.no_grad():
        assert torch.equal(clone(torch.ones(1, 16)), layer(torch.ones(1, 16)))
    layer.weight_quant.clear_weight_cache()
    assert layer.weight_quant._weight_cache is None
