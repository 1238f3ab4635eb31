"""main.py / fqvit_pl.cli end to end with tiny settings: demo fit → validate --ckpt_path, ImageNet-layout validate."""

import csv
import os
import subprocess
import sys

import pytest
from cli_args import CONFIGS, QUIET, REPO, TINY_DEMO
from PIL import Image

from fqvit_pl.callbacks import QuantCalibration, ResultsWriter
from fqvit_pl.cli import cli_main
from fqvit_pl.models import list_models
from fqvit_pl.results import RESULT_COLUMNS

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
        cli_main(_imagenet_args(tmp_path))


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


# -- wrong inputs stop the run before any work, naming the option at fault -----------------------


def _imagenet_args(tmp_path, *extra):
    root = tmp_path / "imagenet"
    if not root.exists():
        _write_imagefolder(root)
    return [
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
        *extra,
    ]


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if the run builds (or downloads) a network."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was built before the input was checked")

    monkeypatch.setattr("fqvit_pl.module.create_model", refuse)


@pytest.fixture
def no_calibration(monkeypatch):
    """Fails the test if the run starts calibrating."""

    def refuse(*args, **kwargs):
        raise AssertionError("calibration started before the input was checked")

    monkeypatch.setattr(QuantCalibration, "calibrate", refuse)


@pytest.fixture(scope="module")
def minmax_checkpoint(tmp_path_factory):
    """A calibrated Lightning checkpoint of the tiny minmax DeiT (saved by --calibration.save_path)."""
    tmp_path = tmp_path_factory.mktemp("minmax")
    path = tmp_path / "minmax.ckpt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["main.py"])
        cli_main(_imagenet_args(tmp_path, "--calibration.save_path", str(path)))
    assert path.is_file()
    return tmp_path, path


@pytest.mark.parametrize(
    ("flags", "differing"),
    [
        (["--model.method", "omse"], "model.method: checkpoint 'minmax', command line 'omse'"),
        (
            ["--model.model_name", "swin_tiny", "--model.model_kwargs", '{"img_size": 32}'],
            "model.model_name: checkpoint 'deit_tiny', command line 'swin_tiny'",
        ),
        (["--model.overrides", '{"activation": {"bit_type": "uint6"}}'], "model.overrides"),
    ],
)
def test_ckpt_path_contradicting_the_command_line_is_refused(
    minmax_checkpoint, flags, differing, no_model_built
):
    tmp_path, path = minmax_checkpoint
    with pytest.raises(ValueError, match="--ckpt_path") as info:
        cli_main(_imagenet_args(tmp_path, "--ckpt_path", str(path), *flags))
    assert differing in str(info.value) and "Nothing was run" in str(info.value)


def test_ckpt_path_keeps_the_command_lines_run_options(minmax_checkpoint):
    tmp_path, path = minmax_checkpoint  # saved with fp_agreement false
    cli = cli_main(
        _imagenet_args(tmp_path, "--ckpt_path", str(path), "--model.fp_agreement", "true")
    )
    assert cli.model.hparams.fp_agreement is True
    row = _callback(cli, ResultsWriter).last_row
    assert (row.method, row.fp_agreement) == ("minmax", 100.0)  # quantized vs float measured
    assert _callback(cli, QuantCalibration).calibration_count == 0  # evaluated as calibrated


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b"\x80\x02garbage that is not a checkpoint" * 4, "cannot read checkpoint"),
        ("plain", "is not a Lightning checkpoint"),
        ("object", "never loads"),
    ],
)
def test_unusable_ckpt_path_is_named(tmp_path, content, expected, no_model_built):
    import torch

    path = tmp_path / "x.ckpt"
    if content == "plain":  # a timm-style state dict of weights
        torch.save({"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)}, path)
    elif content == "object":  # would need weights_only=False, which could run code
        torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": torch.nn.ReLU()}, path)
    else:
        path.write_bytes(content)
    from fqvit_pl.models import CheckpointError

    with pytest.raises(CheckpointError) as info:
        cli_main(_imagenet_args(tmp_path, "--ckpt_path", str(path)))
    message = str(info.value)
    assert "--ckpt_path" in message and str(path) in message and expected in message
    assert "weights_only=False" not in message
    if content == "plain":
        assert f"--model.checkpoint_path {path}" in message


def test_missing_ckpt_path_is_named_before_building(tmp_path, no_model_built):
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*nothing.ckpt"):
        cli_main(_imagenet_args(tmp_path, "--ckpt_path", str(tmp_path / "nothing.ckpt")))


def test_unwritable_calibration_save_path_is_refused_before_calibrating(tmp_path, no_calibration):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="--calibration.save_path"):
        cli_main(_imagenet_args(tmp_path, "--calibration.save_path", str(folder)))
    assert list(folder.iterdir()) == []
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match="--calibration.save_path .* is a file"):
        cli_main(_imagenet_args(tmp_path, "--calibration.save_path", str(a_file / "x.ckpt")))


def test_a_save_that_leaves_no_file_is_an_error(tmp_path, monkeypatch):
    import pytorch_lightning as pl

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", lambda self, *args, **kwargs: None)
    with pytest.raises(OSError, match="--calibration.save_path .* left no file"):
        cli_main(_imagenet_args(tmp_path, "--calibration.save_path", str(tmp_path / "c.ckpt")))


@pytest.mark.parametrize("where", ["parent_is_file", "foreign_csv"])
def test_unusable_results_path_is_refused_before_evaluating(tmp_path, where, no_calibration):
    a_file = tmp_path / "a_file"
    a_file.write_text("a,b\n1,2\n")
    path = a_file / "results.csv" if where == "parent_is_file" else a_file
    args = _imagenet_args(tmp_path)
    args[args.index("--results.csv_path") + 1] = str(path)
    error = NotADirectoryError if where == "parent_is_file" else ValueError
    with pytest.raises(error, match="results"):
        cli_main(args)
    assert a_file.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true", "16-mixed", "64-true"])
def test_precisions_other_than_float32_are_refused(tmp_path, precision, no_model_built):
    with pytest.raises(ValueError, match=f"--trainer.precision {precision!r} is not supported"):
        cli_main(_imagenet_args(tmp_path, "--trainer.precision", precision))


def test_data_root_is_checked_before_the_model_is_built(tmp_path, no_model_built):
    args = _imagenet_args(tmp_path, "--model.pretrained", "true")
    args[args.index("--data.root") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--data.root .*nowhere"):
        cli_main(args)


def test_pretrained_weights_offline_say_how_to_proceed(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from fqvit_pl.models.factory import PretrainedWeightsError

    # Offline with an empty cache, without waiting for the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsError) as info:
        cli_main(_imagenet_args(tmp_path, "--model.pretrained", "true"))
    message = str(info.value)
    for part in ("deit_tiny_patch16_224.fb_in1k", "--model.checkpoint_path", "HF_HOME"):
        assert part in message
    assert "--model.pretrained false" in message


def test_head_size_is_checked_against_the_dataset_classes(tmp_path, no_calibration):
    args = _imagenet_args(tmp_path)
    args[args.index("--model.num_classes") + 1] = "2"
    with pytest.raises(ValueError, match="has 3 classes .* set --model.num_classes 3"):
        cli_main(args)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes read-only files"
)
def test_read_only_results_csv_is_refused_before_evaluating(tmp_path, no_calibration):
    path = tmp_path / "results.csv"
    path.write_text(",".join(RESULT_COLUMNS) + "\n")
    path.chmod(0o444)
    args = _imagenet_args(tmp_path)
    args[args.index("--results.csv_path") + 1] = str(path)
    with pytest.raises(PermissionError, match="--results.csv_path .* is not writable"):
        cli_main(args)
