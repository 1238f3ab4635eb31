"""checkpoint_path / load_checkpoint: timm, original-release and our own checkpoints; every bad checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from fqvit_pl.models import CheckpointError, create_model, load_checkpoint
from fqvit_pl.quant import calibrate, is_calibrated

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
