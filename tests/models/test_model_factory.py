"""create_model: names, the eight architectures of §11, configuration, pretrained path, bad input."""

from __future__ import annotations

import pytest
import timm
import torch

from fqvit_pl.models import MODELS, create_model, get_model_spec, list_models, resolve_model_name
from fqvit_pl.quant import QuantAct, QuantConfig, QuantLayerNorm, get_bit_type, quant_modules

# §11 of the method document, typed in again rather than read from the registry.
TABLE_11 = {
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
    "vit_base": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_large": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "swin_tiny": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_small": "swin_small_patch4_window7_224.ms_in1k",
    "swin_base": "swin_base_patch4_window7_224.ms_in1k",
}


def test_registry_is_table_11():
    assert list_models() == list(TABLE_11)
    for short, pretrained in TABLE_11.items():
        assert MODELS[short].pretrained_name == pretrained
        assert (
            timm.models.get_pretrained_cfg(pretrained) is not None
        )  # timm knows the tag (no download)
    assert list_models(architectures=True) == [p.split(".")[0] for p in TABLE_11.values()]


@pytest.mark.parametrize("short", list(TABLE_11))
def test_every_architecture_has_timms_parameters(short):
    """All eight full-size networks, built on the meta device: same float keys and shapes as timm."""
    arch = TABLE_11[short].split(".")[0]
    reference = timm.create_model(arch, pretrained=False, device="meta").state_dict()
    with torch.device("meta"):
        model = create_model(short)
    ours = model.state_dict()
    assert {k: ours[k].shape for k in reference if k in ours} == {
        k: v.shape for k, v in reference.items()
    }
    extra = set(ours) - set(reference)  # only quantization buffers, never a float parameter
    assert not extra & {name for name, _ in model.named_parameters()}
    assert all(_quant_key(k) for k in extra)


def _quant_key(key: str) -> bool:
    return any(
        part.endswith("_quant") or part in ("quant_enabled", "softmax") for part in key.split(".")
    )


@pytest.mark.parametrize(
    "name,short,tag",
    [
        ("deit_tiny", "deit_tiny", "fb_in1k"),
        ("deit_tiny_patch16_224", "deit_tiny", "fb_in1k"),
        ("deit_tiny_patch16_224.fb_in1k", "deit_tiny", "fb_in1k"),
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_base", "augreg2_in21k_ft_in1k"),
        ("swin_base", "swin_base", "ms_in1k"),
    ],
)
def test_name_forms(name, short, tag):
    spec, resolved_tag = resolve_model_name(name)
    assert (spec.name, resolved_tag) == (short, tag)
    assert get_model_spec(name) is spec


@pytest.mark.parametrize("name", ["resnet50", "deit_tiny_patch16_384", "", "DEIT_TINY", "swin"])
def test_unknown_name_lists_the_available_ones(name):
    with pytest.raises(ValueError) as err:
        create_model(name)
    for short in TABLE_11:
        assert short in str(err.value)


def test_input_point_only_for_deit_and_swin(vit_small, swin_small):
    assert create_model("deit_tiny", model_kwargs=vit_small).input_quant is not None
    assert create_model("vit_base", model_kwargs=vit_small).input_quant is None
    assert create_model("swin_tiny", model_kwargs=swin_small).input_quant is not None


def test_quantization_choices_and_overrides_reach_every_point(vit_small):
    model = create_model(
        "deit_tiny",
        model_kwargs=vit_small,
        method="omse",
        ptf=False,
        lis=False,
        activation={"bit_type": "uint6"},
        softmax={"bit_type": "uint7"},
    )
    expected = QuantConfig(
        "omse",
        False,
        False,
        {"activation": {"bit_type": "uint6"}, "softmax": {"bit_type": "uint7"}},
    )
    assert model.qconfig == expected
    acts = [m for m in quant_modules(model) if isinstance(m, QuantAct)]
    assert {m.config for m in acts} == {
        expected.point(role) for role in ("weight", "activation", "ln_input", "softmax")
    }
    assert all(
        m.config.bit_type == get_bit_type("uint6") for m in acts if m.qname.endswith("fc2_quant")
    )
    assert not any(m.integer for m in quant_modules(model) if isinstance(m, QuantLayerNorm))


def test_unknown_keyword_and_model_kwargs_are_errors(vit_small):
    with pytest.raises(ValueError, match="pretrianed"):
        create_model("deit_tiny", pretrianed=True)
    with pytest.raises(ValueError, match="bit_type, observer"):
        create_model("deit_tiny", model_kwargs=vit_small, activation={"bits": 6})
    with pytest.raises(ValueError, match="window_size"):
        create_model("deit_tiny", model_kwargs={"window_size": 7})
    with pytest.raises(ValueError, match="not both"):
        create_model("deit_tiny", pretrained=True, checkpoint_path="x.pth")


def test_data_config_is_section_10(vit_small):
    deit = create_model("deit_tiny", model_kwargs=vit_small)
    assert deit.pretrained_cfg["crop_pct"] == 0.875  # not timm's current 0.9
    assert deit.pretrained_cfg["input_size"] == (3, 32, 32)
    assert deit.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert create_model("vit_base", model_kwargs=vit_small).pretrained_cfg["mean"] == (
        0.5,
        0.5,
        0.5,
    )


@pytest.mark.parametrize("short,kwargs", [("deit_small", "vit_small"), ("swin_tiny", "swin_small")])
def test_pretrained_copies_timms_weights(short, kwargs, request, monkeypatch, timm_model):
    """timm does the download; here timm.create_model returns a random model and the weights must be copied."""
    kwargs = request.getfixturevalue(kwargs)
    calls = []
    arch = TABLE_11[short].split(".")[0]
    reference = timm_model(arch, num_classes=10, **kwargs)

    def fake_create_model(name, pretrained=False, **model_args):
        calls.append((name, pretrained, model_args))
        return reference

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    model = create_model(short, pretrained=True, num_classes=10, model_kwargs=kwargs)
    assert calls == [(TABLE_11[short], True, {"num_classes": 10, **kwargs})]
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 32, 48), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_size_names_model_and_sizes(shape, vit_small):
    model = create_model("deit_tiny", model_kwargs=vit_small)
    with pytest.raises(
        ValueError,
        match=r"deit_tiny.*\[B, 3, 32, 32\].*"
        + str(list(shape)).replace("[", r"\[").replace("]", r"\]"),
    ):
        model(torch.zeros(shape))


def test_wrong_image_size_swin(swin_small):
    model = create_model("swin_tiny", model_kwargs=swin_small)
    with pytest.raises(ValueError, match=r"swin_tiny.*\[B, 3, 64, 64\]"):
        model(torch.zeros(1, 3, 224, 224))
