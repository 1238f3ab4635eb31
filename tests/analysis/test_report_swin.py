"""quant_report on a reduced Swin: patch merging's tiled PTF factors, its layers, brute-force sensitivity."""

import pytest
import torch
from brute_force import logits_with

from fqvit_pl.analysis import quant_report
from fqvit_pl.analysis.metrics import ErrorStats
from fqvit_pl.models import create_model
from fqvit_pl.quant import calibrate, enable_quantization

SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    model = create_model("swin_tiny", num_classes=4, model_kwargs=SWIN)
    g = torch.Generator().manual_seed(0)
    calibrate(model, [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)])
    images = torch.randn(3, 3, 32, 32, generator=g)
    return model, images, quant_report(model, [images])


def test_patch_merging_tiles_the_ptf_factors_of_its_input_point(swin):
    model, _, report = swin
    entry = report["layernorm_inputs"]["layers.1.downsample.norm"]
    in_point = model.get_submodule(entry["input_point"])
    alpha = in_point.observer.alpha.tolist()
    assert len(entry["channel_min"]) == 4 * len(alpha) == 64
    assert entry["ptf_alpha"] == alpha * 4
    assert report["layernorm_inputs"]["patch_embed.norm"]["ptf_alpha"] is None  # per-tensor input


def test_swin_layers_and_their_sensitivity_equal_brute_force(swin):
    model, images, report = swin
    rows = {row["layer"]: row for row in report["sensitivity"]}
    assert set(rows) == {
        "embed",
        "layers.0.blocks.0",
        "layers.0.blocks.1",
        "layers.1.downsample",
        "layers.1.blocks.0",
        "layers.1.blocks.1",
        "head",
    }

    def run(quantized):
        return logits_with(model, images, quantized)

    try:
        reference = run(lambda n: False)
        for layer in ("layers.1.downsample", "layers.1.blocks.1"):
            members = set(rows[layer]["modules"])
            for key, quantized in (
                ("only", lambda n: n in members),
                ("all_but", lambda n: n not in members),
            ):
                stats = ErrorStats()
                stats.update(reference, run(quantized))
                assert rows[layer][key]["logits_sqnr_db"] == pytest.approx(stats.sqnr_db, rel=1e-9)
    finally:
        enable_quantization(model)
    assert report["points"]["layers.0.blocks.0.attn.softmax"]["input_point"] == (
        "layers.0.blocks.0.attn.bias_quant"
    )
