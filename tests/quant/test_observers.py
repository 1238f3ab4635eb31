"""Observers (§3, §5) on hand-made tensors, against independent transcriptions of the contract."""

import numpy as np
import pytest
import torch

from fqvit_pl.quant import (
    EmaObserver,
    LocalReducer,
    MinMaxObserver,
    OmseObserver,
    PercentileObserver,
    PtfObserver,
    StatReducer,
    build_observer,
    get_bit_type,
    use_reducer,
)

UINT8, INT8 = get_bit_type("uint8"), get_bit_type("int8")
EPS = float(np.finfo(np.float32).eps)


def _asym(lo: float, hi: float) -> tuple:
    s = max((hi - lo) / 255, EPS)
    return s, min(max(0 - round(lo / s), 0), 255)


def test_minmax_per_channel_and_per_tensor():
    a = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])  # [B=1, N=2, C=2]
    b = torch.tensor([[[-1.0, 4.0], [0.0, 0.0]]])
    per_channel, per_tensor = MinMaxObserver(UINT8, 2, True), MinMaxObserver(UINT8, 2, False)
    for obs in (per_channel, per_tensor):
        obs.update(a)
        obs.update(b)
    assert per_channel.min_val.tolist() == [-1.0, -2.0] and per_channel.max_val.tolist() == [
        3.0,
        4.0,
    ]
    assert per_tensor.min_val.item() == -2.0 and per_tensor.max_val.item() == 4.0
    scale, zp = per_tensor.compute_qparams(b)
    assert scale.item() == pytest.approx(6 / 255) and zp.item() == round(2 / (6 / 255))


def test_weight_minmax_is_symmetric_per_output_channel():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.1]])
    obs = MinMaxObserver(INT8, 2, True, weight=True)
    obs.update(w)
    scale, zp = obs.compute_qparams(w)
    assert scale.tolist() == pytest.approx([1.0 / 127.5, 2.0 / 127.5])
    assert zp.tolist() == [0.0, 0.0]


def test_constant_and_all_negative_tensors():
    obs = MinMaxObserver(UINT8, 3, False)
    obs.update(torch.full((2, 3), 0.25))
    scale, zp = obs.compute_qparams(None)
    assert scale.item() == EPS and zp.item() == 0
    neg = MinMaxObserver(UINT8, 3, False)
    neg.update(torch.tensor([[-3.0, -2.0, -1.5]]))
    scale, zp = neg.compute_qparams(None)
    # Asymmetric rule as published: the zero point clamps to 255 for an all-negative range.
    assert scale.item() == pytest.approx(1.5 / 255) and zp.item() == 255


def test_ema_moves_one_percent_per_batch():
    obs = EmaObserver(UINT8, 2, False)
    batches = [torch.tensor([[0.0, 1.0]]), torch.tensor([[-2.0, 3.0]]), torch.tensor([[-1.0, 0.5]])]
    lo, hi = 0.0, 1.0
    for i, batch in enumerate(batches):
        obs.update(batch)
        if i:
            lo, hi = lo + 0.01 * (batch.min().item() - lo), hi + 0.01 * (batch.max().item() - hi)
    assert obs.min_val.item() == pytest.approx(lo) and obs.max_val.item() == pytest.approx(hi)


def test_ema_per_channel():
    obs = EmaObserver(UINT8, 2, True)
    obs.update(torch.tensor([[0.0, 1.0], [2.0, -1.0]]))
    obs.update(torch.tensor([[10.0, 1.0], [2.0, -5.0]]))
    assert obs.max_val.tolist() == pytest.approx([2 + 0.01 * 8, 1.0])
    assert obs.min_val.tolist() == pytest.approx([0 + 0.01 * 2, -1 + 0.01 * -4])


def test_percentile_uses_batch_quantiles_then_ema():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 50, 8, generator=gen) for _ in range(3)]
    obs = PercentileObserver(UINT8, 8, False)
    hi = lo = None
    for batch in batches:
        obs.update(batch)
        b_hi, b_lo = (
            torch.quantile(batch.reshape(-1), 0.99999).item(),
            torch.quantile(batch.reshape(-1), 0.00001).item(),
        )
        hi = b_hi if hi is None else hi + 0.01 * (b_hi - hi)
        lo = b_lo if lo is None else lo + 0.01 * (b_lo - lo)
    assert obs.max_val.item() == pytest.approx(
        hi, rel=1e-6
    ) and obs.min_val.item() == pytest.approx(lo, rel=1e-6)


def test_percentile_beyond_torch_quantile_limit():
    n = 2**24 + 4099
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    obs = PercentileObserver(UINT8, 1, False)
    obs.update(x.reshape(-1, 1))
    values = np.sort(x.numpy().astype(np.float64))
    for q, got in ((0.99999, obs.max_val.item()), (0.00001, obs.min_val.item())):
        rank = float(np.float32(q)) * (n - 1)
        lower = int(np.floor(rank))
        expected = values[lower] + (rank - lower) * (values[lower + 1] - values[lower])
        assert got == pytest.approx(expected, abs=1e-5)


def _omse_transcription(last: np.ndarray, lo: float, hi: float) -> tuple:
    best, best_err = None, None
    for i in range(90):
        s, z = _asym(
            np.float32(lo * np.float32(1 - 0.01 * i)), np.float32(hi * np.float32(1 - 0.01 * i))
        )
        err = np.mean(((np.clip(np.round(last / s + z), 0, 255) - z) * s - last) ** 2)
        if best_err is None or err < best_err:
            best, best_err = (s, z), err
    return best


def test_omse_searches_on_the_last_batch():
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(2, 30, 4, generator=gen) * 5  # wide range
    last = torch.randn(2, 30, 4, generator=gen)
    last[0, 0, 0] = 3.0  # a lone outlier: clipping it pays off
    obs = OmseObserver(UINT8, 4, False)
    obs.update(first)
    obs.update(last)
    scale, zp = obs.compute_qparams(last)
    lo, hi = min(first.min(), last.min()).item(), max(first.max(), last.max()).item()
    s, z = _omse_transcription(last.double().numpy(), lo, hi)
    assert scale.item() == pytest.approx(s, rel=1e-5) and zp.item() == z
    assert scale.item() < (hi - lo) / 255  # some clipping was chosen


def test_omse_tie_keeps_the_first_candidate():
    obs = OmseObserver(UINT8, 1, False)
    constant = torch.full((10, 1), 2.0)  # every candidate has scale eps and the same error
    obs.update(constant)
    scale, zp = obs.compute_qparams(constant)
    assert scale.item() == EPS and zp.item() == 0


def test_ptf_factors_by_hand():
    # s8 = (255/32 - 0) / 255 = 1/32 exactly, so every grid below is exact in binary. Four channels:
    # zero; small multiples of s8 (every candidate exact: the tie goes to s1); the maximum, which
    # only s8 reaches; values past s1's range that s2 = s8/4 represents exactly.
    s8 = 1 / 32
    chans = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [s8, 2 * s8, 0.0, s8],
            [255 * s8, 0.0, 100 * s8, 0.0],
            [40.25 * s8, 40 * s8, 0.0, 0.25 * s8],
        ]
    )
    x = chans.t().unsqueeze(0)  # [1, N=4, C=4]
    obs = PtfObserver(UINT8, 4)
    obs.update(x)
    scale, zp = obs.compute_qparams(x)
    assert obs.alpha.tolist() == [0, 0, 3, 1]
    assert zp.tolist() == [0.0] * 4
    assert scale.tolist() == [s8 / 8, s8 / 8, s8, s8 / 4]


def _ptf_transcription(last: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list:
    s8 = max((hi.max() - lo.min()) / 255, EPS)
    z = min(max(-round(lo.min() / s8), 0), 255)
    alphas = []
    for c in range(last.shape[-1]):
        v = last[..., c].reshape(-1)
        errs = [
            np.mean(((np.clip(np.round(v / s + z), 0, 255) - z) * s - v) ** 2)
            for s in (s8 / 8, s8 / 4, s8 / 2, s8)
        ]
        alphas.append(int(np.argmin(errs)))
    return alphas


def test_ptf_search_uses_only_the_last_batch():
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.1, 0.5, 1.0, 4.0, 8.0, 0.2])
    first = torch.randn(3, 20, 6, generator=gen) * spread
    last = torch.randn(3, 20, 6, generator=gen) * spread
    obs = PtfObserver(UINT8, 6)
    obs.update(first)
    obs.update(last)
    obs.compute_qparams(last)
    lo = torch.minimum(first.amin((0, 1)), last.amin((0, 1))).double().numpy()
    hi = torch.maximum(first.amax((0, 1)), last.amax((0, 1))).double().numpy()
    assert obs.alpha.tolist() == _ptf_transcription(last.double().numpy(), lo, hi)
    assert len(set(obs.alpha.tolist())) > 1


def test_merge_rules_are_declared():
    assert MinMaxObserver.BATCH_MERGE == {"min": "min", "max": "max"}
    assert EmaObserver.BATCH_MERGE == {"min": "min", "max": "max"}
    assert PercentileObserver.BATCH_MERGE == {
        "upper_tail": "cat",
        "lower_tail": "cat",
        "numel": "max",
    }
    assert OmseObserver.SEARCH_MERGE == {"errors": "sum"} and PtfObserver.SEARCH_MERGE == {
        "errors": "sum"
    }


def test_bad_inputs_name_the_observer():
    obs = MinMaxObserver(UINT8, 4, True)
    obs.name = "blocks.0.norm_in"
    with pytest.raises(ValueError, match=r"blocks\.0\.norm_in: observed NaN or Inf"):
        obs.update(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(
        ValueError, match=r"blocks\.0\.norm_in: cannot lay out an activation of rank 5"
    ):
        obs.update(torch.zeros(1, 1, 1, 1, 4))
    with pytest.raises(ValueError, match="expected 4 channels, got 3"):
        obs.update(torch.zeros(2, 3))
    assert obs.num_batches.item() == 0 and torch.isinf(obs.min_val).all()  # nothing was folded in
    with pytest.raises(RuntimeError, match="before observing"):
        obs.compute_qparams(torch.zeros(1, 4))


class CopiesReducer(StatReducer):
    """``world`` processes that all hold this process's data: what a replicated input is under DDP."""

    def __init__(self, world: int) -> None:
        self.world = world

    @property
    def distributed(self) -> bool:
        return True

    def reduce(self, value: torch.Tensor, rule: str) -> torch.Tensor:
        if rule == "cat":
            return value.reshape(-1).repeat(self.world)
        if rule == "sum":
            return value * self.world
        return value  # min, max


def _observe(kind: str, batches: list, reducer: StatReducer, replicated: bool) -> tuple:
    per_channel = kind == "ptf"
    obs = build_observer(kind, UINT8, 8, per_channel, replicated=replicated)
    with use_reducer(reducer):
        for batch in batches:
            obs.update(batch)
        return obs.compute_qparams(batches[-1])


@pytest.mark.parametrize("kind", ["minmax", "ema", "percentile", "omse", "ptf"])
def test_replicated_input_is_not_merged_across_processes(kind):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 50, 8, generator=gen) for _ in range(2)]  # e.g. a position embedding
    single = _observe(kind, batches, LocalReducer(), replicated=False)
    replicated = _observe(kind, batches, CopiesReducer(3), replicated=True)
    assert all(torch.equal(a, b) for a, b in zip(single, replicated))


def test_percentile_of_copies_is_not_the_single_process_quantile():
    # Why the declaration matters: merged as data, 3 copies of 400 values have another 0.99999
    # quantile (the maximum itself) than the 400 values (interpolated below the maximum).
    batch = torch.arange(400.0).reshape(1, 50, 8)
    single = _observe("percentile", [batch], LocalReducer(), replicated=False)
    merged = _observe("percentile", [batch], CopiesReducer(3), replicated=False)
    assert merged[0] > single[0]
