"""Several processes (DDP on CPU, gloo) give exactly the single-process calibration and metrics."""

import pytest
import pytorch_lightning as pl
import torch

from datamodules import DigitsDataModule
from fqvit_pl.callbacks import QuantCalibration
from fqvit_pl.module import QuantViTModule

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
VAL_IMAGES = 31  # limit=157 leaves 31 validation images: divisible by neither 2 nor 3


def _validate(devices: int, method: str, ckpt: str) -> dict:
    pl.seed_everything(0)
    model = QuantViTModule(model_name="deit_tiny", method=method, num_classes=10, model_kwargs=TINY)
    # Batches of one image: each image's float arithmetic is then the same on every rank.
    data = DigitsDataModule(
        img_size=16, batch_size=1, limit=157, calib_batch_size=6, num_calib_batches=2
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[QuantCalibration(save_path=ckpt, progress_bar=False)],
    )
    return trainer.validate(model, data, verbose=False)[0]


def _quant_state(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {
        k: v
        for k, v in state.items()
        if "_quant." in k or k.endswith("quant_enabled") or k.endswith("calibrated")
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run of a method, computed once per method."""
    runs = {}

    def run(method: str) -> tuple:
        if method not in runs:
            ckpt = tmp_path_factory.mktemp("single") / "calibrated.ckpt"
            runs[method] = _validate(1, method, str(ckpt)), _quant_state(ckpt)
        return runs[method]

    return run


# percentile: its quantiles merge from every rank's tails, and the position embedding's point
# (the same tensor on every rank) must not be merged at all; omse: its search errors are summed.
@pytest.mark.parametrize("devices, method", [(2, "percentile"), (3, "omse")])
def test_processes_reproduce_the_single_process_run(devices, method, single, tmp_path):
    expected_metrics, expected_state = single(method)
    ckpt = tmp_path / "calibrated.ckpt"
    metrics = _validate(devices, method, str(ckpt))
    state = _quant_state(ckpt)
    assert state.keys() == expected_state.keys() and len(state) > 0
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
    assert metrics["val/top1"] == expected_metrics["val/top1"]
    assert metrics["val/top5"] == expected_metrics["val/top5"]
    assert metrics["val/loss"] == pytest.approx(expected_metrics["val/loss"], rel=1e-6)
    # The 31 images are each scored once: top-1 is a multiple of 1/31.
    correct = metrics["val/top1"] * VAL_IMAGES
    assert correct == pytest.approx(round(correct), abs=1e-4)
