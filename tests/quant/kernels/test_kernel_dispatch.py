"""The switch of fqvit_pl.quant.kernels: with it on (the default) the quantized models run the fast
kernels, with it off the plain formulas, and their outputs are the same bits."""

import pytest
import torch
from kernel_inputs import MODES, TINY, assert_bits_equal, ln_inputs, run, scores

from fqvit_pl.models import create_model
from fqvit_pl.quant import (
    calibrate,
    fast_kernels,
    fast_kernels_enabled,
    get_bit_type,
    kernels,
    set_fast_kernels,
)
from fqvit_pl.quant.kernels import inplace, omse_pruning

UINT4 = get_bit_type("uint4")


def test_switch_and_context_manager():
    assert fast_kernels_enabled()
    with fast_kernels(False):
        assert not fast_kernels_enabled()
        with fast_kernels(True):
            assert fast_kernels_enabled()
        assert not fast_kernels_enabled()
    assert fast_kernels_enabled()
    set_fast_kernels(False)
    try:
        assert not kernels.fast_kernels_enabled()
    finally:
        set_fast_kernels(True)
    with pytest.raises(RuntimeError), fast_kernels(False):
        raise RuntimeError("the previous setting comes back after an error")
    assert fast_kernels_enabled()


@pytest.fixture
def fast_paths_forbidden(monkeypatch):
    """Make every fast path raise: what runs afterwards is the plain formulas only."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a fast path ran with the fast kernels off")

    for name in (
        "fake_quantize",
        "ptf_channel_errors",
        "extreme_values",
        "log_int_softmax",
        "int_layernorm",
    ):
        monkeypatch.setattr(inplace, name, forbidden)
    monkeypatch.setattr(omse_pruning, "omse_search", forbidden)


@pytest.mark.parametrize("mode", MODES)
def test_switched_off_the_dispatcher_runs_the_plain_formulas(mode, fast_paths_forbidden):
    x, s = scores((2, 3, 9, 9), 0.05, seed=1)
    ln_x, s_in, gamma, beta = ln_inputs((2, 5, 32), 32, seed=2)
    with fast_kernels(False):
        run(mode, lambda: kernels.log_int_softmax(x, s, UINT4))
        run(mode, lambda: kernels.int_layernorm(ln_x, s_in, torch.tensor(0.1), gamma, beta))
        run(mode, lambda: kernels.fake_quantize(x, s, torch.tensor(3.0), UINT4))
    with pytest.raises(AssertionError, match="fast path"):
        run(mode, lambda: kernels.log_int_softmax(x, s, UINT4))


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize(
    "method, ptf, lis", [("minmax", True, True), ("omse", True, True), ("percentile", False, False)]
)
def test_models_compute_the_same_bits_with_the_fast_kernels_off(name, method, ptf, lis):
    size = TINY[name]["img_size"]
    batches = [
        torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    x = torch.randn(2, 3, size, size)
    outputs = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = create_model(
            name, method=method, ptf=ptf, lis=lis, num_classes=10, model_kwargs=TINY[name]
        )
        with fast_kernels(fast), torch.no_grad():
            calibrate(model, batches)
            outputs.append((model(x), model.state_dict()))
    (fast_out, fast_state), (plain_out, plain_state) = outputs
    assert_bits_equal(fast_out, plain_out)
    for key, value in plain_state.items():
        if value.is_floating_point():
            assert_bits_equal(fast_state[key], value)
        else:
            assert torch.equal(fast_state[key], value), key


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize(
    "method, ptf, lis", [("minmax", True, True), ("omse", True, True), ("percentile", False, False)]
)
def test_calibrated_model_outputs_equal_with_and_without_grad(name, method, ptf, lis):
    torch.manual_seed(0)
    model = create_model(
        name, method=method, ptf=ptf, lis=lis, num_classes=10, model_kwargs=TINY[name]
    )
    size = TINY[name]["img_size"]
    calibrate(model, [torch.randn(2, 3, size, size) for _ in range(2)])
    x = torch.randn(2, 3, size, size)
    with_grad = model(x)  # weights require grad: every formula takes its plain path
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = model(x)
        again = model(x)  # cached weights
    with torch.inference_mode():
        inference = model(x)
    for out in (no_grad, again, inference):
        assert_bits_equal(out, with_grad.detach())


@pytest.mark.parametrize("name", list(TINY))
def test_quantized_forward_traces_as_one_graph(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, model_kwargs=TINY[name])
    size = TINY[name]["img_size"]
    calibrate(model, [torch.randn(2, 3, size, size)])
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, size, size))
    assert explanation.graph_break_count == 0, explanation.break_reasons
