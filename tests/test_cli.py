"""main.py / fqvit_pl.cli end to end with tiny settings: demo fit → validate --ckpt_path, ImageNet-layout validate."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fqvit_pl.callbacks import QuantCalibration, ResultsWriter
from fqvit_pl.cli import cli_main
from fqvit_pl.models import list_models
from fqvit_pl.results import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_DEMO = [
    "--model.model_kwargs",
    '{"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
    "--data.img_size",
    "16",
    "--data.limit",
    "200",
    "--data.calib_batch_size",
    "16",
    "--data.num_calib_batches",
    "2",
]
TINY_IMAGENET = [
    "--model.pretrained",
    "false",
    "--model.num_classes",
    "3",
    "--model.model_kwargs",
    '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
    "--data.img_size",
    "32",
    "--data.batch_size",
    "4",
    "--data.num_workers",
    "0",
    "--data.calib_batch_size",
    "2",
    "--data.num_calib_batches",
    "3",
    "--trainer.accelerator",
    "cpu",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["main.py"]
    )  # LightningCLI(args=...) warns about pytest's own argv


def _callback(cli, kind):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_demo_fit_then_validate_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo config writes under runs/demo
    demo = ["--config", str(CONFIGS / "demo.yaml"), *QUIET, *TINY_DEMO]
    fit = cli_main(
        [
            "fit",
            *demo,
            "--trainer.max_epochs",
            "1",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.limit_train_batches",
            "3",
        ]
    )
    assert _callback(fit, QuantCalibration).calibration_count == 1
    fit_metrics = fit.trainer.callback_metrics
    assert {"val/top1", "val/top5", "val/loss", "val/fp_top1", "val/fp_agreement"} <= set(
        fit_metrics
    )
    checkpoint = tmp_path / "runs/demo/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    assert not (tmp_path / "runs/demo/results.csv").exists()  # fit does not report rows

    validate = cli_main(["validate", *demo, "--ckpt_path", str(checkpoint)])
    calibration = _callback(validate, QuantCalibration)
    assert calibration.calibration_count == 0  # the checkpoint carries its calibration
    row = _callback(validate, ResultsWriter).last_row
    assert row.top1 == pytest.approx(100 * float(fit_metrics["val/top1"]))
    assert row.fp_top1 == pytest.approx(100 * float(fit_metrics["val/fp_top1"]))
    [written] = _rows(tmp_path / "runs/demo/results.csv")
    assert (
        written["model"] == "deit_tiny"
        and written["bits"] == "8/8/4"
        and written["stage"] == "validate"
    )
    assert float(written["top1"]) == pytest.approx(row.top1, abs=1e-4)
    assert written["calib_seconds"] == ""  # not calibrated again


def _write_imagefolder(root, classes=("ant", "bee", "cow"), train=3, val=2):
    for split, per_class in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            os.makedirs(root / split / name)
            for k in range(per_class):
                colour = (40 + 80 * label, 20 * k, 255 - 60 * label)
                Image.new("RGB", (40, 36), colour).save(root / split / name / f"{k}.png")


def test_validate_on_an_imagefolder_tree_calibrates_and_appends_a_result_row(tmp_path, caplog):
    root = tmp_path / "imagenet"
    _write_imagefolder(root)
    results = tmp_path / "out" / "results.csv"
    args = [
        "validate",
        "--config",
        str(CONFIGS / "deit_tiny.yaml"),
        *QUIET,
        *TINY_IMAGENET,
        "--data.root",
        str(root),
        "--results.csv_path",
        str(results),
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
    ]
    cli = cli_main(args)
    calibration = _callback(cli, QuantCalibration)
    assert calibration.calibration_count == 1 and calibration.last_calibration_images == 6
    assert "ImageNetDataModule.calibration_dataloader()" in calibration.last_calibration_source
    rows = _rows(results)
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert (
        rows[0]["num_images"] == "6" and rows[0]["method"] == "minmax" and rows[0]["ptf"] == "True"
    )
    assert float(rows[0]["calib_seconds"]) > 0 and float(rows[0]["images_per_s"]) > 0
    top1 = 100 * float(cli.trainer.callback_metrics["val/top1"])
    assert float(rows[0]["top1"]) == pytest.approx(top1, abs=1e-4)
    assert "deit_tiny minmax ptf=True lis=True W/A/Attn=8/8/4 top1=" in caplog.text

    cli_main(args + ["--model.method", "omse", "--model.ptf", "false", "--model.lis", "false"])
    second = _rows(results)[1]
    assert (second["method"], second["ptf"], second["lis"], second["bits"]) == (
        "omse",
        "False",
        "False",
        "8/8/8",
    )


def test_missing_dataset_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli_main(
            [
                "validate",
                "--config",
                str(CONFIGS / "deit_tiny.yaml"),
                *QUIET,
                *TINY_IMAGENET,
                "--data.root",
                str(missing),
                "--results.csv_path",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path / "runs"),
            ]
        )


def test_too_small_train_split_for_calibration_is_an_error(tmp_path):
    root = tmp_path / "imagenet"
    _write_imagefolder(root, train=1)
    with pytest.raises(ValueError, match="calibration needs 3 batches of 2 = 6 images"):
        cli_main(
            [
                "validate",
                "--config",
                str(CONFIGS / "deit_tiny.yaml"),
                *QUIET,
                *TINY_IMAGENET,
                "--data.root",
                str(root),
                "--results.csv_path",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path / "runs"),
            ]
        )


def test_every_table_model_has_a_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "demo") == sorted(
        list_models()
    )


@pytest.mark.parametrize("name", list_models())
def test_configs_parse_with_the_paper_settings(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "validate",
                "--config",
                str(CONFIGS / f"{name}.yaml"),
                "--data.root",
                "/data/imagenet",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in (
        f"model_name: {name}",
        "method: minmax",
        "ptf: true",
        "lis: true",
        "pretrained: true",
        "class_path: datamodules.ImageNetDataModule",
        "root: /data/imagenet",
        "calib_batch_size: 100",
        "num_calib_batches: 10",
        "seed: 0",
        "precision: 32",
    ):
        assert line in printed, line
    assert printed.count(f"model_name: {name}") == 2  # model and data preprocessing agree


def test_main_py_print_config_selects_another_row():
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "validate",
            "--config",
            "configs/deit_small.yaml",
            "--data.root",
            "/x",
            "--model.method",
            "omse",
            "--model.ptf",
            "false",
            "--model.lis",
            "false",
            "--print_config",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "method: omse" in out and "ptf: false" in out and "lis: false" in out


def test_data_preprocessing_of_another_family_is_warned_about(tmp_path):
    root = tmp_path / "imagenet"
    _write_imagefolder(root)
    with pytest.warns(UserWarning, match="set data.model_name to match model.model_name"):
        cli_main(
            [
                "validate",
                "--config",
                str(CONFIGS / "deit_tiny.yaml"),
                *QUIET,
                *TINY_IMAGENET,
                "--data.root",
                str(root),
                "--data.model_name",
                "vit_base",
                "--results.csv_path",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path / "runs"),
            ]
        )
