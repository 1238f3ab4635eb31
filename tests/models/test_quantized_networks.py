"""After fqvit_pl.quant.calibrate every §6 point quantizes with the chosen method, ptf and lis.

The networks are random (no downloads), with unit-gain weights (conftest.randomize) and a few
outlier channels injected into the embedding, the situation the Power-of-Two Factor is made for.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqvit_pl.models import create_model
from fqvit_pl.quant import (
    NonFiniteOutputError,
    QuantAct,
    QuantConfig,
    QuantLayerNorm,
    QuantSoftmax,
    calibrate,
    check_finite_output,
    quant_modules,
)

OUTLIERS = (3, 17)
#: Outlier channels span 8x the range of the others: the widest ratio PTF's factors 2**0..2**3 cover.
OUTLIER_GAIN = 8.0

# §6, one entry per quantization point, as (role, what) — counted here independently of the models.
VIT_STEM = [
    ("activation", "Q_input (DeiT only)"),
    ("activation", "patch tokens"),
    ("activation", "class token prepended"),
    ("activation", "pos_embed"),
    ("ln_input", "x + pos"),
]
VIT_BLOCK = [
    ("activation", "norm1"),
    ("activation", "qkv"),
    ("activation", "q@k^T*scale"),
    ("activation", "p@v"),
    ("activation", "proj"),
    ("ln_input", "x + attn"),
    ("activation", "norm2"),
    ("activation", "GELU"),
    ("activation", "fc2"),
    ("ln_input", "x + mlp"),
]
VIT_HEAD = [("activation", "class token after norm"), ("activation", "logits")]
SWIN_STEM = [
    ("activation", "Q_input"),
    ("activation", "patch tokens"),
    ("activation", "patch norm"),
]
SWIN_BLOCK = [
    ("activation", "norm1"),
    ("activation", "qkv"),
    ("activation", "q@k^T"),
    ("activation", "bias table"),
    ("activation", "a + bias"),
    ("activation", "p@v"),
    ("activation", "proj"),
    ("ln_input", "shortcut + h"),
    ("activation", "norm2"),
    ("activation", "GELU"),
    ("activation", "fc2"),
    ("ln_input", "x + mlp"),
]
SWIN_MERGE = [("activation", "merged norm"), ("ln_input", "reduction")]
SWIN_HEAD = [("activation", "norm"), ("activation", "pool"), ("activation", "logits")]


def _expected_points(family, kwargs, lis):
    softmax = [] if lis else [("softmax", "softmax output")]
    if family == "vit":
        points = VIT_STEM + (VIT_BLOCK + softmax) * kwargs["depth"] + VIT_HEAD
        weights = 1 + 4 * kwargs["depth"] + 1
    else:
        stages = len(kwargs["depths"])
        points = (
            SWIN_STEM
            + (SWIN_BLOCK + softmax) * sum(kwargs["depths"])
            + SWIN_MERGE * (stages - 1)
            + SWIN_HEAD
        )
        weights = 1 + 4 * sum(kwargs["depths"]) + (stages - 1) + 1
    return points + [("weight", "Linear/Conv2d weight")] * weights


def _outlier_model(name, kwargs, randomized, seed=0, **quant):
    model = randomized(create_model(name, model_kwargs=kwargs, **quant), seed)
    with torch.no_grad():
        if hasattr(model, "cls_token"):  # the residual stream starts at the patch embedding
            model.patch_embed.proj.weight[list(OUTLIERS)] *= OUTLIER_GAIN
            model.patch_embed.proj.bias[list(OUTLIERS)] *= OUTLIER_GAIN
        else:  # after Swin's patch norm: outliers live in the LayerNorm's affine parameters
            model.patch_embed.norm.weight[list(OUTLIERS)] *= OUTLIER_GAIN
            model.patch_embed.norm.bias[list(OUTLIERS)] *= OUTLIER_GAIN
    return model


def _images(count, size, seed):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calibrated(name, kwargs, randomized, **quant):
    model = _outlier_model(name, kwargs, randomized, **quant)
    size = kwargs["img_size"]
    test_images = _images(16, size, 100)
    with torch.no_grad():
        float_logits = model(test_images)
    calibrate(model, [_images(8, size, seed) for seed in range(3)])
    return model, test_images, float_logits


@pytest.fixture(scope="module")
def calibrated_cache():
    return {}


@pytest.fixture(params=["deit", "swin"])
def calibrated(request, calibrated_cache, vit_small, swin_small, randomized):
    """(family, kwargs, model, test images, float logits) of a calibrated outlier network, ptf and lis on."""
    family = request.param
    if family not in calibrated_cache:
        name, kwargs = ("deit_tiny", vit_small) if family == "deit" else ("swin_tiny", swin_small)
        calibrated_cache[family] = (family, kwargs, *_calibrated(name, kwargs, randomized))
    return calibrated_cache[family]


def _points(model):
    return [m for m in quant_modules(model) if isinstance(m, QuantAct)]


def test_every_section_6_point_is_calibrated_and_quantizing(calibrated):
    family, kwargs, model, images, _ = calibrated
    config = QuantConfig()  # create_model's defaults: minmax, ptf, lis
    expected = _expected_points("vit" if family == "deit" else "swin", kwargs, lis=True)
    points = _points(model)
    by_role = {
        role: [p for p in points if p.config == config.point(role)]
        for role in ("weight", "activation", "ln_input")
    }
    for role in by_role:
        assert len(by_role[role]) == sum(r == role for r, _ in expected), role
    assert len(points) == len(expected)
    assert all(p.is_calibrated and p.quant_enabled for p in points)
    assert all(m.quant_enabled for m in quant_modules(model))
    assert all(m.integer for m in quant_modules(model) if isinstance(m, QuantLayerNorm))

    # every activation and LN-input point outputs values on its integer grid
    outputs = {}
    hooks = [
        p.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o))
        for p in points
        if not p.observer.weight
    ]
    with torch.no_grad():
        model(images[:4])
    for hook in hooks:
        hook.remove()
    assert len(outputs) == len(by_role["activation"]) + len(by_role["ln_input"])
    for point, y in outputs.items():
        scale, zero_point = point.quantizer.scale, point.quantizer.zero_point
        if y.dim() == 4:  # NCHW / [B, heads, N, N]: the channel is dim 1
            scale, zero_point = scale.reshape(-1, 1, 1), zero_point.reshape(-1, 1, 1)
        q = y / scale + zero_point
        assert (q - q.round()).abs().max() < 1e-3, point.qname
        assert q.min() > -1e-3 and q.max() < 255 + 1e-3, point.qname


def test_ptf_factors_differ_between_channels(calibrated):
    family, kwargs, model, _, _ = calibrated
    lnq = [p for p in _points(model) if p.config.observer == "ptf"]
    first = model.embed_quant if family == "deit" else model.layers[0].blocks[0].res1_quant
    alpha = first.observer.alpha
    assert set(alpha.tolist()) <= {0, 1, 2, 3} and len(set(alpha.tolist())) > 1
    others = torch.ones_like(alpha, dtype=torch.bool)
    others[list(OUTLIERS)] = False
    # the outlier channels need the wide scales (s4, s8); the typical channel a narrower one
    assert (alpha[list(OUTLIERS)] >= 2).all()
    assert alpha[others].float().median() < alpha[list(OUTLIERS)].min()
    for point in lnq:  # channels share one zero point, and scales are s1 * 2**alpha with one s1
        s1 = point.quantizer.scale / 2.0 ** point.observer.alpha.float()
        assert s1.unique().numel() == 1, point.qname
        assert point.quantizer.zero_point.unique().numel() == 1, point.qname


def test_softmax_outputs_lie_on_the_4bit_log_grid(calibrated):
    _, _, model, images, _ = calibrated
    outputs = []
    softmaxes = [m for m in model.modules() if isinstance(m, QuantSoftmax)]
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in softmaxes]
    with torch.no_grad():
        model(images[:4])
    for hook in hooks:
        hook.remove()
    assert len(outputs) == len(softmaxes) > 0
    for p in outputs:
        nonzero = p[p != 0]
        exponent = -torch.log2(nonzero)
        assert torch.equal(exponent, exponent.round())
        assert exponent.min() >= 0 and exponent.max() <= 15
        assert (p != 0).any(dim=-1).all()  # every row keeps its largest probability


def _closeness(quantized, reference):
    """(fraction of rows whose nearest float row is their own, error energy / input-dependent energy)."""
    nearest = torch.cdist(quantized, reference).argmin(dim=1)
    own = (nearest == torch.arange(len(reference))).float().mean().item()
    spread = (reference - reference.mean(dim=0)).norm()
    return own, ((quantized - reference).norm() / spread).item()


def test_quantized_logits_stay_close_to_float(calibrated):
    """The quantization error is smaller than the differences between images.

    Principled bound: the quantized logits of an image must be nearer to that image's float logits
    than to any other image's, and the error energy must stay below the input-dependent (centred)
    energy of the float logits, i.e. a positive signal-to-quantization-noise ratio.
    """
    _, _, model, images, float_logits = calibrated
    with torch.no_grad():
        quantized = model(images)
    own, error_ratio = _closeness(quantized, float_logits)
    assert own == 1.0
    assert error_ratio < 1.0
    assert torch.nn.functional.cosine_similarity(quantized, float_logits, dim=1).min() > 0.9


def test_ptf_beats_per_tensor_layernorm_inputs_on_outliers(vit_small, randomized, calibrated_cache):
    """The reason for PTF: with outlier channels, per-tensor LN inputs lose the other channels."""
    errors = {}
    for ptf in (True, False):
        model, images, float_logits = _calibrated("deit_tiny", vit_small, randomized, ptf=ptf)
        with torch.no_grad():
            errors[ptf] = _closeness(model(images), float_logits)[1]
    assert errors[True] < errors[False]


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
def test_methods_reach_every_activation_point(method, vit_small, randomized):
    model, images, float_logits = _calibrated(
        "deit_tiny", vit_small, randomized, method=method, ptf=False, lis=False
    )
    # with ptf and lis off, activations, LN inputs and the softmax output share one configuration
    observers = {True: set(), False: set()}
    for point in _points(model):
        observers[point.observer.weight].add(type(point.observer).__name__)
    expected = {
        "minmax": "MinMaxObserver",
        "ema": "EmaObserver",
        "percentile": "PercentileObserver",
        "omse": "OmseObserver",
    }
    assert observers == {True: {"MinMaxObserver"}, False: {expected[method]}}
    assert len(_points(model)) == len(_expected_points("vit", vit_small, lis=False))
    assert not any(m.integer for m in quant_modules(model) if isinstance(m, QuantLayerNorm))
    assert all(
        p.scale.dim() == 0
        for p in _points(model)
        if p.config.granularity == "tensor" and not p.observer.weight
    )
    with torch.no_grad():
        quantized = model(images)
    assert _closeness(quantized, float_logits)[0] == 1.0


def test_lis_off_softmax_on_the_uint8_grid(vit_small, randomized):
    model, images, _ = _calibrated("deit_tiny", vit_small, randomized, lis=False)
    softmax = model.blocks[0].attn.softmax
    outputs = []
    softmax.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        model(images[:2])
    levels = outputs[0] / softmax.point.scale + softmax.point.quantizer.zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.max() <= 255 + 1e-3
    assert not math.isclose(softmax.point.scale.item(), 1.0)


def _constant_token_model(vit_small: dict, **kwargs) -> torch.nn.Module:
    """Every token is the zero vector: the patch projection, class token and position embedding are 0."""
    model = create_model("deit_tiny", model_kwargs=vit_small, num_classes=4, **kwargs)
    with torch.no_grad():
        for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
            model.get_parameter(name).zero_()
    return calibrate(model, [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))])


def test_a_constant_token_gives_nan_named_by_layer_unless_ln_eps(vit_small):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    published = _constant_token_model(vit_small)  # no epsilon in the integer LayerNorm (§7)
    with torch.no_grad():
        logits = published(images)
    assert torch.isnan(logits).all()
    with pytest.raises(
        NonFiniteOutputError, match=r"'blocks\.0\.norm1' \(QuantLayerNorm\).*ln_eps"
    ):
        check_finite_output(published, images, logits)

    model = _constant_token_model(vit_small, ln_eps=1e-6)
    norms = [m for m in model.modules() if isinstance(m, QuantLayerNorm)]
    assert norms and all(m.integer_eps == 1e-6 for m in norms)
    with torch.no_grad():
        logits = model(images)
    assert torch.isfinite(logits).all()
    check_finite_output(model, images, logits)  # no error
