"""The report's figures from hand-made report dicts: they draw for any number of layers."""

import numpy as np

from fqvit_pl.analysis.figures import (
    _layer_spans,
    _power_of_ten,
    plot_layernorm_ranges,
    plot_sqnr,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_layer_spans_are_the_runs_of_equal_layers():
    layers = ["embed", "embed", "blocks.0", "blocks.0", "blocks.0", "head"]
    assert _layer_spans(layers) == [("embed", 0, 1), ("blocks.0", 2, 4), ("head", 5, 5)]
    assert _layer_spans([]) == []


def _norm_entry(channels: int, seed: int, ptf: bool) -> dict:
    rng = np.random.default_rng(seed)
    width = rng.uniform(0.5, 8.0, channels)
    return {
        "input_point": None,
        "integer": ptf,
        "channel_min": (-width).tolist(),
        "channel_max": (width * 0.8).tolist(),
        "ptf_alpha": rng.integers(0, 4, channels).tolist() if ptf else None,
    }


def test_layernorm_figure_of_many_layers_of_different_widths(tmp_path):
    # a Swin-like report: 30 LayerNorms of 16 to 64 channels, PTF on some of them only
    entries = {
        f"layers.{i // 10}.blocks.{i % 10}.norm1": _norm_entry(16 * (1 + i // 10), i, i % 2 == 0)
        for i in range(30)
    }
    path = plot_layernorm_ranges(
        {"layernorm_inputs": entries, "output": {"num_images": 4}}, tmp_path / "ln.png"
    )
    assert path.read_bytes()[:8] == PNG
    assert plot_layernorm_ranges({"layernorm_inputs": {}}, tmp_path / "none.png") is None


def test_sqnr_figure_with_exact_and_unknown_points(tmp_path):
    def point(order: int, layer: str, kind: str, sqnr) -> dict:
        error = {"sqnr_db": sqnr, "mse": 0.0 if sqnr is None else 1.0, "cosine": 1.0}
        return {"order": order, "layer": layer, "kind": kind, "alone": error, "accumulated": error}

    points = {
        "input_quant": point(0, "embed", "activation", None),  # no error: ∞ dB
        "blocks.0.qkv_quant": point(1, "blocks.0", "activation", 30.0),
        "blocks.0.qkv.weight_quant": point(2, "blocks.0", "weight", 45.0),
        "head.logits_quant": point(3, "head", "activation", 12.5),
    }
    path = plot_sqnr({"points": points}, tmp_path / "sqnr.png")
    assert path.read_bytes()[:8] == PNG


def test_power_of_ten_labels_are_plain_text():
    assert _power_of_ten(1e-4) == "10⁻⁴"
    assert _power_of_ten(100.0) == "10²"
    assert _power_of_ten(1.0) == "1"
    assert _power_of_ten(0.3) == "0.3"
    assert _power_of_ten(0.0) == ""
