"""The model-level API: the §9 protocol, the quantization switch, checkpoints and bad input."""

import pytest
import torch
from torch import nn

from fqvit_pl.quant import (
    CalibrationConfigError,
    QuantAct,
    QuantConfig,
    QuantLayerNorm,
    QuantLinear,
    QuantSoftmax,
    calibrate,
    check_calibration_config,
    disable_quantization,
    enable_quantization,
    is_calibrated,
)
from fqvit_pl.quant.functional import log_int_softmax


class TinyBlock(nn.Module):
    """Linear → LN-input point → (integer) LayerNorm → point → attention-like softmax → point."""

    def __init__(self, cfg: QuantConfig, dim: int = 8) -> None:
        super().__init__()
        self.fc = QuantLinear(dim, dim, config=cfg.point("weight"))
        self.ln_in = QuantAct(dim, cfg.point("ln_input"))
        self.norm = QuantLayerNorm(dim, integer=cfg.ptf)
        self.q_norm = QuantAct(dim, cfg.point("activation"))
        self.q_scores = QuantAct(dim, cfg.point("activation"))
        self.softmax = QuantSoftmax(cfg.point("softmax"), lis=cfg.lis)
        self.q_out = QuantAct(dim, cfg.point("activation"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_in(self.fc(x))
        h = self.q_norm(self.norm(x, self.ln_in, self.q_norm))
        p = self.softmax(self.q_scores(h @ h.transpose(-1, -2)), self.q_scores)
        return self.q_out(p @ h)


def _batches(n: int = 3, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 5, 8, generator=gen) for _ in range(n)]
    batches[0][..., 3] *= 20  # an outlier channel
    return batches


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
@pytest.mark.parametrize("ptf, lis", [(True, True), (False, False)])
def test_state_dict_round_trip_is_bit_exact(method, ptf, lis):
    torch.manual_seed(0)
    cfg = QuantConfig(method, ptf=ptf, lis=lis)
    model = calibrate(TinyBlock(cfg), _batches())
    probe = torch.randn(2, 5, 8)
    fresh = TinyBlock(cfg)
    fresh.load_state_dict(model.state_dict())
    assert is_calibrated(fresh)
    assert torch.equal(fresh(probe), model(probe))


def test_quantization_switch():
    torch.manual_seed(0)
    model = TinyBlock(QuantConfig())
    probe = torch.randn(2, 5, 8)
    float_out = model(probe)
    calibrate(model, _batches())
    quant_out = model(probe)
    assert not torch.equal(quant_out, float_out)
    assert torch.equal(disable_quantization(model)(probe), float_out)
    assert torch.equal(enable_quantization(model)(probe), quant_out)


def test_parameters_come_from_the_last_batch_and_every_batch_is_observed():
    torch.manual_seed(0)
    model = calibrate(TinyBlock(QuantConfig("minmax")), _batches())
    # minmax sees every batch: the outlier channel of batch 0 sets the weight-free LN-input range.
    first_fc_out = (
        model.fc.weight_quant.quantizer
    )  # weights: per-channel symmetric minmax of the weight
    w = model.fc.weight.detach()
    assert torch.allclose(first_fc_out.scale, w.abs().amax(dim=1) / 127.5)
    assert model.ln_in.observer.num_batches.item() == 3


def test_lis_runs_on_the_last_calibration_batch_as_published():
    torch.manual_seed(0)
    cfg = QuantConfig("minmax", ptf=False, lis=True)
    batch = _batches(1)
    model = calibrate(TinyBlock(cfg), batch)
    # With one batch, q_out observed p @ h where p is already Log-Int-Softmax (§9).
    with torch.no_grad():
        disable_quantization(model)
        x = model.ln_in(model.fc(batch[0]))
        h = model.q_norm(model.norm(x))
        scores = h @ h.transpose(-1, -2)
    enable_quantization(model)
    # Replay the pass as calibration saw it: points before the softmax were still float.
    scale = model.q_scores.scale
    expected_max = (log_int_softmax(scores, scale, cfg.point("softmax").bit_type) @ h).max()
    float_max = (scores.softmax(-1) @ h).max()
    assert model.q_out.observer.max_val.item() == pytest.approx(expected_max.item(), rel=1e-6)
    assert expected_max.item() != pytest.approx(float_max.item(), rel=1e-6)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_batches_is_an_error_and_changes_nothing():
    model = calibrate(TinyBlock(QuantConfig()), _batches())
    before = _state(model)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(model, [])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert is_calibrated(model) and model.ln_in._quantize


def test_nan_is_an_error_naming_the_layer_and_keeps_the_old_calibration():
    model = calibrate(TinyBlock(QuantConfig()), _batches())
    model.train()
    before = _state(model)
    bad = _batches(seed=1)
    bad[2][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="ln_in: observed NaN or Inf"):
        calibrate(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.q_out._quantize and not model.q_out._observing


def test_quantizing_before_calibration_names_the_layer():
    model = TinyBlock(QuantConfig())
    with pytest.raises(RuntimeError, match=r"fc\.weight_quant: cannot quantize before calibration"):
        enable_quantization(model)
    assert not model.q_out._quantize


def test_wrong_rank_names_the_layer():
    model = TinyBlock(QuantConfig())
    with pytest.raises(ValueError, match="cannot lay out"):
        calibrate(model, [torch.randn(1, 1, 1, 2, 8)])
    assert not is_calibrated(model)


def test_a_model_without_quant_layers_is_rejected():
    with pytest.raises(ValueError, match="contains no fqvit_pl.quant layers"):
        calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])


def test_generator_batches_and_custom_forward():
    model = TinyBlock(QuantConfig("ema"))
    seen = []

    def forward(m, batch):
        seen.append(batch["x"].shape)
        return m(batch["x"])

    calibrate(model, ({"x": b} for b in _batches()), forward=forward)
    assert len(seen) == 3 and is_calibrated(model)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.zeros(0, 5, 8), ValueError, r"calibration batch 1 is empty \(shape \(0, 5, 8\)\)"),
        (torch.zeros(2, 5, 8, dtype=torch.uint8), TypeError, "batch 1 is a torch.uint8 tensor"),
        (torch.zeros(2, 5, 8, dtype=torch.float64), TypeError, r"\.to\(torch.float32\)"),
    ],
)
def test_empty_or_wrongly_typed_batches_are_named_and_change_nothing(bad, error, message):
    model = calibrate(TinyBlock(QuantConfig()), _batches())
    before = _state(model)
    batches = _batches(seed=1)
    batches[1] = bad
    with pytest.raises(error, match=message):
        calibrate(model, batches)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_calibration_of_another_configuration_does_not_load():
    state = calibrate(TinyBlock(QuantConfig("minmax")), _batches()).state_dict()
    omse = TinyBlock(QuantConfig("omse"))
    # The whole model at once, before loading (what guard_calibration_config installs) ...
    with pytest.raises(CalibrationConfigError, match=r"3 point\(s\) differ, first 'q_norm'"):
        check_calibration_config(omse, state)
    # ... and each point by itself in any network, naming the point and both configurations.
    with pytest.raises(
        CalibrationConfigError,
        match=r"q_norm: .* made with uint8/minmax/tensor/uniform, .* built with uint8/omse/tensor/uniform",
    ):
        omse.load_state_dict(state)
    # Uncalibrated, the same state is only initial statistics: any configuration takes it.
    TinyBlock(QuantConfig("omse")).load_state_dict(TinyBlock(QuantConfig("minmax")).state_dict())
