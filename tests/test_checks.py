"""The input checks run before any work: output paths, precision, checkpoint hyperparameters."""

import os
import sys

import pytest

from fqvit_pl.checks import (
    check_precision,
    check_writable_file,
    hparam_conflicts,
    read_lightning_checkpoint,
)


def test_writable_file_accepts_new_files_in_new_folders(tmp_path):
    check_writable_file(tmp_path / "new" / "deeper" / "file.csv", "--x")
    assert not (tmp_path / "new").exists()  # checked, not created


def test_writable_file_refuses_folders_and_files_as_parents(tmp_path):
    with pytest.raises(IsADirectoryError, match="--x .* is a folder"):
        check_writable_file(tmp_path, "--x")
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_writable_file(tmp_path / "f" / "sub" / "file.csv", "--x")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_writable_file_probes_folders_where_nothing_can_be_created():
    # /proc takes no new files, even for root (whose os.access says yes to everything).
    with pytest.raises(PermissionError, match="no file can be written in '/proc'"):
        check_writable_file("/proc/fqvit_results.csv", "--x")


@pytest.mark.parametrize("precision", [32, "32", "32-true"])
def test_float32_precisions_pass(precision):
    check_precision(precision)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "16-true", "bf16-true", 64])
def test_other_precisions_are_refused_naming_the_option(precision):
    with pytest.raises(ValueError, match="--trainer.precision .*32"):
        check_precision(precision)


def test_hparam_conflicts_ignore_yaml_vs_python_spelling():
    stored = {"model_kwargs": {"depths": (2, 2)}, "overrides": None, "method": "omse", "ptf": True}
    given = {"model_kwargs": {"depths": [2, 2]}, "overrides": {}, "method": "minmax", "ptf": True}
    assert hparam_conflicts(stored, given, list(stored)) == {"method": ("omse", "minmax")}


def test_lightning_keywords_are_left_to_lightning(tmp_path):
    for keyword in ("last", "best", "hpc", "registry:model:latest", "s3://bucket/x.ckpt"):
        assert read_lightning_checkpoint(keyword) is None
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*x.ckpt"):
        read_lightning_checkpoint(os.fspath(tmp_path / "x.ckpt"))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes read-only files"
)
def test_writable_file_refuses_read_only_files_and_folders(tmp_path):
    read_only = tmp_path / "r.csv"
    read_only.write_text("")
    read_only.chmod(0o444)
    with pytest.raises(PermissionError, match="exists and is not writable"):
        check_writable_file(read_only, "--x")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="no file can be written in"):
            check_writable_file(folder / "sub" / "file.csv", "--x")
    finally:
        folder.chmod(0o755)
