"""The reusable export callback: write the deployable artifacts of a calibrated model."""

from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from fqvit_pl.quant import is_calibrated, quant_modules

__all__ = ["ExportArtifacts"]


class ExportArtifacts(pl.Callback):
    """After a calibrated evaluation, write the integer model as an int8 safetensors file and/or ONNX.

    Runs at the end of ``validate``/``test``/``predict`` (after :class:`QuantCalibration` has
    calibrated the module) and at the end of ``fit`` (when the last validation left the module
    calibrated). The LightningModule's network is converted by :func:`fqvit_pl.quant.to_integer`
    (a ``QuantViTModule``'s ``net``, or a module that is itself a ``create_model`` network or an
    integer model). Only global rank 0 writes.

    Args:
        path: the int8 artifact (:func:`fqvit_pl.export.save_quantized`), e.g. ``model.safetensors``;
            evaluate it later with ``--model.quantized_path``.
        onnx: the ONNX graph (:func:`fqvit_pl.export.export_onnx`, needs ``pip install fqvit_pl[onnx]``).
        onnx_exact: ``export_onnx``'s ``exact`` (default True: the integer model's arithmetic;
            False: the faster QDQ form, not bit for bit).
        onnx_gemm: ``export_onnx``'s ``gemm`` (``"u8s8"``, exact on VNNI CPUs, or ``"u8u8"``).

    Attributes:
        written: the files written so far.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        onnx: Optional[str] = None,
        onnx_exact: bool = True,
        onnx_gemm: str = "u8s8",
    ) -> None:
        self.path = path
        self.onnx = onnx
        self.onnx_exact = onnx_exact
        self.onnx_gemm = onnx_gemm
        self.written: list[str] = []

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.path or self.onnx) or not trainer.is_global_zero:
            return
        from fqvit_pl.export import export_onnx, save_quantized

        def write_onnx(module: pl.LightningModule, target: str) -> None:
            export_onnx(module, target, exact=self.onnx_exact, gemm=self.onnx_gemm)

        for target, write in ((self.path, save_quantized), (self.onnx, write_onnx)):
            if target:
                write(pl_module, target)
                self.written.append(os.fspath(target))
                rank_zero_info(f"ExportArtifacts: wrote {target}")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING and not trainer.sanity_checking:
            self._export(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.path or self.onnx):
            return
        if quant_modules(pl_module) and not is_calibrated(pl_module):
            rank_zero_warn(
                "ExportArtifacts: the model is not calibrated at the end of fit (no validation after "
                "the last training step?); nothing exported. Run `validate` with --export.path / "
                "--export.onnx on the final checkpoint instead."
            )
            return
        self._export(trainer, pl_module)
