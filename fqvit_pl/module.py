"""QuantViTModule: the LightningModule around a quantized ViT/DeiT/Swin from ``fqvit_pl.models``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from fqvit_pl.checks import check_num_classes
from fqvit_pl.models import create_model, resolve_data_config
from fqvit_pl.quant import QuantConfig, QuantModule, check_finite_output, quant_modules, to_integer

__all__ = ["QuantViTModule"]

_EVAL_STAGES = ("val", "test")


def _eval_metrics(num_classes: int) -> nn.ModuleDict:
    # average="micro" is the ImageNet top-k; torchmetrics' default (macro) is not.
    return nn.ModuleDict(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "fp_top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "fp_agreement": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            # execution="integer": top-1 agreement of the integer model with the simulation
            "sim_agreement": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            # Weighted by batch size and summed over ranks: exact however the images are split.
            "loss": MeanMetric(),
        }
    )


class QuantViTModule(pl.LightningModule):
    """A network from :func:`fqvit_pl.models.create_model`, evaluated (quantized) and fine-tuned (float).

    Quantization itself is driven from outside: :class:`fqvit_pl.callbacks.QuantCalibration`
    calibrates the network and switches quantization on before evaluation; without it the network
    runs in float.

    - validation/test log ``{val,test}/top1``, ``/top5`` (torchmetrics, ``average="micro"``; top-5
      becomes top-``num_classes`` below 5 classes) and ``/loss`` (cross-entropy). With
      ``fp_agreement``, each batch of a quantized evaluation also runs in float and logs
      ``/fp_top1`` and ``/fp_agreement`` (share of images whose quantized top-1 class equals the
      float one: a label-free measure of quantization damage).
    - training fine-tunes the float network with cross-entropy (``label_smoothing``) and logs
      ``train/loss``, ``train/top1``.

    Args:
        model_name: a name of :func:`fqvit_pl.models.list_models` (``deit_small``, ``swin_tiny`` …).
        method: activation observer: ``minmax``, ``ema``, ``percentile`` or ``omse``.
        ptf: Power-of-Two Factor for LayerNorm inputs (integer LayerNorm).
        lis: Log-Int-Softmax (4-bit attention probabilities).
        pretrained: load the published weights (§11; needs timm's download or cache).
        checkpoint_path: load float weights from this file instead.
        num_classes: classifier size.
        model_kwargs: architecture arguments for reduced models (``img_size``, ``depth`` …).
        overrides: per-role point overrides, e.g. ``{"activation": {"bit_type": "uint6"}}``.
        label_smoothing: cross-entropy label smoothing during training.
        fp_agreement: also measure the float model in the same evaluation pass.
        ln_eps: epsilon of the integer LayerNorm; 0 as published (NaN on a constant token, which
            a quantized evaluation reports as an error naming the layer).
        execution: ``"simulated"`` (fake quantization) or ``"integer"``: after calibration the
            evaluation runs :func:`fqvit_pl.quant.to_integer`'s integer model of the network.
        quantized_path: evaluate this int8 artifact (:func:`fqvit_pl.export.load_quantized`) instead:
            no float weights, download or calibration (the architecture, quantization settings and
            class count come from the file; ``method``/``ptf``/``lis``/``model_kwargs`` are unused).
        optimizer: optimizer factory, called with the parameters (LightningCLI: ``class_path``/``init_args``).
        lr_scheduler: optional scheduler factory, called with the optimizer; stepped every epoch.
    """

    def __init__(
        self,
        model_name: str = "deit_small",
        method: str = "minmax",
        ptf: bool = True,
        lis: bool = True,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        num_classes: int = 1000,
        model_kwargs: Optional[dict[str, Any]] = None,
        overrides: Optional[dict[str, dict[str, Any]]] = None,
        label_smoothing: float = 0.0,
        fp_agreement: bool = False,
        ln_eps: float = 0.0,
        execution: str = "simulated",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        quantized_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        if execution not in ("simulated", "integer"):
            raise ValueError(
                f"QuantViTModule: execution must be 'simulated' or 'integer', got {execution!r}"
            )
        # execution is how this run evaluates, not a property of the weights: kept out of the
        # checkpoint's hparams, so that `validate --ckpt_path ... --model.execution integer` applies
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "execution"])
        # An int8 artifact is an integer model already.
        self.execution = "integer" if quantized_path is not None else execution
        if quantized_path is not None:
            self.net, num_classes = _load_artifact(quantized_path, num_classes)
        else:  # create_model returns eval mode; Lightning switches modes per stage from here
            self.net = create_model(
                model_name,
                method=method,
                ptf=ptf,
                lis=lis,
                pretrained=pretrained,
                checkpoint_path=checkpoint_path,
                num_classes=num_classes,
                model_kwargs=model_kwargs,
                ln_eps=ln_eps,
                **dict(overrides or {}),
            ).train()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.fp_agreement = fp_agreement
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.metrics = nn.ModuleDict({stage: _eval_metrics(num_classes) for stage in _EVAL_STAGES})
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self._quantized: list[QuantModule] = []
        # Not a submodule: derived from the calibrated network, never in checkpoints.
        self._integer_net: Optional[nn.Module] = None
        self._float_pass = False  # forward runs self.net even when an integer model exists

    @property
    def is_integer_artifact(self) -> bool:
        """Whether the network is a loaded int8 artifact (already quantized: nothing to calibrate)."""
        return self.hparams.get("quantized_path") is not None

    @property
    def quant_config(self) -> QuantConfig:
        """The network's quantization configuration (method, ptf, lis, per-role overrides)."""
        if self.is_integer_artifact:
            from fqvit_pl.quant.integer.models import quant_config_from_dict

            return quant_config_from_dict(self.net.integer_config["quant"])
        return self.net.qconfig

    def describe(self) -> dict[str, Any]:
        """What identifies this run in the paper's table: model, method, ptf, lis, bits (``W/A/Attn``)."""
        return {
            "model": self.net.integer_config["model_name"]
            if self.is_integer_artifact
            else self.hparams.model_name,
            "method": self.quant_config.method,
            "ptf": self.quant_config.ptf,
            "lis": self.quant_config.lis,
            "bits": self.quant_config.bits_label,
            "execution": self.execution,
            "ln_eps": self.quant_config.ln_eps,  # not the published LayerNorm when non-zero
        }

    def on_quantization_ready(self) -> None:
        """Called by :class:`~fqvit_pl.callbacks.QuantCalibration` once the network is calibrated and
        quantizing: with ``execution="integer"``, build the integer model that evaluation runs."""
        if self.execution == "integer":
            self._integer_net = to_integer(self.net)

    @property
    def integer_net(self) -> Optional[nn.Module]:
        """The integer model evaluated with ``execution="integer"`` (``None`` before calibration)."""
        return self._integer_net

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self._integer_net is not None and not self._float_pass and not self.training:
            return self._integer_net(x)
        return self.net(x)

    def _quantizing_modules(self) -> list[QuantModule]:
        return [m for m in quant_modules(self.net) if m.is_quantizing]

    @contextmanager
    def float_mode(self, modules: Optional[list[QuantModule]] = None) -> Iterator[None]:
        """Run the enclosed code with the quantized layers (default: those quantized now) in float."""
        active = modules if modules is not None else self._quantizing_modules()
        for module in active:
            module.set_quantization(False)
        self._float_pass = True
        try:
            yield
        finally:
            self._float_pass = False
            for module in active:
                module.set_quantization(True)

    # -- setup ------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.is_integer_artifact:
            raise ValueError(
                f"model.quantized_path={self.hparams.quantized_path!r}: an int8 artifact has no float "
                "weights to fine-tune; use validate/test/predict, or fit from model.checkpoint_path"
            )
        self._check_preprocessing()
        self._check_num_classes()

    def _check_num_classes(self) -> None:
        # A mismatch otherwise surfaces mid-evaluation inside torchmetrics (or not at all).
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        classes = getattr(datamodule, "num_classes", None)
        if isinstance(classes, int) and not isinstance(classes, bool):
            root = getattr(datamodule, "root", None)
            source = f"the data ({type(datamodule).__name__}{f' at {root!r}' if root else ''})"
            check_num_classes(classes, self.num_classes, source)

    def _check_preprocessing(self) -> None:
        datamodule = (
            getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        )
        data_config = getattr(datamodule, "data_config", None)
        if not isinstance(data_config, dict):
            return
        try:
            expected = resolve_data_config(
                self.hparams.model_name, int(data_config["input_size"][-1])
            )
        except ValueError:
            return
        differs = [
            key for key in ("mean", "std", "crop_pct") if expected[key] != data_config.get(key)
        ]
        if differs:
            rank_zero_warn(
                f"The DataModule preprocesses for another model family than {self.hparams.model_name!r} "
                f"({', '.join(differs)} differ): set data.model_name to match model.model_name"
            )

    # -- training ---------------------------------------------------------------------------

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        self._integer_net = (
            None  # the weights change: a fresh conversion follows the next calibration
        )
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_top1(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- evaluation -------------------------------------------------------------------------

    def _evaluation_epoch_start(self) -> None:
        self._quantized = self._quantizing_modules()
        if self.fp_agreement and self.is_integer_artifact:
            rank_zero_warn(
                "fp_agreement: the int8 artifact (model.quantized_path) has no float weights; "
                "fp_top1/fp_agreement are not logged"
            )
        elif self.fp_agreement and not self._quantized and not self.trainer.sanity_checking:
            rank_zero_warn(
                "fp_agreement is on but the network is not quantized in this evaluation "
                "(no QuantCalibration callback?): fp_top1/fp_agreement are not logged"
            )

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self._quantized:  # NaN would only lower top-1 silently: name the layer instead
            check_finite_output(self.net, x, logits)
        metrics = self.metrics[stage]
        size = len(y)
        metrics["top1"](logits, y)
        metrics["top5"](logits, y)
        metrics["loss"](F.cross_entropy(logits, y), weight=size)
        self.log(f"{stage}/loss", metrics["loss"], batch_size=size)
        self.log(f"{stage}/top1", metrics["top1"], prog_bar=True, batch_size=size)
        self.log(f"{stage}/top5", metrics["top5"], batch_size=size)
        if self._integer_net is not None and self._quantized:
            self._float_pass = True  # the simulated network, quantization on
            try:
                sim_logits = self(x)
            finally:
                self._float_pass = False
            metrics["sim_agreement"](logits.argmax(dim=-1), sim_logits.argmax(dim=-1))
            self.log(f"{stage}/sim_agreement", metrics["sim_agreement"], batch_size=size)
        if self.fp_agreement and self._quantized:
            with self.float_mode(self._quantized):
                fp_logits = self(x)
            metrics["fp_top1"](fp_logits, y)
            metrics["fp_agreement"](logits.argmax(dim=-1), fp_logits.argmax(dim=-1))
            self.log(f"{stage}/fp_top1", metrics["fp_top1"], prog_bar=True, batch_size=size)
            self.log(f"{stage}/fp_agreement", metrics["fp_agreement"], batch_size=size)

    @override
    def on_validation_epoch_start(self) -> None:
        self._evaluation_epoch_start()

    @override
    def on_test_epoch_start(self) -> None:
        self._evaluation_epoch_start()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)


def _load_artifact(path: str, num_classes: int) -> tuple[nn.Module, int]:
    """The integer model of an int8 artifact and its class count (warns if ``num_classes`` differs)."""
    from fqvit_pl.export import load_quantized

    net = load_quantized(path)
    classes = int(net.integer_config["num_classes"])
    if classes != num_classes:
        rank_zero_warn(
            f"model.quantized_path={path!r} has {classes} classes; model.num_classes={num_classes} "
            "is ignored"
        )
    return net, classes
