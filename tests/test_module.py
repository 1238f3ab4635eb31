"""QuantViTModule: metrics against an independent computation, float agreement, description."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fqvit_pl.callbacks import QuantCalibration
from fqvit_pl.module import QuantViTModule
from fqvit_pl.quant import CalibrationConfigError, NonFiniteOutputError, is_calibrated

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _module(**kwargs):
    torch.manual_seed(0)
    kwargs = {"model_name": "deit_tiny", "num_classes": 10, "model_kwargs": TINY, **kwargs}
    return QuantViTModule(**kwargs)


class RandomImages(pl.LightningDataModule):
    def __init__(self, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 3, 16, 16, generator=g)
        self.y = torch.randint(0, classes, (40,), generator=g)

    def calibration_dataloader(self):
        return DataLoader(TensorDataset(self.x[:16], self.y[:16]), batch_size=8)

    def val_dataloader(self):
        return DataLoader(
            TensorDataset(self.x, self.y), batch_size=16
        )  # last batch 8: weights differ

    def test_dataloader(self):
        return self.val_dataloader()


def _trainer(**kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **kwargs,
    )


def _expected(module, data):
    """Top-1, top-5, loss over the whole set, in the module's current (quantized) state, and float logits."""
    module.eval()
    with torch.no_grad():
        logits = module(data.x)
        with module.float_mode():
            fp_logits = module(data.x)
    top5 = logits.topk(5, dim=1).indices
    return {
        "top1": (logits.argmax(1) == data.y).float().mean().item(),
        "top5": (top5 == data.y[:, None]).any(dim=1).float().mean().item(),
        "loss": F.cross_entropy(logits, data.y).item(),
        "fp_top1": (fp_logits.argmax(1) == data.y).float().mean().item(),
        "fp_agreement": (fp_logits.argmax(1) == logits.argmax(1)).float().mean().item(),
        "differs": not torch.equal(logits, fp_logits),
    }


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_quantized_metrics_match_an_independent_computation(stage):
    module, data = _module(fp_agreement=True), RandomImages()
    results = getattr(_trainer(callbacks=[QuantCalibration()]), stage)(module, datamodule=data)[0]
    prefix = "val" if stage == "validate" else "test"
    expected = _expected(module, data)
    assert expected["differs"], "quantization should change the logits"
    for name in ("top1", "top5", "loss", "fp_top1", "fp_agreement"):
        assert results[f"{prefix}/{name}"] == pytest.approx(expected[name], abs=1e-6), name


def test_integer_execution_validates_the_integer_model():
    module, data = _module(fp_agreement=True, execution="integer"), RandomImages()
    results = _trainer(callbacks=[QuantCalibration()]).validate(module, datamodule=data)[0]
    assert module.integer_net is not None and module.describe()["execution"] == "integer"
    expected = _expected(module, data)  # module(x) in eval mode is the integer model's output
    with torch.no_grad():
        assert torch.equal(module(data.x), module.integer_net(data.x))
    for name in ("top1", "top5", "loss", "fp_top1", "fp_agreement"):
        assert results[f"val/{name}"] == pytest.approx(expected[name], abs=1e-6), name


def test_unknown_execution_is_a_named_error():
    with pytest.raises(ValueError, match="execution"):
        _module(execution="fast")


def test_without_calibration_the_network_runs_float_and_fp_metrics_are_skipped():
    module, data = _module(fp_agreement=True), RandomImages()
    with pytest.warns(UserWarning, match="fp_agreement is on but the network is not quantized"):
        results = _trainer().validate(module, datamodule=data)[0]
    assert not is_calibrated(module.net)
    assert "val/fp_agreement" not in results
    module.eval()
    with torch.no_grad():
        expected = (module(data.x).argmax(1) == data.y).float().mean().item()
    assert results["val/top1"] == pytest.approx(expected)


def test_top5_with_fewer_than_five_classes_is_top_num_classes():
    module, data = _module(num_classes=3), RandomImages(classes=3)
    results = _trainer(callbacks=[QuantCalibration()]).validate(module, datamodule=data)[0]
    assert results["val/top5"] == 1.0


def test_float_mode_restores_quantization():
    module, data = _module(), RandomImages()
    _trainer(callbacks=[QuantCalibration()]).validate(module, datamodule=data)
    with module.float_mode():
        assert not any(
            bool(m.quant_enabled) for m in module.net.modules() if hasattr(m, "quant_enabled")
        )
    assert all(bool(m.quant_enabled) for m in module.net.modules() if hasattr(m, "quant_enabled"))


@pytest.mark.parametrize(
    "kwargs,bits",
    [
        ({}, "8/8/4"),
        ({"lis": False}, "8/8/8"),
        ({"overrides": {"activation": {"bit_type": "uint6"}}}, "8/6/4"),
    ],
)
def test_describe(kwargs, bits):
    module = _module(method="omse", **kwargs)
    assert module.describe() == {
        "model": "deit_tiny",
        "method": "omse",
        "ptf": True,
        "lis": kwargs.get("lis", True),
        "bits": bits,
        "execution": "simulated",
        "ln_eps": 0.0,
    }


def test_overrides_reach_the_network():
    module = _module(overrides={"activation": {"bit_type": "uint6"}})
    points = [
        m
        for m in module.net.modules()
        if type(m).__name__ == "QuantAct"
        and m.config.observer == "minmax"
        and not m.observer.weight
    ]
    assert points and all(p.config.bit_type.name == "uint6" for p in points)


def test_training_uses_label_smoothing_and_configured_optimizer_and_scheduler():
    module = _module(
        label_smoothing=0.2,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1),
    )
    config = module.configure_optimizers()
    assert (
        isinstance(config["optimizer"], torch.optim.SGD)
        and config["optimizer"].param_groups[0]["lr"] == 0.5
    )
    assert isinstance(config["lr_scheduler"], torch.optim.lr_scheduler.StepLR)
    data = RandomImages()
    module.train()
    x, y = data.x[:8], data.y[:8]
    with torch.no_grad():
        expected = F.cross_entropy(module(x), y, label_smoothing=0.2)
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    torch.testing.assert_close(module.training_step((x, y), 0).detach(), expected)


def test_default_optimizer_is_adamw():
    assert isinstance(_module().configure_optimizers(), torch.optim.AdamW)


def test_unknown_model_or_method_fails_at_construction():
    with pytest.raises(ValueError, match="unknown model"):
        _module(model_name="resnet50")
    with pytest.raises(ValueError, match="unknown method"):
        _module(method="kl")


@pytest.mark.parametrize("ln_eps", [0.0, 1e-6])
def test_nan_in_quantized_logits_is_an_error_naming_the_layer(ln_eps):
    module, data = _module(ln_eps=ln_eps), RandomImages()
    with torch.no_grad():  # every token the zero vector: the integer LayerNorm divides by 0
        for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
            module.net.get_parameter(name).zero_()
    trainer = _trainer(callbacks=[QuantCalibration()])
    if ln_eps:
        results = trainer.validate(module, datamodule=data)[0]
        assert math.isfinite(results["val/loss"])  # with the opt-in epsilon: finite logits
        assert module.describe()["ln_eps"] == ln_eps  # the results row says it is not as published
    else:
        with pytest.raises(NonFiniteOutputError, match=r"'blocks\.0\.norm1'.*--model\.ln_eps"):
            trainer.validate(module, datamodule=data)


def test_a_lightning_checkpoint_keeps_its_calibration_configuration(tmp_path):
    path = tmp_path / "minmax.ckpt"
    _trainer(callbacks=[QuantCalibration(save_path=str(path))]).validate(
        _module(method="minmax"), datamodule=RandomImages()
    )
    # Same configuration: loads (weights_only) and is calibrated.
    assert is_calibrated(QuantViTModule.load_from_checkpoint(path, weights_only=True).net)
    # Another method or bit width: refused, naming both configurations.
    for changed, built in (
        ({"method": "omse"}, "uint8/omse"),
        ({"overrides": {"activation": {"bit_type": "uint6"}}}, "uint6/minmax"),
    ):
        with pytest.raises(
            CalibrationConfigError, match=rf"calibrated as uint8/minmax.*built as {built}"
        ):
            QuantViTModule.load_from_checkpoint(path, weights_only=True, **changed)
