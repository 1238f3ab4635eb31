"""Grouping quantized modules into layers (the unit of the sensitivity ranking)."""

from fqvit_pl.analysis import layer_groups, layer_units

VIT = [
    "input_quant",
    "patch_embed.proj.weight_quant",
    "patch_embed.proj_quant",
    "cls_quant",
    "blocks.0.norm1",
    "blocks.0.attn.qkv.weight_quant",
    "blocks.1.norm1",
    "blocks.1.res2_quant",
    "norm",
    "head.weight_quant",
    "logits_quant",
]


def test_vit_layers_are_embed_blocks_and_head():
    groups = layer_groups(VIT)
    assert list(groups) == ["embed", "blocks.0", "blocks.1", "head"]
    assert groups["embed"] == VIT[:4]
    assert groups["head"] == ["norm", "head.weight_quant", "logits_quant"]
    units = layer_units(groups)
    assert units["embed"] == ["input_quant", "patch_embed", "cls_quant"]
    assert units["blocks.1"] == ["blocks.1"]
    assert units["head"] == ["norm", "head", "logits_quant"]


def test_swin_patch_merging_is_its_own_layer():
    names = [
        "patch_embed.norm",
        "layers.0.blocks.0.norm1",
        "layers.0.blocks.1.norm1",
        "layers.1.downsample.norm",
        "layers.1.downsample.reduction_quant",
        "layers.1.blocks.0.norm1",
        "norm",
        "head.fc.weight_quant",
    ]
    groups = layer_groups(names)
    assert list(groups) == [
        "embed",
        "layers.0.blocks.0",
        "layers.0.blocks.1",
        "layers.1.downsample",
        "layers.1.blocks.0",
        "head",
    ]
    assert layer_units(groups)["layers.1.downsample"] == ["layers.1.downsample"]


def test_a_wrapped_network_keeps_its_prefix_and_flat_networks_group_by_top_level_name():
    groups = layer_groups(["net.input_quant", "net.blocks.0.norm1", "net.norm"])
    assert list(groups) == ["embed", "net.blocks.0", "head"]
    assert layer_units(groups) == {
        "embed": ["net.input_quant"],
        "net.blocks.0": ["net.blocks.0"],
        "head": ["net.norm"],
    }
    flat = layer_groups(["fc.weight_quant", "ln_in", "norm", "fc2.weight_quant"])
    assert list(flat) == ["fc", "ln_in", "norm", "fc2"]
