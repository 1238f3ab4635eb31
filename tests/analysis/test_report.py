"""quant_report on small networks whose numbers are known or computed independently (NumPy, §4, §5).

- ``LNNet``: a PTF LayerNorm input with injected outlier channels. Ranges, PTF factors, scales and
  clipping rates are recomputed with NumPy from the contract (docs/method.md §4, §5).
- ``PointNet``: one uint8 point whose scale is a power of two, so its error is known by hand.
- A reduced DeiT: the sensitivity ranking equals brute force, and the network is left as found.
"""

import json
import math

import numpy as np
import pytest
import torch
from brute_force import logits_with
from torch import nn

from fqvit_pl.analysis import quant_report
from fqvit_pl.analysis.metrics import ErrorStats
from fqvit_pl.models import create_model
from fqvit_pl.quant import (
    QuantAct,
    QuantConfig,
    QuantLayerNorm,
    QuantLinear,
    calibrate,
    disable_quantization,
    enable_quantization,
    quant_modules,
)

EPS = np.float32(np.finfo(np.float32).eps)
CHANNELS, TOKENS, CLASSES = 16, 6, 4
OUTLIERS = [3, 11]


class LNNet(nn.Module):
    """PTF point → integer LayerNorm → point → mean over tokens → Linear → logits point."""

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__()
        self.ln_in = QuantAct(CHANNELS, cfg.point("ln_input"))
        self.norm = QuantLayerNorm(CHANNELS, integer=cfg.ptf)
        self.norm_quant = QuantAct(CHANNELS, cfg.point("activation"))
        self.head = QuantLinear(CHANNELS, CLASSES, config=cfg.point("weight"))
        self.logits_quant = QuantAct(CLASSES, cfg.point("activation"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_in(x)
        h = self.norm_quant(self.norm(x, self.ln_in, self.norm_quant))
        return self.logits_quant(self.head(h.mean(dim=1)))


def _channel_data(seed: int, batches: int, spread: float) -> list[torch.Tensor]:
    """``[8, TOKENS, CHANNELS]`` batches: channels of std 1 (offset c/4), outlier channels 25x wider."""
    g = torch.Generator().manual_seed(seed)
    std = torch.ones(CHANNELS)
    std[OUTLIERS] = 25.0
    offset = torch.arange(CHANNELS) / 4
    return [
        spread * (torch.randn(8, TOKENS, CHANNELS, generator=g) * std + offset)
        for _ in range(batches)
    ]


def _ptf_reference(calibration: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """§5 ptf in NumPy: per-channel running range, shared zero point, alpha from the last batch."""
    flat = [b.reshape(-1, CHANNELS) for b in calibration]
    low = np.min([f.min(axis=0) for f in flat], axis=0)
    high = np.max([f.max(axis=0) for f in flat], axis=0)
    min_t, max_t = np.float32(low.min()), np.float32(high.max())
    s8 = np.maximum((max_t - min_t) / np.float32(255), EPS)
    scales = [s8 / np.float32(8), s8 / np.float32(4), s8 / np.float32(2), s8]
    zero_point = np.float32(np.clip(0 - np.round(min_t / s8), 0, 255))
    last = flat[-1]
    errors = np.empty((CHANNELS, 4))
    for i, s in enumerate(scales):
        q = np.clip(np.round(last / s + zero_point), 0, 255)
        errors[:, i] = np.mean((last.astype(np.float64) - (q - zero_point) * s) ** 2, axis=0)
    alpha = np.argmin(errors, axis=1)
    return alpha, np.array([scales[a] for a in alpha], dtype=np.float32), zero_point


@pytest.fixture(scope="module")
def ln_report():
    torch.manual_seed(0)
    model = LNNet(QuantConfig("minmax", ptf=True, lis=True)).eval()
    calibration = _channel_data(seed=1, batches=3, spread=1.0)
    calibrate(model, calibration)
    shown = _channel_data(seed=2, batches=2, spread=1.5)  # wider than calibrated: some values clip
    return model, calibration, shown, quant_report(model, shown)


def test_layernorm_input_ranges_are_the_per_channel_extremes_of_the_images(ln_report):
    _, _, shown, report = ln_report
    x = np.concatenate([b.numpy().reshape(-1, CHANNELS) for b in shown])
    entry = report["layernorm_inputs"]["norm"]
    assert entry["input_point"] == "ln_in"
    assert entry["channel_min"] == x.min(axis=0).tolist()
    assert entry["channel_max"] == x.max(axis=0).tolist()
    point = report["points"]["ln_in"]
    assert point["kind"] == "ln_input"
    assert point["observed_range"] == [x.min(axis=0).tolist(), x.max(axis=0).tolist()]


def test_ptf_factors_scales_and_zero_point_follow_section_5(ln_report):
    _, calibration, _, report = ln_report
    alpha, scales, zero_point = _ptf_reference([b.numpy() for b in calibration])
    # The injected outlier channels need the widest scale s8, the others the finest s1.
    assert alpha[OUTLIERS].tolist() == [3, 3]
    assert set(np.delete(alpha, OUTLIERS).tolist()) == {0}
    point = report["points"]["ln_in"]
    assert point["ptf_alpha"] == alpha.tolist()
    assert report["layernorm_inputs"]["norm"]["ptf_alpha"] == alpha.tolist()
    assert point["scale"] == scales.tolist()
    assert point["zero_point"] == [float(zero_point)] * CHANNELS
    lo, hi = point["representable_range"]
    assert hi == ((255 - zero_point) * scales).tolist()
    assert lo == ((0 - zero_point) * scales).tolist()


def test_clipping_rates_count_the_codes_outside_0_255(ln_report):
    _, calibration, shown, report = ln_report
    _, scales, zero_point = _ptf_reference([b.numpy() for b in calibration])
    x = np.concatenate([b.numpy().reshape(-1, CHANNELS) for b in shown])
    codes = np.round(x / scales + zero_point)
    clipped = (codes < 0) | (codes > 255)
    point = report["points"]["ln_in"]
    assert clipped.sum() > 0  # the images are 1.5x wider than the calibration
    assert point["clipping_rate"] == pytest.approx(clipped.mean(), rel=1e-12)
    assert point["clipping_rate_per_channel"] == pytest.approx(clipped.mean(axis=0).tolist())


class PointNet(nn.Module):
    """One uint8 minmax point on ``[B, 8]`` features, which are also the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.point = QuantAct(8, QuantConfig("minmax", ptf=False, lis=False).point("activation"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point(x)


def _point_net(high: float) -> PointNet:
    """Calibrated on the range [0, high]: scale high / 255, zero point 0."""
    model = PointNet().eval()
    x = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) * high
    x[0, 0], x[0, 1] = 0.0, high
    calibrate(model, [x])
    return model


def test_an_identity_point_has_no_error_infinite_sqnr_reported_as_none():
    model = _point_net(255.0)  # scale 1, zero point 0: integers in [0, 255] are on the grid
    assert model.point.scale.item() == 1.0
    x = torch.randint(0, 256, (6, 8), generator=torch.Generator().manual_seed(1)).float()
    report = quant_report(model, [x], sensitivity=False)
    point = report["points"]["point"]
    assert point["alone"]["sqnr_db"] is None and point["alone"]["mse"] == 0.0
    assert point["accumulated"]["sqnr_db"] is None and point["accumulated"]["mse"] == 0.0
    assert point["clipping_rate"] == 0.0
    assert report["output"]["logits_sqnr_db"] is None
    assert report["output"]["fp_agreement"] == 100.0


def test_the_sqnr_of_a_known_rounding_error_matches_the_formula():
    model = _point_net(255 / 64)  # scale exactly 1/64
    assert model.point.scale.item() == 2.0**-6
    k = torch.arange(0, 240, dtype=torch.float32).reshape(30, 8)
    x = (k + 0.25) / 64  # each value rounds down by exactly 0.25 / 64
    report = quant_report(model, [x], sensitivity=False)
    signal = sum(float(v) ** 2 for v in x.flatten())
    noise = x.numel() * (0.25 / 64) ** 2
    expected = 10 * math.log10(signal / noise)
    assert report["points"]["point"]["alone"]["sqnr_db"] == pytest.approx(expected, rel=1e-12)
    assert report["points"]["point"]["accumulated"]["sqnr_db"] == pytest.approx(expected, rel=1e-12)
    assert report["output"]["logits_sqnr_db"] == pytest.approx(expected, rel=1e-12)


VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_model("deit_tiny", num_classes=5, model_kwargs=VIT)
    g = torch.Generator().manual_seed(0)
    calibrate(model, [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)])
    images = torch.randn(6, 3, 32, 32, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    return model, images, labels


def _flags(model):
    return {m.qname: (m.is_quantizing, bool(m.quant_enabled)) for m in quant_modules(model)}


def test_the_report_leaves_the_model_exactly_as_it_found_it(vit):
    model, images, labels = vit
    model.train()
    model.blocks[1].attn.softmax.set_quantization(False)  # a mixed state must come back as is
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = _flags(model)
    try:
        quant_report(model, [(images, labels)], chunk_size=4)
        after = model.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], state[k]) for k in state)
        assert _flags(model) == flags
        assert model.training
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks
            assert "forward" not in module.__dict__
    finally:
        model.eval()
        enable_quantization(model)


def test_a_failing_forward_still_restores_the_flags(vit):
    model, images, _ = vit
    enable_quantization(model)
    flags = _flags(model)
    calls = []

    def forward(m, x):
        calls.append(1)
        if len(calls) == 3:  # the quantized pass
            raise RuntimeError("boom")
        return m(x)

    with pytest.raises(RuntimeError, match="boom"):
        quant_report(model, [images], forward=forward)
    assert _flags(model) == flags


def test_sensitivity_and_accumulated_errors_equal_brute_force(vit):
    model, images, labels = vit
    report = quant_report(model, [(images, labels)], chunk_size=4)  # two chunks
    modules = {m.qname: m for m in quant_modules(model)}

    def run(quantized):
        return logits_with(model, images, quantized)

    try:
        reference = run(lambda n: False)
        full = run(lambda n: True)
        assert report["output"]["fp_agreement"] == pytest.approx(
            100 * (full.argmax(1) == reference.argmax(1)).float().mean().item()
        )
        assert report["output"]["top1"] == pytest.approx(
            100 * (full.argmax(1) == labels).float().mean().item()
        )
        assert [row["layer"] for row in report["sensitivity"]] != []
        assert {row["layer"] for row in report["sensitivity"]} == {
            "embed",
            "blocks.0",
            "blocks.1",
            "head",
        }
        for row in report["sensitivity"]:
            members = set(row["modules"])
            for key, quantized in (
                ("only", lambda n: n in members),
                ("all_but", lambda n: n not in members),
            ):
                logits = run(quantized)
                stats = ErrorStats()
                stats.update(reference, logits)
                agreement = 100 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()
                assert row[key]["fp_agreement"] == pytest.approx(agreement)
                assert row[key]["logits_sqnr_db"] == pytest.approx(stats.sqnr_db, rel=1e-9)
        ranks = [row["rank"] for row in report["sensitivity"]]
        assert ranks == list(range(1, len(ranks) + 1))
        drops = [row["only_agreement_drop"] for row in report["sensitivity"]]
        assert drops == sorted(drops, reverse=True)

        # accumulated error of one point: its output quantized vs float, by hooks
        outputs = {}
        point = modules["blocks.1.attn.score_quant"]
        hook = point.register_forward_hook(lambda m, a, out: outputs.__setitem__(mode, out))
        mode = "float"
        run(lambda n: False)
        mode = "quant"
        run(lambda n: True)
        hook.remove()
        stats = ErrorStats()
        stats.update(outputs["float"], outputs["quant"])
        entry = report["points"]["blocks.1.attn.score_quant"]
        assert entry["accumulated"]["sqnr_db"] == pytest.approx(stats.sqnr_db, rel=1e-9)
        assert entry["layer"] == "blocks.1"
    finally:
        enable_quantization(model)


def test_point_kinds_of_a_deit(vit):
    model, images, _ = vit
    report = quant_report(model, [images], sensitivity=False)
    kinds = {name: entry["kind"] for name, entry in report["points"].items()}
    assert kinds["blocks.0.attn.qkv.weight_quant"] == "weight"
    assert kinds["blocks.0.res1_quant"] == "ln_input"
    assert kinds["embed_quant"] == "ln_input"
    assert kinds["blocks.0.attn.softmax"] == "softmax_lis"
    assert kinds["blocks.0.norm1"] == "layernorm_integer"
    assert kinds["blocks.0.attn.score_quant"] == "activation"
    assert report["points"]["blocks.0.attn.softmax"]["input_point"] == "blocks.0.attn.score_quant"
    assert report["sensitivity"] == []
    orders = [e["order"] for e in report["points"].values()]
    assert orders == sorted(orders)
    attention = report["attention"]["blocks.0.attn.softmax"]
    counts = attention["histogram"]["counts"]
    assert len(counts) == 2048
    assert (
        sum(counts) + attention["histogram"]["below_range"] + attention["histogram"]["zeros"]
        == attention["num_values"]
        == 6 * 2 * 17 * 17
    )


def test_writing_the_report_gives_json_markdown_and_pngs(vit, tmp_path):
    model, images, labels = vit
    report = quant_report(model, [(images, labels)], tmp_path / "report")
    folder = tmp_path / "report"
    data = json.loads((folder / "report.json").read_text())
    assert data["output"]["num_images"] == 6
    assert set(data["figures"]) == {"layernorm_ranges", "attention", "sqnr", "sensitivity"}
    markdown = (folder / "report.md").read_text()
    for filename in data["figures"].values():
        assert (folder / filename).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({filename})" in markdown
    assert "blocks.1.attn.score_quant" in markdown
    assert report["timing"]["analysis_seconds"] > 0


def test_bad_input_is_refused_with_a_clear_message(vit):
    model, images, _ = vit
    fresh = create_model("deit_tiny", num_classes=5, model_kwargs=VIT)
    with pytest.raises(ValueError, match="not calibrated.*calibrate"):
        quant_report(fresh, [images])
    with pytest.raises(ValueError, match="no images"):
        quant_report(model, [])
    with pytest.raises(TypeError, match="batch 0 is a dict"):
        quant_report(model, [{"image": images}])
    with pytest.raises(ValueError, match="no fqvit_pl.quant layers"):
        quant_report(nn.Linear(2, 2), [torch.zeros(1, 2)])
    disable_quantization(model)
    enable_quantization(model)
