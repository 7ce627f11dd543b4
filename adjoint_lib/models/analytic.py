"""A diffusion model whose epsilon and ODE flow are known in closed form (Gaussian data).

Data ``x_0 ~ N(mu, s^2 I)`` on any Gaussian path ``x_t = alpha_t x_0 + sigma_t eps`` (VP or
rectified flow) gives ``x_t ~ N(alpha mu, V I)`` with ``V = alpha^2 s^2 + sigma^2``, so
``eps(x, t) = sigma (x - alpha mu) / V``, ``E[x_0 | x_t] = mu + alpha s^2 (x - alpha mu) / V``,
and the probability-flow ODE keeps ``(x_t - alpha_t mu) / sqrt(V_t)`` constant.
"""
from __future__ import annotations

from typing import Any

import torch

from ..schedule import GaussianSchedule

Tensor = torch.Tensor


class GaussianEps:
    """Exact eps of Gaussian data with mean ``mu`` (the conditioning, if given) and std ``s``."""

    def __init__(self, schedule: GaussianSchedule, mu: float | Tensor = 0.0, s: float = 0.5) -> None:
        self.schedule, self.mu, self.s = schedule, mu, float(s)

    def _coef(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = self.schedule.alpha(t.double()).to(x.dtype).view(shape)
        sg = self.schedule.sigma(t.double()).to(x.dtype).view(shape)
        return a, sg, torch.sqrt(a * a * self.s ** 2 + sg * sg)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``eps = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)``; ``cond`` overrides mu."""
        mu = self.mu if cond is None else cond
        a, sg, std = self._coef(t, x)
        return sg * (x - a * mu) / std ** 2

    def data_prediction(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``E[x_0 | x_t] = mu + alpha s^2 (x - alpha mu) / (alpha^2 s^2 + sigma^2)`` (finite at ``alpha = 0``)."""
        mu = self.mu if cond is None else cond
        a, _, std = self._coef(t, x)
        return mu + a * self.s ** 2 * (x - a * mu) / std ** 2

    def flow(self, x_T: Tensor, t_T: float, rho_end: float, mu: Any = None) -> Tensor:
        """Exact ODE solution from ``t_T`` to the point with ``rho = rho_end``."""
        mu = self.mu if mu is None else mu
        a_T, _, std_T = self._coef(torch.full((x_T.shape[0],), float(t_T), dtype=torch.float64), x_T)
        a_e = float(self.schedule.alpha_of_rho(torch.tensor(rho_end, dtype=torch.float64)))
        std_e = (a_e ** 2 * self.s ** 2 + (a_e * rho_end) ** 2) ** 0.5
        return a_e * mu + std_e * (x_T - a_T * mu) / std_T
