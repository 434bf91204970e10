"""Gradual Unrolling's λ schedules and the log-space mixture, against their formulas."""

from __future__ import annotations

import pytest
import torch

from data_owner_client.schedule import SCHEDULES, gu_lambda, gu_lambdas, mix_log_probs


@pytest.mark.parametrize("horizon", [1.0, 4.0, 7.5, 20.0])
def test_quadratic_is_the_papers_schedule(horizon):
    lam_max = 0.9
    assert gu_lambda(0, horizon, lam_max) == lam_max  # λ_0 = λ_max
    for t in range(1, 40):
        expected = (lam_max * (1 - t / horizon)) ** 2 if t < horizon else 0.0
        assert gu_lambda(t, horizon, lam_max) == pytest.approx(expected, abs=1e-12)


def test_linear_and_constant_schedules():
    for t in range(0, 12):
        assert gu_lambda(t, 8, 0.6, schedule="linear") == pytest.approx(max(0.6 * (1 - t / 8), 0))
        assert gu_lambda(t, 8, 0.6, schedule="constant") == 0.6


@pytest.mark.parametrize("schedule", ["quadratic", "linear"])
def test_lambda_decreases_to_its_floor_and_stays_there(schedule):
    values = [gu_lambda(t, 10, 0.9, lambda_min=0.1, schedule=schedule) for t in range(30)]
    assert values[0] == 0.9
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert min(values) == 0.1 and values[-1] == 0.1


def test_a_zero_horizon_unrolls_after_the_first_token():
    assert gu_lambda(0, 0, 0.9) == 0.9
    assert gu_lambda(1, 0, 0.9) == 0.0


def test_lambda_max_zero_is_zero_everywhere():
    assert all(gu_lambda(t, 5, 0.0, schedule=s) == 0 for t in range(8) for s in SCHEDULES)


def test_vectorised_lambdas_equal_the_scalar_ones():
    horizons = torch.tensor([1.0, 3.0, 6.5, 12.0])
    for step in range(10):
        got = gu_lambdas(step, horizons, 0.8, 0.05, "quadratic")
        want = [gu_lambda(step, float(h), 0.8, 0.05, "quadratic") for h in horizons]
        assert got.tolist() == pytest.approx(want)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lambda_max": 1.2},
        {"lambda_max": 0.5, "lambda_min": 0.6},
        {"lambda_max": 0.5, "lambda_min": -0.1},
        {"lambda_max": 0.5, "schedule": "cubic"},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="lambda|schedule"):
        gu_lambda(1, 5, **kwargs)


def _log_probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator).mul(3).log_softmax(-1)


def test_mixing_is_the_weighted_mixture_of_probabilities():
    lp_lm, lp_pema = _log_probs(4, 50, 0), _log_probs(4, 50, 1)
    lam = torch.tensor([0.0, 0.25, 0.9, 1.0])
    mixed = mix_log_probs(lp_lm, lp_pema, lam)
    expected = (1 - lam[:, None]) * lp_lm.exp() + lam[:, None] * lp_pema.exp()
    torch.testing.assert_close(mixed.exp(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(4), rtol=0, atol=1e-5)


def test_mixing_is_exact_at_the_ends():
    lp_lm, lp_pema = _log_probs(3, 20, 2), _log_probs(3, 20, 3)
    assert torch.equal(mix_log_probs(lp_lm, lp_pema, torch.zeros(3)), lp_lm)
    assert torch.equal(mix_log_probs(lp_lm, lp_pema, torch.ones(3)), lp_pema)
