"""Bit types (§1) and the expansion of (method, ptf, lis) to the per-role table (§2)."""

import pytest

from fqvit_pl.quant import BitType, QuantConfig, get_bit_type


@pytest.mark.parametrize(
    "name, bits, signed, lower, upper",
    [
        ("uint4", 4, False, 0, 15),
        ("int8", 8, True, -128, 127),
        ("uint8", 8, False, 0, 255),
        ("uint6", 6, False, 0, 63),
    ],
)
def test_bit_type_bounds(name, bits, signed, lower, upper):
    bit_type = get_bit_type(name)
    assert (bit_type.bits, bit_type.signed, bit_type.lower, bit_type.upper) == (
        bits,
        signed,
        lower,
        upper,
    )
    assert bit_type.name == name


@pytest.mark.parametrize("bad", ["float8", "int0", "uint17", "", "int"])
def test_unknown_bit_type_is_rejected(bad):
    with pytest.raises(ValueError, match="unknown bit type"):
        get_bit_type(bad)


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
def test_table_of_section_2(method):
    both = QuantConfig(method, ptf=True, lis=True)
    neither = QuantConfig(method, ptf=False, lis=False)
    weight = both.point("weight")
    assert (weight.bit_type.name, weight.observer, weight.granularity, weight.quantizer) == (
        "int8",
        "minmax",
        "channel",
        "uniform",
    )
    act = both.point("activation")
    assert (act.bit_type.name, act.observer, act.granularity, act.quantizer) == (
        "uint8",
        method,
        "tensor",
        "uniform",
    )
    ln = both.point("ln_input")
    assert (ln.bit_type.name, ln.observer, ln.granularity) == ("uint8", "ptf", "channel")
    ln_off = neither.point("ln_input")
    assert (ln_off.bit_type.name, ln_off.observer, ln_off.granularity) == (
        "uint8",
        method,
        "tensor",
    )
    sm = both.point("softmax")
    assert (sm.bit_type.name, sm.observer, sm.quantizer) == ("uint4", "minmax", "log2")
    sm_off = neither.point("softmax")
    assert (sm_off.bit_type.name, sm_off.observer, sm_off.quantizer) == ("uint8", method, "uniform")
    assert both.bits_label == "8/8/4" and neither.bits_label == "8/8/8"


def test_overrides_change_single_fields():
    cfg = QuantConfig(
        "minmax",
        ptf=True,
        lis=True,
        overrides={"activation": {"bit_type": "uint6"}, "softmax": {"bit_type": "uint8"}},
    )
    assert cfg.point("activation").bit_type == BitType(6, False)
    assert cfg.point("softmax").bit_type == BitType(8, False)
    assert cfg.point("softmax").quantizer == "log2"  # still Log-Int-Softmax, now 8-bit
    assert cfg.point("ln_input").bit_type.bits == 8
    assert cfg.bits_label == "8/6/8"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "kl"}, "unknown method 'kl'"),
        ({"overrides": {"attention": {"bit_type": "uint8"}}}, "unknown role 'attention'"),
        ({"overrides": {"activation": {"bits": 6}}}, "unknown field"),
        ({"overrides": {"activation": {"bit_type": "float16"}}}, "unknown bit type 'float16'"),
        ({"overrides": {"activation": {"observer": "ptf"}}}, "per channel"),
        ({"overrides": {"weight": {"granularity": "row"}}}, "unknown granularity"),
        (
            {"lis": False, "overrides": {"softmax": {"granularity": "channel"}}},
            "'softmax' is quantized per tensor",
        ),
        ({"ln_eps": -1e-6}, "ln_eps must be a finite number >= 0"),
        ({"ln_eps": float("nan")}, "ln_eps must be a finite number >= 0"),
    ],
)
def test_bad_config_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_describe_names_every_choice_and_role():
    cfg = QuantConfig("omse", ptf=False, lis=True, overrides={"activation": {"bit_type": "uint6"}})
    assert cfg.describe() == (
        "method=omse ptf=False lis=True weight=int8/minmax/channel/uniform "
        "activation=uint6/omse/tensor/uniform ln_input=uint8/omse/tensor/uniform "
        "softmax=uint4/minmax/tensor/log2"
    )
    assert "ln_eps=1e-06" in QuantConfig(ln_eps=1e-6).describe()
