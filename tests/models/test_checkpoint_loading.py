"""checkpoint_path / load_checkpoint: timm, original-release and our own checkpoints; every bad checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fqvit_pl.models import CheckpointError, create_model, load_checkpoint
from fqvit_pl.quant import CalibrationConfigError, QuantAct, calibrate, is_calibrated
from fqvit_pl.quant.modules import decode_label

DEIT = "deit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"


def _logits(model, size, seed=1):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(images)


def _assert_same_float_model(model, reference, size):
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert (_logits(model, size) - _logits(reference, size)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_timm_format_file(suffix, tmp_path, timm_model, vit_small):
    reference = timm_model(DEIT, **vit_small)
    path = tmp_path / f"deit{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    model = create_model("deit_tiny", model_kwargs=vit_small, checkpoint_path=path)
    _assert_same_float_model(model, reference, 32)


def test_timm_format_swin(tmp_path, timm_model, swin_small):
    reference = timm_model(SWIN, **swin_small)
    path = tmp_path / "swin.safetensors"
    save_file(reference.state_dict(), str(path))
    _assert_same_float_model(
        create_model("swin_tiny", model_kwargs=swin_small, checkpoint_path=str(path)), reference, 64
    )


def test_original_deit_release_format(tmp_path, timm_model, vit_small):
    """The DeiT release stores timm's keys under "model" (next to training state)."""
    reference = timm_model(DEIT, **vit_small)
    path = tmp_path / "deit_release.pth"
    torch.save({"model": reference.state_dict(), "epoch": 299}, path)
    _assert_same_float_model(
        create_model("deit_tiny", model_kwargs=vit_small, checkpoint_path=path), reference, 32
    )


def _to_original_swin(state, kwargs):
    """Undo timm's Swin conversion: patch merging at the END of stage i-1, ``head``, stored derived buffers."""
    original = {}
    for key, value in state.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        original[key] = value
    win = kwargs["window_size"]
    size = kwargs["img_size"] // kwargs["patch_size"]
    cells = torch.arange(win * win)
    rows, cols = cells // win, cells % win
    index = (rows[:, None] - rows[None, :] + win - 1) * (2 * win - 1) + (
        cols[:, None] - cols[None, :] + win - 1
    )
    for stage, depth in enumerate(kwargs["depths"]):
        resolution = size // 2**stage
        for block in range(depth):
            original[f"layers.{stage}.blocks.{block}.attn.relative_position_index"] = index
            if block % 2 and resolution > win:
                windows = (resolution // win) ** 2
                original[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.zeros(
                    windows, win * win, win * win
                )
    return original


def test_original_swin_release_format(tmp_path, timm_model, swin_small):
    reference = timm_model(SWIN, **swin_small)
    original = _to_original_swin(reference.state_dict(), swin_small)
    assert "layers.0.downsample.reduction.weight" in original and "head.weight" in original
    path = tmp_path / "swin_release.pth"
    torch.save({"model": original}, path)
    model = create_model("swin_tiny", model_kwargs=swin_small, checkpoint_path=path)
    _assert_same_float_model(model, reference, 64)


def test_calibrated_state_dict_restores_calibration(tmp_path, vit_small, randomized):
    model = randomized(create_model("deit_tiny", model_kwargs=vit_small))
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    expected = _logits(model, 32)
    path = tmp_path / "calibrated.pth"
    torch.save(model.state_dict(), path)
    restored = create_model("deit_tiny", model_kwargs=vit_small, checkpoint_path=path)
    assert is_calibrated(restored)
    assert torch.equal(_logits(restored, 32), expected)
    # the same file into a model of another configuration is refused, naming the calibration state
    with pytest.raises(CheckpointError, match="same method, ptf and lis"):
        create_model("deit_tiny", model_kwargs=vit_small, ptf=False, checkpoint_path=path)


def test_float_checkpoint_discards_calibration(vit_small, timm_model, randomized):
    model = randomized(create_model("deit_tiny", model_kwargs=vit_small))
    calibrate(model, [torch.randn(4, 3, 32, 32)])
    load_checkpoint(model, timm_model(DEIT, **vit_small).state_dict())
    assert not is_calibrated(model)


# ------------------------------------------------ a calibration made for another configuration


def _calibrated(name: str, kwargs: dict, randomized, **config) -> nn.Module:
    model = randomized(create_model(name, model_kwargs=kwargs, **config))
    size = model.img_size[0]
    calibrate(model, [torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))])
    return model


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name, built, stored_label, built_label",
    [
        ("deit_tiny", {"method": "omse"}, "uint8/minmax/tensor", "uint8/omse/tensor"),
        ("deit_tiny", {"activation": {"bit_type": "uint6"}}, "uint8/minmax", "uint6/minmax"),
        ("swin_tiny", {"method": "ema"}, "uint8/minmax/tensor", "uint8/ema/tensor"),
    ],
)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_calibration_of_another_configuration_is_refused(
    name, built, stored_label, built_label, suffix, tmp_path, vit_small, swin_small, randomized
):
    kwargs = vit_small if name == "deit_tiny" else swin_small
    path = tmp_path / f"minmax{suffix}"
    state = _calibrated(name, kwargs, randomized, method="minmax").state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)  # read back with weights_only=True
    model = create_model(name, model_kwargs=kwargs, **built)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationConfigError) as err:
        load_checkpoint(model, path)
    message = str(err.value)
    assert f"calibrated as {stored_label}" in message and f"built as {built_label}" in message
    assert model.qconfig.describe() in message  # the model's whole configuration
    assert _states_equal(model.state_dict(), before)  # nothing was loaded


def test_the_guard_refuses_before_anything_loads_inside_another_module(vit_small, randomized):
    state = _calibrated("deit_tiny", vit_small, randomized, method="minmax").state_dict()
    wrapper = nn.ModuleDict(
        {"net": create_model("deit_tiny", model_kwargs=vit_small, method="omse")}
    )
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    with pytest.raises(CalibrationConfigError, match=r"first 'input_quant'"):
        wrapper.load_state_dict({f"net.{k}": v for k, v in state.items()})
    assert _states_equal(wrapper.state_dict(), before)


def test_uncalibrated_state_of_another_configuration_loads(vit_small, randomized):
    """Our own checkpoint saved before calibration holds weights only, as far as quantization goes."""
    source = randomized(create_model("deit_tiny", model_kwargs=vit_small, method="minmax"))
    model = create_model("deit_tiny", model_kwargs=vit_small, method="omse")
    load_checkpoint(model, source.state_dict())
    assert torch.equal(model.head.weight, source.head.weight) and not is_calibrated(model)
    point = model.blocks[0].attn.qkv_quant
    assert isinstance(point, QuantAct) and decode_label(point.point_config) == point.config.label
    calibrate(model, [torch.randn(2, 3, 32, 32)])
    assert decode_label(model.state_dict()["blocks.0.attn.qkv_quant.point_config"]).startswith(
        "uint8/omse/"
    )


# --------------------------------------------------------------------------- bad checkpoints


def _error(path_or_state, name="deit_tiny", kwargs=None):
    model = create_model(
        name, model_kwargs=kwargs or {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 1}
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path_or_state)
    return str(err.value)


def test_mismatched_keys_list_first_missing_and_unexpected(tmp_path, timm_model, vit_small):
    state = timm_model(DEIT, **vit_small).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.mlp.fc3.bias"] = torch.zeros(64)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    message = _error(path, kwargs=vit_small)
    assert str(path) in message
    assert "1 missing key(s), first ['blocks.1.mlp.fc2.bias']" in message
    assert "1 unexpected key(s), first ['blocks.1.mlp.fc3.bias']" in message
    assert "nothing was loaded" in message


def test_checkpoint_of_a_wider_network_is_shape_mismatch(tmp_path, timm_model, vit_small):
    wider = timm_model(DEIT, **{**vit_small, "embed_dim": 96, "num_heads": 3})
    path = tmp_path / "wider.pth"
    torch.save(wider.state_dict(), path)
    message = _error(path, kwargs=vit_small)
    assert "shape mismatch" in message and "another architecture" in message
    assert "(1, 17, 96)" in message or "(96," in message


def test_swin_checkpoint_into_deit_and_back(timm_model, vit_small, swin_small):
    message = _error(timm_model(SWIN, **swin_small).state_dict(), "deit_tiny", vit_small)
    assert "missing key(s), first ['cls_token'" in message and "layers.0.blocks.0" in message
    message = _error(timm_model(DEIT, **vit_small).state_dict(), "swin_tiny", swin_small)
    assert "patch_embed.proj.weight" in message  # not silently resampled from 8x8 to 4x4 patches


def test_other_window_size_is_not_silently_resampled(timm_model, swin_small):
    other = timm_model(SWIN, **{**swin_small, "img_size": 64, "window_size": 8}).state_dict()
    message = _error(other, "swin_tiny", swin_small)
    assert "relative_position_bias_table: checkpoint (225, 2) vs model (49, 2)" in message


def test_other_resolution_is_not_silently_resampled(timm_model, vit_small):
    other = timm_model(DEIT, **{**vit_small, "img_size": 48}).state_dict()
    assert "pos_embed: checkpoint (1, 37, 64) vs model (1, 17, 64)" in _error(
        other, kwargs=vit_small
    )


@pytest.mark.parametrize(
    "content,what",
    [
        ([1, 2, 3], "a list"),
        (torch.zeros(3), "a Tensor"),
        ({}, "an empty mapping"),
        ({"model": {"a": 1}}, "'a' → int"),
    ],
)
def test_not_a_state_dict(content, what, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    message = _error(path)
    assert "is not a state dict" in message and what in message and str(path) in message


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    assert "cannot read checkpoint" in _error(garbage)
    bad_safetensors = tmp_path / "garbage.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 16)
    assert "cannot read checkpoint" in _error(bad_safetensors)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_model("deit_tiny", checkpoint_path=tmp_path / "nowhere.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save(
        {"weights": torch.nn.Linear(2, 2)}, path
    )  # needs weights_only=False to load: refused, and not suggested
    message = _error(path)
    assert "never loads" in message and "weights_only=False" not in message


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    message = _error(path)
    assert str(path) in message and "empty" in message
