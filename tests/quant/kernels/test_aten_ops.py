"""A compiled model computes the eager model's bits: its float operations run ATen's kernels.

torch.compile generates its own GELU, softmax, LayerNorm, mean and convolution; the dispatcher
``fqvit_pl.quant.kernels`` keeps ATen's (fqvit_pl.quant.kernels.aten_ops), so compiled and eager quantized models agree bit for
bit (before them a compiled deit_tiny's logits differed from eager in about half their entries).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import TINY, assert_bits_equal

from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, disable_quantization, kernels


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 40, generator=g) * 3
    image, weight = torch.randn(2, 3, 16, 16, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    gamma, beta = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    return [
        ("gelu", kernels.gelu, (x,), F.gelu(x)),
        ("softmax", lambda t: kernels.softmax(t, dim=-1), (x,), x.softmax(dim=-1)),
        (
            "layer_norm",
            lambda t: kernels.layer_norm(t, (40,), gamma, beta, 1e-6),
            (x,),
            F.layer_norm(x, (40,), gamma, beta, 1e-6),
        ),
        ("mean", lambda t: kernels.mean(t, dim=1), (x,), x.mean(dim=1)),
        (
            "conv2d",
            lambda t: kernels.conv2d(t, weight, None, (4, 4), (1, 1), (1, 1), 1),
            (image,),
            F.conv2d(image, weight, None, 4, 1),
        ),
    ]


@pytest.mark.parametrize("name, fn, args, expected", cases(), ids=[c[0] for c in cases()])
def test_wrappers_are_the_aten_call_eager_and_compiled(name, fn, args, expected):
    assert_bits_equal(fn(*args), expected)
    assert_bits_equal(compiled(fn)(*args), expected)


def test_custom_ops_pass_opcheck():
    x, image, weight = torch.randn(2, 5, 6), torch.randn(1, 2, 8, 8), torch.randn(3, 2, 2, 2)
    checks = ("test_schema", "test_faketensor")
    for op, args in [
        (torch.ops.fqvit.gelu.default, (x,)),
        (torch.ops.fqvit.softmax.default, (x, -1)),
        (torch.ops.fqvit.layer_norm.default, (x, [6], None, None, 1e-5)),
        (torch.ops.fqvit.mean.default, (x, 1)),
        (
            torch.ops.fqvit.conv2d.default,
            (image, weight, torch.zeros(3), [2, 2], [0, 0], [1, 1], 1),
        ),
    ]:
        torch.library.opcheck(op, args, test_utils=checks)


def traced_float_ops(model, images):
    """The float operations of ``model``'s traced graph: ``fqvit`` custom ops, and any other GELU,
    softmax, LayerNorm, mean or convolution (which inductor would compile its own way)."""
    found = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            target = node.target
            if (
                node.op == "call_function"
                and str(target).startswith("fqvit.")
                and not str(target).startswith(
                    ("fqvit.layernorm_row_stats", "fqvit.inverse_probabilities")
                )
            ):
                found.append(str(target))
            elif node.op == "call_function" and target in (
                F.gelu,
                torch._C._nn.gelu,
                F.layer_norm,
                torch.layer_norm,
                F.softmax,
                torch.softmax,
                torch.mean,
                F.conv2d,
                torch.conv2d,
            ):
                found.append(f"other {target}")
            elif node.op == "call_method" and node.target in ("softmax", "mean"):
                found.append(f"other .{node.target}")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(images)
    return set(found)


@pytest.mark.parametrize(
    "name, ptf, lis, expected",
    [
        ("deit_tiny", True, True, {"fqvit.conv2d", "fqvit.gelu"}),
        (
            "deit_tiny",
            False,
            False,
            {"fqvit.conv2d", "fqvit.gelu", "fqvit.layer_norm", "fqvit.softmax"},
        ),
        ("swin_tiny", True, True, {"fqvit.conv2d", "fqvit.gelu", "fqvit.mean"}),
    ],
)
def test_models_run_every_float_operation_through_the_wrappers(name, ptf, lis, expected):
    torch.manual_seed(0)
    model = create_model(name, method="minmax", ptf=ptf, lis=lis, model_kwargs=TINY[name]).eval()
    size = TINY[name]["img_size"]
    images = torch.randn(2, 3, size, size)
    calibrate(model, [images])
    assert traced_float_ops(model, images) == expected
    disable_quantization(model)  # the float model
    assert traced_float_ops(model, images) == {
        "fqvit.conv2d",
        "fqvit.gelu",
        "fqvit.layer_norm",
        "fqvit.softmax",
    } | ({"fqvit.mean"} if name == "swin_tiny" else set())


def test_compiled_quantized_model_is_the_eager_model():
    torch.manual_seed(0)
    name = "swin_tiny"
    model = create_model(name, method="minmax", model_kwargs=TINY[name]).eval()
    size = TINY[name]["img_size"]
    calibrate(model, [torch.randn(8, 3, size, size)])
    images = torch.randn(8, 3, size, size)
    with torch.no_grad():
        eager = model(images)
        torch._dynamo.reset()
        assert_bits_equal(torch.compile(model)(images), eager)


def test_with_the_fast_kernels_off_inductor_compiles_the_float_operations():
    torch.manual_seed(0)
    model = create_model("deit_tiny", ptf=False, lis=False, model_kwargs=TINY["deit_tiny"]).eval()
    size = TINY["deit_tiny"]["img_size"]
    images = torch.randn(2, 3, size, size)
    calibrate(model, [images])
    with kernels.fast_kernels(False):
        found = traced_float_ops(model, images)
    assert not any(op.startswith("fqvit.") for op in found) and found


def test_a_directly_built_model_gets_the_float_modules_from_use_fast_float_ops():
    from fqvit_pl.models import QuantSwinTransformer, use_fast_float_ops
    from fqvit_pl.quant import QuantConfig

    model = QuantSwinTransformer(QuantConfig(), **TINY["swin_tiny"])
    assert type(model.layers[0].blocks[0].mlp.act) is torch.nn.GELU
    use_fast_float_ops(model)
    assert isinstance(model.layers[0].blocks[0].mlp.act, kernels.GELU)
    assert isinstance(model.head.global_pool, kernels.Mean)
    x = torch.randn(2, 5, 7)
    assert torch.equal(model.head.global_pool(x), x.mean(dim=1))
