"""Gradual Unrolling: the per-step PEMA weight λ_t and the mixture it weights (docs/design.md,
"Mixing and Gradual Unrolling").

``log P = logsumexp(log(1 − λ) + log P_LM, log λ + log P_PEMA)``. The paper's quadratic schedule
starts at ``λ_0 = λ_max`` and decays as ``λ_t = (λ_max · (1 − t/L))²``, reaching 0 at ``t = L``.
The horizon ``L`` must come from what is known at inference (a learned length ratio × the source
length, or a fixed number), never from the reference.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("quadratic", "linear", "constant")


def gu_lambda(
    step: int,
    horizon: float,
    lambda_max: float,
    lambda_min: float = 0.0,
    schedule: str = "quadratic",
) -> float:
    """λ at generation step ``step`` (0 is the first new token) of a sequence of horizon ``L``."""
    check_settings(lambda_max, lambda_min, schedule)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step == 0 or schedule == "constant":
        return lambda_max
    remaining = max(0.0, 1.0 - step / max(horizon, 1.0))  # an empty horizon is one step long
    value = lambda_max * remaining
    if schedule == "quadratic":
        value *= value
    return max(value, lambda_min)


def gu_lambdas(
    step: int,
    horizons: torch.Tensor,
    lambda_max: float,
    lambda_min: float = 0.0,
    schedule: str = "quadratic",
) -> torch.Tensor:
    """:func:`gu_lambda` for each row's horizon, as a float32 tensor of the horizons' shape."""
    values = [gu_lambda(step, float(h), lambda_max, lambda_min, schedule) for h in horizons]
    return torch.tensor(values, dtype=torch.float32, device=horizons.device).view(horizons.shape)


def mix_log_probs(lp_lm: torch.Tensor, lp_pema: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``log((1 − λ) P_LM + λ P_PEMA)`` from log-probabilities ``[B, V]`` and λ ``[B]``.

    Exact at the ends: λ = 0 returns ``lp_lm`` and λ = 1 returns ``lp_pema`` unchanged.
    """
    lam = lam.to(lp_lm).unsqueeze(-1)
    # log(0) = -inf weights an absent term out exactly: logaddexp(-inf, x) == x.
    return torch.logaddexp(torch.log1p(-lam) + lp_lm, torch.log(lam) + lp_pema)


def check_settings(lambda_max: float, lambda_min: float, schedule: str) -> None:
    """Refuse an unknown schedule or λ bounds outside ``0 <= λ_min <= λ_max <= 1``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not (0.0 <= lambda_min <= lambda_max <= 1.0) or math.isnan(lambda_max):
        raise ValueError(
            f"need 0 <= lambda_min <= lambda_max <= 1, got lambda_min={lambda_min}, "
            f"lambda_max={lambda_max}"
        )
