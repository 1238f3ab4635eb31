"""Rebuild the paper's table with one command: every (method, ptf, lis) cell of one or more models.

``python -m fqvit_pl.table --config configs/deit_small.yaml --data.root /data/imagenet``
``    [--table.models [deit_small,swin_tiny]] [--table.methods [minmax,omse]] [--table.rows [pts_lis]]``

The same configuration files and options as ``main.py validate`` (it is the same LightningCLI
with a ``table`` group): ``--data.*``, ``--trainer.*``, ``--calibration.*``, ``--results.*``,
``--report.*``. The ``model.method/ptf/lis`` of the configuration are replaced by each cell's;
everything else of ``model.*`` (weights, classes, ``model_kwargs``) applies to every model.

Per model the float weights are loaded once and copied into each cell's network; each cell is
calibrated (``QuantCalibration``, i.e. ``fqvit_pl.quant.calibrate``) and validated, and its row is
appended to the results CSV (``--results.csv_path``). Cells already in that CSV are skipped, so an
interrupted run resumes where it stopped. At the end the Markdown table (ours, the paper's,
difference) is printed and written next to the CSV (``table.md``, ``table.png``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from fqvit_pl.analysis.figures import plot_table
from fqvit_pl.analysis.table import (
    METHOD_NAMES,
    ROW_KINDS,
    Cell,
    format_table,
    plan_cells,
    read_paper_table,
    read_peer_results,
    read_results,
    result_key,
)
from fqvit_pl.callbacks import QuantReport, ResultsWriter
from fqvit_pl.cli import FQViTCLI
from fqvit_pl.models import get_model_spec, load_checkpoint, quant_state_keys, read_checkpoint
from fqvit_pl.models.checkpoint import CheckpointError
from fqvit_pl.module import QuantViTModule
from fqvit_pl.quant import QuantConfig

__all__ = ["TableOptions", "TableCLI", "run_table", "main"]


@dataclass
class TableOptions:
    """What the table covers (the ``table.*`` options).

    Args:
        models: models to evaluate; default the configuration's ``model.model_name``.
        methods: activation observers (rows of the paper): minmax, ema, percentile, omse.
        rows: per method, ``plain`` (no PTS, no LIS), ``pts`` (w/ PTS) and ``pts_lis`` (w/ PTS, LIS).
        ckpt_path: float weights from a checkpoint of ``main.py fit`` (a Lightning checkpoint of
            ``QuantViTModule``), for one model; its calibration is not used.
        peers: add the published numbers of other methods (fqvit_pl/reference/peer_results.csv) as a labelled
            comparison table.
        paper_csv: the paper's table; default fqvit_pl/reference/paper_table.csv.
        peers_csv: other methods' numbers; default fqvit_pl/reference/peer_results.csv.
        output: the Markdown table; default ``table.md`` next to the results CSV (and its figure
            ``table.png``).
    """

    models: Optional[list[str]] = None
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    rows: list[str] = field(default_factory=lambda: list(ROW_KINDS))
    ckpt_path: Optional[str] = None
    peers: bool = True
    paper_csv: Optional[str] = None
    peers_csv: Optional[str] = None
    output: Optional[str] = None


class TableCLI(FQViTCLI):
    """The CLI of ``main.py`` without subcommands, plus the ``table`` group."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The groups of :class:`FQViTCLI` and ``table``."""
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(TableOptions, "table")


def _module_kwargs(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters that :class:`QuantViTModule` takes (drops LightningCLI's own entries)."""
    accepted = set(inspect.signature(QuantViTModule.__init__).parameters) - {"self"}
    return {key: value for key, value in hparams.items() if key in accepted}


def _float_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    quant = quant_state_keys(net)
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k not in quant}


def _state_from_lightning_checkpoint(path: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float weights of ``net`` from a Lightning checkpoint of :class:`QuantViTModule` (or a plain state dict)."""
    obj = read_checkpoint(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds no state dict")
    prefix = "net."
    if any(key.startswith(prefix) for key in state):
        state = {
            key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
        }
    wanted = _float_state(net)
    missing = [key for key in wanted if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path!r} lacks {len(missing)} float weight(s) of "
            f"{getattr(net, 'model_name', type(net).__name__)}, first {missing[:3]}: is it a "
            "checkpoint of this model (same model_name and model_kwargs)?"
        )
    return {key: state[key] for key in wanted}


def _datamodule_for(datamodule: pl.LightningDataModule, model_name: str) -> pl.LightningDataModule:
    """The DataModule with the preprocessing of ``model_name`` when it has a ``model_name`` argument."""
    hparams = dict(getattr(datamodule, "hparams", {}))
    if "model_name" not in hparams or hparams["model_name"] == model_name:
        return datamodule
    return type(datamodule)(**{**hparams, "model_name": model_name})


def _comparable(kwargs: dict[str, Any], model_name: str) -> bool:
    """Whether the network is the published one (so the paper's numbers apply)."""
    try:
        get_model_spec(model_name)
    except (KeyError, ValueError):
        return False
    return not kwargs.get("model_kwargs") and kwargs.get("num_classes", 1000) == 1000


def _bits(cell: Cell, overrides: Optional[dict]) -> str:
    return QuantConfig(cell.method, cell.ptf, cell.lis, overrides=dict(overrides or {})).bits_label


def run_table(
    trainer: pl.Trainer,
    module: QuantViTModule,
    datamodule: pl.LightningDataModule,
    options: TableOptions,
) -> str:
    """Evaluate every missing cell and return the Markdown table (also printed and written).

    ``module`` is the configured module: its hyper-parameters build each cell's network, and its
    network's float weights serve its own ``model_name`` (no second load).
    """
    writer = next((cb for cb in trainer.callbacks if isinstance(cb, ResultsWriter)), None)
    if writer is None or not writer.csv_path:
        raise ValueError(
            "the table needs a results CSV to collect and resume its cells: set --results.csv_path"
        )
    kwargs = _module_kwargs(dict(module.hparams))
    models = list(options.models or [kwargs["model_name"]])
    if options.ckpt_path is not None and models != [kwargs["model_name"]]:
        raise ValueError(
            f"--table.ckpt_path holds the weights of one model; got --table.models {models} "
            f"(the configuration's model is {kwargs['model_name']!r})"
        )
    cells = plan_cells(models, options.methods, options.rows)
    bits = {cell: _bits(cell, kwargs.get("overrides")) for cell in cells}
    report = next((cb for cb in trainer.callbacks if isinstance(cb, QuantReport)), None)
    report_root = None if report is None else report.dir
    total = len(cells)
    for model_name in models:
        done = {
            result_key(r["model"], r["method"], r["ptf"], r["lis"], r["bits"])
            for r in read_results(writer.csv_path)
            if r.get("top1")
        }
        has_fp = any(
            r.get("fp_top1") for r in read_results(writer.csv_path) if r["model"] == model_name
        )
        todo = [
            cell
            for cell in cells
            if cell.model == model_name
            and result_key(model_name, cell.method, cell.ptf, cell.lis, bits[cell]) not in done
        ]
        skipped = sum(cell.model == model_name for cell in cells) - len(todo)
        rank_zero_info(
            f"Table: {model_name}: {len(todo)} cell(s) to evaluate, {skipped} already in {writer.csv_path}"
        )
        if not todo:
            continue
        if model_name == kwargs["model_name"]:
            source = module
        else:
            source = QuantViTModule(**{**kwargs, "model_name": model_name})
        if options.ckpt_path is not None:
            state = _state_from_lightning_checkpoint(options.ckpt_path, source.net)
            origin = f"checkpoint {options.ckpt_path!r}"
        else:
            state = _float_state(source.net)
            origin = f"the float weights of {model_name}"
        del source
        data = _datamodule_for(datamodule, model_name)
        for cell in todo:
            index = cells.index(cell) + 1
            rank_zero_info(f"Table cell {index}/{total}: {model_name} {cell.label} ({bits[cell]})")
            cell_module = QuantViTModule(
                **{
                    **kwargs,
                    "model_name": model_name,
                    "method": cell.method,
                    "ptf": cell.ptf,
                    "lis": cell.lis,
                    "pretrained": False,
                    "checkpoint_path": None,
                    "fp_agreement": bool(kwargs.get("fp_agreement")) or not has_fp,
                }
            )
            load_checkpoint(cell_module.net, state, source=origin)
            if report_root is not None:
                report.dir = os.path.join(
                    report_root, f"{model_name}_{cell.method}_ptf{cell.ptf}_lis{cell.lis}"
                )
            trainer.validate(cell_module, datamodule=data, verbose=False)
            has_fp = has_fp or (writer.last_row is not None and writer.last_row.fp_top1 is not None)
    if report is not None:
        report.dir = report_root
    return write_table(cells, bits, writer.csv_path, kwargs, options)


def write_table(
    cells: list[Cell],
    bits: dict[Cell, str],
    csv_path: str,
    kwargs: dict[str, Any],
    options: TableOptions,
) -> str:
    """Format the table of ``cells`` from the results CSV, print it, write table.md and table.png."""
    paper = read_paper_table(options.paper_csv)
    peers = read_peer_results(options.peers_csv) if options.peers else None
    models = list(dict.fromkeys(c.model for c in cells))
    comparable = {m: _comparable(kwargs, m) for m in models}
    markdown, table_cells = format_table(
        cells, bits, read_results(csv_path), paper, comparable, peers
    )
    output = Path(options.output or Path(csv_path).with_name("table.md"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    plot_table(
        table_cells,
        output.with_suffix(".png"),
        title="Top-1 of each cell" + (" against the paper" if any(comparable.values()) else ""),
    )
    print(markdown)
    rank_zero_info(f"Table written to {output} and {output.with_suffix('.png')}")
    return markdown


def main(args: Optional[list[str]] = None) -> str:
    """Parse the command line (``args`` replaces ``sys.argv[1:]``) and build the table."""
    cli = TableCLI(
        QuantViTModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=args,
        run=False,
    )
    options = cli.config_init["table"]
    return run_table(cli.trainer, cli.model, cli.datamodule, options)


if __name__ == "__main__":
    main()
