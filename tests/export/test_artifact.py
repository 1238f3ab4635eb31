"""``save_quantized`` / ``load_quantized``: one safetensors file, rebuilt bit for bit from the file
alone; truncated files, other format versions and inconsistent metadata are named errors."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import ARCHS, calibrated, images
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fqvit_pl.export import (
    FORMAT_VERSION,
    ArtifactCorruptError,
    ArtifactMismatchError,
    ArtifactVersionError,
    load_quantized,
    read_metadata,
    save_quantized,
)
from fqvit_pl.models import create_model
from fqvit_pl.quant import IntegerConversionError, to_integer


def _rewrite(path, out, *, metadata=None, tensors=None):
    """Copy an artifact with changed metadata entries and/or tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    meta.update(metadata or {})
    state.update(tensors or {})
    save_file(state, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("name", ["deit_tiny", "vit_base", "swin_tiny"])
@torch.no_grad()
def test_loaded_model_equals_the_saved_one_bit_for_bit(name, tmp_path, monkeypatch):
    model = calibrated(name)
    integer = to_integer(model)
    path = tmp_path / "model.safetensors"
    save_quantized(integer, path)
    # No float weights, timm or calibration are reachable while loading.
    monkeypatch.setattr("timm.create_model", lambda *a, **k: pytest.fail("timm used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("pickle used"))
    loaded = load_quantized(path)
    x = images(6, ARCHS[name]["img_size"], 5)
    assert torch.equal(loaded(x), integer(x))
    assert loaded.pretrained_cfg["input_size"] == (
        3,
        ARCHS[name]["img_size"],
        ARCHS[name]["img_size"],
    )
    assert loaded.pretrained_cfg["mean"] == model.pretrained_cfg["mean"]


def test_the_file_gets_the_permissions_of_any_new_file(tmp_path):
    """Shared like any file the user writes (the umask decides), not owner-only."""
    path = tmp_path / "model.safetensors"
    save_quantized(to_integer(calibrated("deit_tiny")), path)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode


@torch.no_grad()
def test_a_calibrated_simulated_model_is_converted_on_save(tmp_path):
    model = calibrated("deit_tiny", method="percentile", lis=False)
    path = tmp_path / "m.safetensors"
    meta = save_quantized(model, path)
    config = json.loads(meta["integer_config"])
    assert config["quant"] == {"method": "percentile", "ptf": True, "lis": False, "overrides": {}}
    assert config["arch"]["embed_dim"] == ARCHS["deit_tiny"]["embed_dim"]
    assert meta["num_classes"] == "10" and meta["format_version"] == str(FORMAT_VERSION)
    x = images(4, 32, 1)
    assert torch.equal(load_quantized(path)(x), to_integer(model)(x))
    weights = load_file(str(path))
    assert weights["blocks.0.mlp.fc1.weight"].dtype == torch.int8
    assert read_metadata(path)["architecture"] == "deit_tiny"


def test_an_uncalibrated_model_is_refused(tmp_path):
    model = create_model("deit_tiny", num_classes=10, model_kwargs=ARCHS["deit_tiny"])
    with pytest.raises(IntegerConversionError, match="not calibrated"):
        save_quantized(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("artifact") / "deit.safetensors"
    save_quantized(calibrated("deit_tiny"), path)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 0])
def test_a_truncated_file_is_a_named_error(artifact, tmp_path, keep):
    data = artifact.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:size])
    with pytest.raises(ArtifactCorruptError, match="truncated.safetensors"):
        load_quantized(bad)


def test_another_format_version_is_a_named_error(artifact, tmp_path):
    bad = _rewrite(artifact, tmp_path / "v2.safetensors", metadata={"format_version": "2"})
    with pytest.raises(ArtifactVersionError, match="version '2'"):
        load_quantized(bad)


def test_a_foreign_safetensors_file_is_a_named_error(tmp_path):
    path = tmp_path / "float.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ArtifactVersionError, match="not an fqvit_pl int8 artifact"):
        load_quantized(path)


def test_metadata_not_matching_the_tensors_is_a_named_error(artifact, tmp_path):
    config = json.loads(read_metadata(artifact)["integer_config"])
    config["arch"]["depth"] = 3  # one block more than the file holds
    bad = _rewrite(
        artifact, tmp_path / "a.safetensors", metadata={"integer_config": json.dumps(config)}
    )
    with pytest.raises(ArtifactMismatchError, match="missing tensors.*blocks.2"):
        load_quantized(bad)
    wide = torch.zeros(10, 65, dtype=torch.int8)  # the head's weight, one column too many
    bad = _rewrite(artifact, tmp_path / "b.safetensors", tensors={"head.weight": wide})
    with pytest.raises(ArtifactMismatchError, match=r"head.weight: file has torch.int8 \(10, 65\)"):
        load_quantized(bad)
    as_float = load_file(str(artifact))["head.weight"].float()
    bad = _rewrite(artifact, tmp_path / "c.safetensors", tensors={"head.weight": as_float})
    with pytest.raises(ArtifactMismatchError, match="torch.float32"):
        load_quantized(bad)
    bad = _rewrite(artifact, tmp_path / "d.safetensors", metadata={"num_classes": "1000"})
    with pytest.raises(ArtifactMismatchError, match="disagree"):
        load_quantized(bad)


@torch.no_grad()
def test_full_size_deit_tiny_file_is_at_most_0_3_of_its_float_safetensors(tmp_path):
    model = create_model("deit_tiny")  # random weights, 224 x 224, 1000 classes (no download)
    float_path = tmp_path / "float.safetensors"
    save_file(
        {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if v.is_floating_point() and "quant" not in k
        },
        str(float_path),
    )
    calibrate_images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    from fqvit_pl.quant import calibrate

    calibrate(model, [calibrate_images])
    path = tmp_path / "int8.safetensors"
    save_quantized(model, path)
    ratio = path.stat().st_size / float_path.stat().st_size
    assert float_path.stat().st_size > 5_000_000 * 4  # the float file holds 5.7M float32 parameters
    assert ratio <= 0.3, ratio
