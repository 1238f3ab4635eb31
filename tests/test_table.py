"""The table command: every cell of the demo model, resumable, next to the paper's numbers."""

import csv
import sys

import pytest
from cli_args import DEMO_CONFIG, QUIET, REPO
from cli_args import TINY_DEMO as TINY_DEMO_ARGS

from fqvit_pl.analysis.table import (
    Cell,
    format_table,
    plan_cells,
    read_paper_table,
    read_peer_results,
)
from fqvit_pl.cli import cli_main
from fqvit_pl.table import main as table_main

TINY_DEMO = ["--config", str(DEMO_CONFIG), *QUIET, *TINY_DEMO_ARGS]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["table"])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _paper(model, method, ptf, lis):
    with open(REPO / "fqvit_pl" / "reference" / "paper_table.csv", newline="") as f:
        for row in csv.DictReader(f):
            if (row["method"], row["ptf"], row["lis"]) == (method, ptf, lis):
                return float(row[model])
    raise KeyError(method)


def test_the_markdown_table_puts_ours_next_to_the_paper_with_the_difference():
    cells = plan_cells(["deit_small"], ["minmax", "omse"], ["plain", "pts_lis"])
    assert [c.label for c in cells] == ["MinMax", "MinMax w/ PTS, LIS", "OMSE", "OMSE w/ PTS, LIS"]
    bits = {c: "8/8/4" if c.lis else "8/8/8" for c in cells}
    results = [
        {
            "model": "deit_small",
            "method": "minmax",
            "ptf": "True",
            "lis": "True",
            "bits": "8/8/4",
            "top1": "78.0000",
            "fp_top1": "79.8000",
        },
        {
            "model": "deit_small",
            "method": "omse",
            "ptf": "False",
            "lis": "False",
            "bits": "8/8/8",
            "top1": "75.5000",
            "fp_top1": "",
        },
    ]
    markdown, table = format_table(
        cells, bits, results, read_paper_table(), {"deit_small": True}, read_peer_results()
    )
    by_label = {c["label"]: c for c in table}
    assert by_label["MinMax w/ PTS, LIS"]["paper"] == _paper("deit_small", "minmax", "true", "true")
    assert by_label["MinMax w/ PTS, LIS"]["diff"] == pytest.approx(78.0 - 78.40)
    assert by_label["Full Precision"]["top1"] == 79.8
    assert by_label["Full Precision"]["paper"] == _paper(
        "deit_small", "full_precision", "false", "false"
    )
    assert by_label["MinMax"]["top1"] is None  # not evaluated yet
    assert "| MinMax w/ PTS, LIS | 8/8/4 | 78.00 | 78.40 | -0.40 |" in markdown
    assert "| OMSE | 8/8/8 | 75.50 | 75.03 | +0.47 |" in markdown
    assert "keep LayerNorm and softmax in floating point" in markdown
    assert "| PTQ4ViT | 8/8 | 79.47 |" in markdown
    # a reduced network shows no paper value
    markdown, table = format_table(cells, bits, results, read_paper_table(), {"deit_small": False})
    assert all(c["paper"] is None for c in table) and "not the published network" in markdown


def test_a_cell_whose_bits_differ_from_the_paper_row_gets_no_paper_value():
    cell = Cell("deit_small", "minmax", True, True)
    rows = [
        {
            "model": "deit_small",
            "method": "minmax",
            "ptf": "True",
            "lis": "True",
            "bits": "8/6/4",
            "top1": "70.0",
            "fp_top1": "",
        }
    ]
    _, table = format_table([cell], {cell: "8/6/4"}, rows, read_paper_table(), {"deit_small": True})
    assert [c["paper"] for c in table if c["label"] == cell.label] == [None]


def test_unknown_methods_and_rows_are_named():
    with pytest.raises(ValueError, match="unknown method.*'minmaxx'"):
        plan_cells(["deit_small"], ["minmaxx"], ["plain"])
    with pytest.raises(ValueError, match="unknown row.*'lis'"):
        plan_cells(["deit_small"], ["minmax"], ["lis"])


def test_the_table_command_on_the_demo_evaluates_each_cell_once_and_resumes(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "table" / "results.csv"
    args = [
        *TINY_DEMO,
        "--results.csv_path",
        str(results),
        "--table.methods",
        "[minmax,omse]",
        "--table.rows",
        "[plain,pts_lis]",
    ]
    markdown = table_main(args)
    rows = _rows(results)
    assert [(r["method"], r["ptf"], r["lis"], r["bits"]) for r in rows] == [
        ("minmax", "False", "False", "8/8/8"),
        ("minmax", "True", "True", "8/8/4"),
        ("omse", "False", "False", "8/8/8"),
        ("omse", "True", "True", "8/8/4"),
    ]
    # the float weights were loaded once and copied into every cell: one float top-1
    assert len({r["fp_top1"] for r in rows}) == 1 and rows[0]["fp_top1"] != ""
    assert (tmp_path / "table" / "table.md").read_text() == markdown
    assert (tmp_path / "table" / "table.png").is_file()
    fp = float(rows[0]["fp_top1"])
    assert f"| Full Precision | 32/32/32 | {fp:.2f} | — | — |" in markdown
    assert f"| OMSE w/ PTS, LIS | 8/8/4 | {float(rows[3]['top1']):.2f} | — | — |" in markdown
    assert "not the published network" in markdown
    assert markdown in capsys.readouterr().out

    # a second run finds every cell in the CSV and evaluates nothing
    assert table_main(args) == markdown
    assert len(_rows(results)) == 4


def test_the_table_from_a_fit_checkpoint_uses_its_float_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = cli_main(
        [
            "fit",
            *TINY_DEMO,
            "--trainer.max_epochs",
            "1",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.limit_train_batches",
            "3",
        ]
    )
    metrics = fit.trainer.callback_metrics
    checkpoint = tmp_path / "runs/demo/checkpoints/last.ckpt"
    results = tmp_path / "t.csv"
    table_main(
        [
            *TINY_DEMO,
            "--results.csv_path",
            str(results),
            "--table.ckpt_path",
            str(checkpoint),
            "--table.methods",
            "[minmax]",
            "--table.rows",
            "[pts_lis]",
            "--table.peers",
            "false",
        ]
    )
    [row] = _rows(results)
    # same weights and calibration data as the fit's last validation: same numbers
    assert float(row["fp_top1"]) == pytest.approx(100 * float(metrics["val/fp_top1"]), abs=1e-3)
    assert float(row["top1"]) == pytest.approx(100 * float(metrics["val/top1"]), abs=1e-3)
    with pytest.raises(ValueError, match="ckpt_path holds the weights of one model"):
        table_main(
            [
                *TINY_DEMO,
                "--results.csv_path",
                str(results),
                "--table.ckpt_path",
                str(checkpoint),
                "--table.models",
                "[deit_tiny,deit_small]",
            ]
        )
