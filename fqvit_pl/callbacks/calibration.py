"""The reusable calibration callback: calibrate ``fqvit_pl.quant`` layers before evaluation."""

from __future__ import annotations

import os
import time
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm
from typing_extensions import override

from fqvit_pl.checks import check_int, check_precision, check_writable_file
from fqvit_pl.distributed import shard_batch
from fqvit_pl.quant import calibrate as calibrate_model
from fqvit_pl.quant import (
    disable_quantization,
    enable_quantization,
    is_calibrated,
    quant_modules,
    reset_calibration,
)

__all__ = ["QuantCalibration", "DEFAULT_NUM_BATCHES"]

#: Batches taken from a train or validation loader when ``num_batches`` is not set (§9: 10 batches).
DEFAULT_NUM_BATCHES = 10


def default_batch_to_input(batch: Any) -> Any:
    """The model input of a batch: ``batch[0]`` for a tuple/list ``(inputs, targets, ...)``, else the batch."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("QuantCalibration: got an empty batch")
        return batch[0]
    return batch


class QuantCalibration(pl.Callback):
    """Calibrate the ``fqvit_pl.quant`` layers of any LightningModule before validation/test/predict.

    At ``on_{validation,test,predict}_start`` the callback feeds calibration batches through the
    module (``fqvit_pl.quant.calibrate``: observe, compute and freeze every scale, zero point, PTF
    factor and LIS input scale) and switches quantization on, so the evaluation that follows is
    quantized. Batches come from, in order of preference: ``calibration_dataloader()`` of the
    DataModule (or of the LightningModule); their ``train_dataloader()``; the loader ``fit`` trains
    on; and last, with a warning, the evaluation loader itself.

    - A module whose ``is_integer_artifact`` is true (``QuantViTModule`` with ``quantized_path``)
      is already quantized: the callback leaves it alone.
    - **validate/test/predict**: a module that is already calibrated (e.g. restored from a
      checkpoint of a calibrated model: calibration state is module state) is evaluated as is,
      unless ``recalibrate``.
    - **fit**: training runs in float. The callback recalibrates before every validation epoch (not
      the sanity check), so validation reports quantized accuracy; after validation it switches
      quantization off, and at the first training step after a calibration it discards the
      calibration, which no longer matches the weights (so a checkpoint is calibrated exactly
      when its calibration matches its weights).

    Args:
        num_batches: how many calibration batches to observe. ``None``: every batch of a
            ``calibration_dataloader`` (the DataModule sizes it), or ``DEFAULT_NUM_BATCHES`` of a
            train/validation loader.
        recalibrate: calibrate again even when the module is already calibrated.
        batch_to_input: maps a loader batch to the module's input; default ``batch[0]`` for
            tuple/list batches, else the batch itself. Override :meth:`forward` for other call forms.
        progress_bar: show a progress bar over the calibration batches (also needs the trainer's
            progress bar to be enabled).
        save_path: after each calibration outside ``fit``, save a Lightning checkpoint of the
            calibrated module here, to evaluate it later (``--ckpt_path``) without the calibration data.
            Checked at ``setup`` (before calibrating) and after the save. ``setup`` also refuses a
            trainer precision other than float32.

    Attributes:
        calibration_count: calibrations run by this callback so far.
        last_calibration_seconds: wall time of the calibration before the current/last evaluation,
            ``None`` when that evaluation reused an existing calibration.
        last_calibration_images: images observed by that calibration (``None`` likewise).
        last_calibration_source: where its batches came from.
    """

    def __init__(
        self,
        num_batches: Optional[int] = None,
        recalibrate: bool = False,
        batch_to_input: Optional[Callable[[Any], Any]] = None,
        progress_bar: bool = True,
        save_path: Optional[str] = None,
    ) -> None:
        if num_batches is not None:
            check_int("QuantCalibration: num_batches (or None)", num_batches)
        self.num_batches = num_batches
        self.recalibrate = recalibrate
        self.batch_to_input = batch_to_input or default_batch_to_input
        self.progress_bar = progress_bar
        self.save_path = save_path
        self.calibration_count = 0
        self.last_calibration_seconds: Optional[float] = None
        self.last_calibration_images: Optional[int] = None
        self.last_calibration_source: Optional[str] = None
        self._discard_on_next_step = False

    # -- hooks ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a precision other than float32 and an unwritable ``save_path`` before any work."""
        check_precision(trainer.precision)
        if self.save_path and stage != "fit":
            check_writable_file(self.save_path, "--calibration.save_path")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._prepare(trainer, pl_module, fresh_weights=trainer.state.fn == TrainerFn.FITTING)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module, fresh_weights=False)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module, fresh_weights=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._require_quant_layers(pl_module)
            disable_quantization(pl_module)  # training resumes in float
            self._discard_on_next_step = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_quant_layers(pl_module)
        disable_quantization(pl_module)
        self._discard_on_next_step = True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._discard_on_next_step:
            reset_calibration(
                pl_module
            )  # this step changes the weights: the calibration no longer fits them
            self._discard_on_next_step = False

    # -- calibration ------------------------------------------------------------------------

    def _require_quant_layers(self, pl_module: pl.LightningModule) -> None:
        if not quant_modules(pl_module):
            raise ValueError(
                f"QuantCalibration: {type(pl_module).__name__} contains no fqvit_pl.quant layers "
                "(QuantAct, QuantLinear, ...): nothing to calibrate. Build its network from "
                "fqvit_pl.models.create_model or fqvit_pl.quant layers, or remove the callback."
            )

    def _prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, fresh_weights: bool
    ) -> None:
        self.last_calibration_seconds = self.last_calibration_images = (
            self.last_calibration_source
        ) = None
        # A loaded int8 file (QuantViTModule with quantized_path): nothing to calibrate.
        if getattr(pl_module, "is_integer_artifact", False):
            rank_zero_info(f"{type(pl_module).__name__} evaluates an int8 artifact: no calibration")
            return
        self._require_quant_layers(pl_module)
        if fresh_weights or self.recalibrate or not is_calibrated(pl_module):
            self.calibrate(trainer, pl_module)
            if self.save_path and not fresh_weights:
                self._save(trainer)
        else:
            enable_quantization(pl_module)
            rank_zero_info(
                f"{type(pl_module).__name__} is already calibrated (e.g. restored from a calibrated "
                "checkpoint): evaluating with its stored quantization parameters; set recalibrate=True "
                "to calibrate again."
            )
        ready = getattr(pl_module, "on_quantization_ready", None)
        if callable(ready):
            ready()  # e.g. QuantViTModule converts to its integer model (execution="integer")

    def _save(self, trainer: pl.Trainer) -> None:
        path = os.fspath(self.save_path)
        trainer.save_checkpoint(path)  # written by global rank zero, which checks it for all ranks
        saved = trainer.is_global_zero and os.path.isfile(path) and os.path.getsize(path) > 0
        if not trainer.strategy.broadcast(saved, src=0):
            raise OSError(
                f"--calibration.save_path {path!r}: saving the calibrated model left no file there; "
                "check the path and the free space, then run again"
            )
        rank_zero_info(f"Saved the calibrated model to {path}")

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate ``pl_module`` now and switch quantization on (the one place calibration happens)."""
        loader, source, is_calibration_loader = self.calibration_batches(trainer, pl_module)
        limit = (
            self.num_batches
            if self.num_batches is not None
            else (None if is_calibration_loader else DEFAULT_NUM_BATCHES)
        )
        batches: Iterable[Any] = loader if limit is None else islice(loader, limit)
        total = _length(loader)
        if limit is not None:
            total = limit if total is None else min(total, limit)
        show = (
            self.progress_bar
            and trainer.progress_bar_callback is not None
            and trainer.is_global_zero
        )
        counter = {"batches": 0, "images": 0}
        start = time.perf_counter()
        with tqdm(
            batches,
            total=total,
            desc="Calibration",
            disable=not show,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            calibrate_model(
                pl_module, self._inputs(bar, trainer, pl_module, counter), forward=self.forward
            )
        seconds = time.perf_counter() - start
        if limit is not None and counter["batches"] < limit:
            rank_zero_warn(
                f"QuantCalibration: {source} gave only {counter['batches']} of the {limit} "
                "requested calibration batches"
            )
        self.calibration_count += 1
        self.last_calibration_seconds = seconds
        self.last_calibration_images = counter["images"]
        self.last_calibration_source = source
        if trainer.state.fn in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING):
            pl_module.log(
                "calibration/seconds", seconds, on_step=False, on_epoch=True, batch_size=1
            )
        rank_zero_info(
            f"Calibrated {len(quant_modules(pl_module))} quantized layers on {counter['batches']} batches "
            f"({counter['images']} images) from {source} in {seconds:.1f} s"
        )

    def _inputs(
        self,
        batches: Iterable[Any],
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        counter: dict[str, int],
    ) -> Iterator[Any]:
        # Each rank observes its contiguous part of every global batch; the quant core merges the
        # statistics, so W ranks compute exactly what one process computes on the whole batch.
        for batch in batches:
            inputs = self.batch_to_input(batch)
            counter["batches"] += 1
            if isinstance(inputs, Tensor) and inputs.dim() > 0:
                counter["images"] += inputs.shape[0]
            inputs = shard_batch(inputs, trainer.global_rank, trainer.world_size)
            yield move_data_to_device(inputs, pl_module.device)

    def forward(self, pl_module: nn.Module, inputs: Any) -> Any:
        """Run the module on one calibration input; default ``pl_module(inputs)``."""
        return pl_module(inputs)

    def calibration_batches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Iterable[Any], str, bool]:
        """The calibration batches: ``(loader, description, is_dedicated_calibration_loader)``."""
        owners = [owner for owner in (trainer.datamodule, pl_module) if owner is not None]
        for owner in owners:
            make = getattr(owner, "calibration_dataloader", None)
            if callable(make):
                return make(), f"{type(owner).__name__}.calibration_dataloader()", True
        for owner in owners:
            if is_overridden("train_dataloader", owner):
                return owner.train_dataloader(), f"{type(owner).__name__}.train_dataloader()", False
        train_loader = (
            _first(trainer.train_dataloader) if trainer.state.fn == TrainerFn.FITTING else None
        )
        if train_loader is not None:
            return train_loader, "the training loader", False
        loaders = _first(
            {
                TrainerFn.FITTING: trainer.val_dataloaders,
                TrainerFn.VALIDATING: trainer.val_dataloaders,
                TrainerFn.TESTING: trainer.test_dataloaders,
                TrainerFn.PREDICTING: trainer.predict_dataloaders,
            }.get(trainer.state.fn)
        )
        if loaders is None:
            raise RuntimeError(
                "QuantCalibration: found no calibration data: give the DataModule a "
                "calibration_dataloader() or a train_dataloader()"
            )
        rank_zero_warn(
            "QuantCalibration: no calibration_dataloader() or train_dataloader() found; calibrating on "
            "the evaluation batches themselves. The reported accuracy is then not a held-out measure."
        )
        return loaders, f"the {trainer.state.stage.value} loader", False


def _first(loaders: Any) -> Optional[Iterable[Any]]:
    """The first of several loaders (a list/tuple), the loader itself, or ``None``."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _length(loader: Iterable[Any]) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
