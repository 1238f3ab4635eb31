"""The pure formulas of the report: SQNR, cosine, clipping, channel ranges, LIS levels."""

import math

import numpy as np
import pytest
import torch

from fqvit_pl.analysis import (
    ErrorStats,
    channel_min_max,
    clipped_counts,
    cosine_similarity,
    lis_flush_threshold,
    lis_levels,
    sqnr_db,
    uniform_levels,
)


def test_sqnr_of_a_known_perturbation_is_ten_log10_of_the_power_ratio():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50)).astype(np.float32)
    delta = (0.01 * rng.normal(size=(3, 50))).astype(np.float32)
    stats = ErrorStats()
    stats.update(torch.from_numpy(x[:2]), torch.from_numpy(x[:2] + delta[:2]))
    stats.update(torch.from_numpy(x[2:]), torch.from_numpy(x[2:] + delta[2:]))  # sums over updates
    y = (x + delta).astype(np.float64)
    x64 = x.astype(np.float64)
    expected = 10 * np.log10(np.sum(x64**2) / np.sum((x64 - y) ** 2))
    assert stats.sqnr_db == pytest.approx(expected, rel=1e-12)
    cos = np.sum(x64 * y) / np.sqrt(np.sum(x64**2) * np.sum(y**2))
    assert stats.cosine == pytest.approx(cos, rel=1e-12)
    assert stats.mse == pytest.approx(np.mean((x64 - y) ** 2), rel=1e-12)


def test_sqnr_without_error_is_infinite_and_none_in_the_summary():
    x = torch.randn(10)
    stats = ErrorStats()
    stats.update(x, x.clone())
    assert stats.sqnr_db == math.inf
    assert stats.summary() == {"sqnr_db": None, "cosine": pytest.approx(1.0), "mse": 0.0}
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert cosine_similarity(1.0, 0.0, 1.0) is None


def test_error_stats_refuse_tensors_of_different_shapes():
    with pytest.raises(ValueError, match="shapes"):
        ErrorStats().update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_channel_ranges_follow_the_layout_rules():
    x = torch.arange(24.0).reshape(2, 3, 4)  # activation: channel = last dim
    low, high = channel_min_max(x)
    assert low.tolist() == [0.0, 1.0, 2.0, 3.0] and high.tolist() == [20.0, 21.0, 22.0, 23.0]
    low, high = channel_min_max(x.reshape(2, 3, 2, 2))  # NCHW: channel = dim 1
    assert low.tolist() == [0.0, 4.0, 8.0] and high.tolist() == [15.0, 19.0, 23.0]
    low, high = channel_min_max(x.reshape(4, 6), weight=True)  # weight: channel = dim 0
    assert low.tolist() == [0.0, 6.0, 12.0, 18.0]


def test_clipped_counts_count_codes_outside_the_grid():
    # scale 1, zero point 10, uint8: codes x + 10; outside [0, 255] below -10.5 and above 245.5
    x = torch.tensor([[-11.0, -10.5, -10.4, 0.0], [245.4, 245.5, 245.6, 300.0]])
    counts = clipped_counts(x.t(), torch.tensor(1.0), torch.tensor(10.0), 0, 255)
    # round half to even: -10.5 + 10 = -0.5 -> -0 (kept); 245.5 + 10 = 255.5 -> 256 (clipped);
    # clipped: -11, 245.5, 245.6, 300 (per tensor: one count over all values)
    assert counts.tolist() == [4]
    per_channel = clipped_counts(x.t(), torch.ones(2), torch.full((2,), 10.0), 0, 255)
    assert per_channel.tolist() == [1, 3]  # channels = last dim: the two rows of x
    per_channel = clipped_counts(
        x, torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([10.0, 10.0, 10.0, 10.0]), 0, 255
    )
    # channel 1 at scale 2: codes -10.5/2 + 10 = 4.75 and 245.5/2 + 10 = 132.75: kept
    assert per_channel.tolist() == [1, 0, 1, 1]


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("spread", [0.5, 1.0, 1.6])  # inside the grid, at its edge, beyond it
def test_clipped_counts_from_known_bounds_equal_the_pass_over_every_value(
    weight, per_channel, spread
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 8, generator=g) if not weight else torch.randn(8, 5, 6, generator=g)
    channels = 8
    scale = torch.full((channels,), 0.02) if per_channel else torch.tensor(0.02)
    zero_point = torch.full((channels,), 128.0) if per_channel else torch.tensor(128.0)
    # values exactly at the rounding edge of the first and last code (-128.5 s, 127.5 s) and beyond
    x = x / x.abs().max() * (127.5 * 0.02) * spread
    low, high = channel_min_max(x, weight=weight)
    if not per_channel:
        low, high = low.min().reshape(1), high.max().reshape(1)
    full = clipped_counts(x, scale, zero_point, 0, 255, weight=weight)
    fast = clipped_counts(x, scale, zero_point, 0, 255, weight=weight, bounds=(low, high))
    assert torch.equal(fast, full)
    if spread != 1.0:  # at the edge itself, rounding half to even decides
        assert (full.sum() > 0) == (spread > 1.0)


def test_lis_levels_and_flush_threshold_follow_section_8():
    assert lis_levels(4) == [2.0**-r for r in range(16)]
    threshold = lis_flush_threshold(4)
    # r = floor(log2 y), +1 when y >= 1.5 * 2**floor(log2 y): r >= 16 exactly from y = 1.5 * 2**15
    assert threshold == 1 / (1.5 * 2**15)
    assert uniform_levels(4) == pytest.approx([k / 15 for k in range(16)])


def test_error_stats_leave_float64_inputs_untouched():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([1.5, 2.0], dtype=torch.float64)
    ErrorStats().update(x, y)
    assert x.tolist() == [1.0, 2.0] and y.tolist() == [1.5, 2.0]


def test_the_analysis_imports_neither_lightning_nor_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys, fqvit_pl.analysis; "
        "print([m for m in ('pytorch_lightning', 'lightning', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
