"""ExportArtifacts and ``--model.quantized_path`` through the CLI: the demo writes its int8 and ONNX
files after calibration; an artifact is evaluated with no train split, no download, no calibration."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from cli_args import QUIET, REPO, TINY_DEMO
from PIL import Image

from fqvit_pl.callbacks import ExportArtifacts, QuantCalibration, ResultsWriter
from fqvit_pl.cli import cli_main
from fqvit_pl.export import load_quantized, save_quantized
from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py"])


def _callback(cli, kind):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))


def _forbid(monkeypatch, target: str, what: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was used")

    monkeypatch.setattr(target, fail)


def test_demo_fit_exports_then_validate_evaluates_the_artifact(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    demo = ["--config", str(REPO / "configs/demo.yaml"), *QUIET, *TINY_DEMO]
    fit = cli_main(
        [
            "fit", *demo, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.limit_train_batches", "3", "--export.path", "out/model.safetensors",
            "--export.onnx", "out/model.onnx",
        ]
    )  # fmt: skip
    assert _callback(fit, ExportArtifacts).written == ["out/model.safetensors", "out/model.onnx"]
    artifact = tmp_path / "out/model.safetensors"
    assert artifact.is_file() and (tmp_path / "out/model.onnx").is_file()

    # Evaluating the artifact needs neither the train split nor calibration nor weights.
    from datamodules import DigitsDataModule

    _forbid(monkeypatch, "datamodules.DigitsDataModule.train_dataloader", "the train split")
    _forbid(monkeypatch, "datamodules.DigitsDataModule.calibration_dataloader", "calibration data")
    _forbid(monkeypatch, "timm.create_model", "timm")
    validate = cli_main(["validate", *demo, "--model.quantized_path", str(artifact)])
    assert _callback(validate, QuantCalibration).calibration_count == 0
    row = _callback(validate, ResultsWriter).last_row
    assert row.model == "deit_tiny" and row.bits == "8/8/4" and row.fp_top1 is None

    # The reported top-1 is the loaded integer model's on the validation images.
    data = DigitsDataModule(img_size=16, limit=200, batch_size=32, num_workers=0, seed=0)
    data.setup("validate")
    model = load_quantized(artifact)
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    assert row.top1 == pytest.approx(100 * correct / total, abs=1e-4)


def test_fit_from_an_artifact_is_a_named_error(tmp_path, monkeypatch):
    model = create_model("deit_tiny", num_classes=10, model_kwargs={"img_size": 16, "patch_size": 8,
                         "embed_dim": 32, "depth": 1, "num_heads": 2})  # fmt: skip
    calibrate(model, [torch.randn(4, 3, 16, 16)])
    path = tmp_path / "m.safetensors"
    save_quantized(model, path)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), *QUIET, *TINY_DEMO]
    with pytest.raises(ValueError, match="quantized_path.*no float weights to fine-tune"):
        cli_main([*args, "--model.quantized_path", str(path), "--trainer.max_epochs", "1"])


def test_validate_an_artifact_on_an_imagefolder_tree_without_train_split(tmp_path, monkeypatch):
    """A table config (pretrained: true) with only ``root/val``: no download, no train split."""
    root = tmp_path / "imagenet"
    for label, name in enumerate(("ant", "bee", "cow")):
        os.makedirs(root / "val" / name)
        for k in range(2):
            Image.new("RGB", (40, 36), (40 + 80 * label, 20 * k, 255 - 60 * label)).save(
                root / "val" / name / f"{k}.png"
            )
    arch = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    model = create_model("deit_tiny", num_classes=3, model_kwargs=arch)
    calibrate(model, [torch.randn(4, 3, 32, 32)])
    path = tmp_path / "deit.safetensors"
    save_quantized(model, path)
    _forbid(monkeypatch, "timm.create_model", "timm")
    cli = cli_main(
        [
            "validate", "--config", str(REPO / "configs/deit_tiny.yaml"), *QUIET,
            "--model.quantized_path", str(path), "--data.root", str(root), "--data.img_size", "32",
            "--data.batch_size", "3", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--results.csv_path", str(tmp_path / "results.csv"),
            "--trainer.default_root_dir", str(tmp_path / "runs"),
        ]
    )  # fmt: skip
    row = _callback(cli, ResultsWriter).last_row
    assert row.model == "deit_tiny" and row.num_images == 6 and row.calib_seconds is None
