"""Exponential-integrator multistep solvers in the reparameterized variables.

With ``y = x / alpha`` and ``rho = sigma / alpha = exp(-lambda)`` the probability-flow ODE
of an epsilon-prediction model is ``dy/drho = eps(alpha(rho) y, t(rho), c)``. One step

    y_{i+1} = y_i + int_{rho_i}^{rho_{i+1}} eps drho

is taken by interpolating eps by a polynomial in lambda through the last ``q`` nodes and
integrating it exactly against ``drho = -exp(-lambda) dlambda``. Order 1 is DDIM (Euler in
rho); orders 2 and 3 are DPM-Solver-2M / -3M. The same weights integrate the adjoint
equations backwards (``adjoint.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .schedule import GaussianSchedule, VPSchedule

Tensor = torch.Tensor


def exp_moments(h: float, c: float, n: int) -> list[float]:
    """``M_m = int_0^h e^{-c s} s^m ds`` for ``m < n``.

    Closed form ``m!/c^{m+1} (1 - e^{-ch} sum_{k<=m} (ch)^k/k!)``; for small ``|ch|`` its
    cancellation-free series ``m! h^{m+1} e^{-ch} sum_{j>=0} (ch)^j/(m+1+j)!``; for ``h = inf``
    (``c > 0``) ``m!/c^{m+1}``."""
    out = []
    for m in range(n):
        fact = math.factorial(m)
        if math.isinf(h):
            if c <= 0.0:
                raise ValueError("an infinite lambda interval needs c > 0")
            out.append(fact / c ** (m + 1))
            continue
        u = c * h
        if abs(u) < 0.5:
            term = tail = 1.0 / math.factorial(m + 1)
            for k in range(m + 2, m + 42):
                term *= u / k
                tail += term
            out.append(fact * h ** (m + 1) * math.exp(-u) * tail)
        else:
            partial = sum(u ** k / math.factorial(k) for k in range(m + 1))
            out.append(fact / c ** (m + 1) * (1.0 - math.exp(-u) * partial))
    return out


def phi_integrals(rho_a: float, rho_b: float, n: int) -> list[float]:
    """``Phi_m = int_{rho_a}^{rho_b} (lambda - lambda_a)^m drho = -rho_a M_m(h, c=1)`` for ``m < n``
    (``drho = -rho_a e^{-(lambda - lambda_a)} dlambda``, ``h = lambda_b - lambda_a``, :func:`exp_moments`);
    ``Phi_0 = rho_b - rho_a`` exactly, ``rho_b = 0`` (``h = inf``) gives ``-m! rho_a``."""
    out = [rho_b - rho_a]
    if n == 1:
        return out
    if rho_a <= 0.0:
        raise ValueError("higher-order weights need rho_a > 0")
    h = math.inf if rho_b == 0.0 else math.log(rho_a / rho_b)
    return out + [-rho_a * m for m in exp_moments(h, 1.0, n)[1:]]


def _interpolation_weights(lambdas: Sequence[float], moments: Sequence[float]) -> list[float]:
    """``w = V^{-T} M``: weights of ``f(lambda_j)`` given the moments ``M_m`` of ``(lambda - lambdas[0])^m``
    (``V_jm = (lambda_j - lambdas[0])^m``, the polynomial interpolant through the nodes)."""
    q = len(lambdas)
    if q == 1:
        return list(moments[:1])
    vander = np.vander(np.asarray(lambdas, dtype=np.float64) - lambdas[0], q, increasing=True)
    return np.linalg.solve(vander.T, np.asarray(moments[:q], dtype=np.float64)).tolist()


def lambda_weights(lambdas: Sequence[float], lam_b: float, c: float = 0.0) -> list[float]:
    """Weights ``w_j`` with ``int_{lambdas[0]}^{lam_b} e^{-c (lambda - lambdas[0])} f dlambda
    ~= sum_j w_j f(lambda_j)``, ``f`` interpolated by the polynomial through ``lambdas``."""
    return _interpolation_weights(lambdas, exp_moments(lam_b - lambdas[0], c, len(lambdas)))


def ei_weights(lambdas: Sequence[float], rho_a: float, rho_b: float) -> list[float]:
    """Weights ``w_j`` with ``int_{rho_a}^{rho_b} f drho ~= sum_j w_j f(lambda_j)``, ``f`` interpolated
    by the polynomial in ``lambda`` through ``lambdas`` (``lambdas[0]`` is the anchor at ``rho_a``):
    ``w = V^{-T} Phi`` with the moments of :func:`phi_integrals` (``= -rho_a`` ``lambda_weights(c=1)``)."""
    return _interpolation_weights(lambdas, phi_integrals(rho_a, rho_b, len(lambdas)))


@dataclass
class Grid:
    """Discretization of one sampling run.

    ``t[i]`` (``i < N``) are the model timesteps where eps is evaluated, ``rho[i]``
    (``i <= N``) the reparameterized times (``rho[N]`` is where the last step ends) and
    ``lam[i] = -log rho[i]``; ``t_end`` and ``lam_end`` are the timestep and lambda used
    when the adjoint evaluates eps at the end point (clamped to the schedule's range when
    ``rho[N] = 0``); ``alphas[i] = schedule.alpha_of_rho(rho[i])`` (``x = alpha y``; the
    variance-preserving ``1 / sqrt(1 + rho^2)`` when not given).
    """

    t: Tensor
    rho: list[float]
    lam: list[float]
    t_end: float
    lam_end: float
    alphas: list[float] | None = None

    def __post_init__(self) -> None:
        if self.alphas is None:
            self.alphas = VPSchedule.alpha_of_rho(torch.tensor(self.rho, dtype=torch.float64)).tolist()

    @property
    def steps(self) -> int:
        """Number of steps ``N`` (``N + 1`` grid points)."""
        return len(self.rho) - 1

    def alpha(self, i: int) -> float:
        """``alpha_i``: the path's alpha at ``rho_i`` (``x_i = alpha_i y_i``)."""
        return self.alphas[i]

    def node_t(self, i: int) -> float:
        """Model timestep of node ``i`` (``t_end`` for the last point)."""
        return float(self.t[i]) if i < self.steps else self.t_end

    def forward_order(self, i: int, order: int) -> int:
        """Order of forward step ``i``: lower at the start (not enough history) and
        first order for a last step that ends at ``rho = 0`` (infinite lambda-width)."""
        if i == self.steps - 1 and self.rho[-1] == 0.0:
            return 1
        return min(order, i + 1)

    def forward_weights(self, i: int, order: int) -> list[float]:
        """Weights of ``eps_i, eps_{i-1}, ...`` for the step ``rho_i -> rho_{i+1}``."""
        q = self.forward_order(i, order)
        return ei_weights([self.lam[i - j] for j in range(q)], self.rho[i], self.rho[i + 1])

    def backward_order(self, k: int, order: int) -> int:
        """Order of the backward step ``rho_{k+1} -> rho_k``: first order from ``rho = 0``,
        lower at the start of the backward pass (only nodes ``k+1 .. N`` are known)."""
        return 1 if self.rho[k + 1] == 0.0 else min(order, self.steps - k)

    def backward_weights(self, k: int, order: int) -> list[float]:
        """Weights of nodes ``k+1, k+2, ...`` for ``int_{rho_{k+1}}^{rho_k} f drho`` (an
        explicit multistep method run from ``rho_N`` up to ``rho_0``), ``f`` interpolated in lambda."""
        q = self.backward_order(k, order)
        return ei_weights([self.lam_eval(k + 1 + j) for j in range(q)], self.rho[k + 1], self.rho[k])

    def lam_eval(self, i: int) -> float:
        """lambda at which node ``i`` is evaluated (finite even for ``rho_N = 0``)."""
        return self.lam[i] if math.isfinite(self.lam[i]) else self.lam_end


def make_grid(schedule: GaussianSchedule, steps: int | None = None, timesteps: Sequence[float] | Tensor | None = None,
              spacing: str = "logsnr", t_start: float | None = None, t_end: float | None = None) -> Grid:
    """Build the :class:`Grid` from ``steps`` (``steps + 1`` points from ``t_start`` to
    ``t_end`` with the given ``spacing``; the last point is where sampling ends) or from
    explicit decreasing ``timesteps`` (eps is evaluated at each one; the last step ends
    where the scheduler's own last step ends, ``schedule.rho_end``).

    The grid must start where ``alpha > 0``: at a flow path's pure-noise end (``alpha = 0``,
    ``rho = inf``) ``y = x / alpha`` is infinite; start below it (``t_start < t_max``) or take
    the first step in data-prediction form with :func:`adjoint_lib.models.flow.sample_flow`."""
    if (steps is None) == (timesteps is None):
        raise ValueError("give exactly one of steps= or timesteps=")
    if timesteps is not None:
        t = torch.as_tensor(timesteps).to(torch.float64).flatten()
        if t.numel() < 1:
            raise ValueError("timesteps is empty")
        if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
            raise ValueError("timesteps must be strictly decreasing")
        if float(t.min()) < schedule.t_min or float(t.max()) > schedule.t_max:
            raise ValueError(f"timesteps must lie in [{schedule.t_min}, {schedule.t_max}]")
        rho = schedule.rho(t).tolist() + [schedule.rho_end]
        if rho[-1] >= rho[-2]:
            raise ValueError("the schedule's final point is noisier than the last timestep")
    else:
        full = schedule.timesteps(steps, spacing, t_start, t_end)
        t, rho = full[:-1], schedule.rho(full).tolist()
    if not math.isfinite(rho[0]):
        raise ValueError(f"the grid starts at t={float(t[0]):g}, where alpha = 0 (rho = inf: the pure-noise end of "
                         f"a flow path) and y = x / alpha is infinite: start below it (t_start < {schedule.t_max:g}, "
                         "timesteps[0] < t_max) or use adjoint_lib.models.flow.sample_flow, which takes the first "
                         "step from pure noise in data-prediction form")
    lam = [-math.log(r) if r > 0 else math.inf for r in rho]
    t_last = float(schedule.t_of_rho(torch.tensor(max(rho[-1], 1e-300), dtype=torch.float64)))
    lam_end = min(float(schedule.lambda_(torch.tensor(t_last, dtype=torch.float64))), schedule.lambda_max)
    alphas = schedule.alpha_of_rho(torch.tensor(rho, dtype=torch.float64)).tolist()
    return Grid(t=t, rho=rho, lam=lam, t_end=t_last, lam_end=lam_end, alphas=alphas)


EpsAt = Callable[[int, Tensor], Tensor]


def solve(eps_at: EpsAt, y0: Tensor, grid: Grid, order: int = 1,
          on_state: Callable[[int, Tensor], None] | None = None, progress: bool = False) -> Tensor:
    """Integrate ``dy/drho = eps`` over the grid with the ``order``-step exponential
    multistep method. ``eps_at(i, y_i)`` evaluates eps at node ``i``; ``on_state(i, y_i)``
    sees every grid state ``y_0 .. y_N`` (used to cache the trajectory)."""
    from tqdm.auto import tqdm

    history: list[Tensor] = []
    y = y0
    for i in tqdm(range(grid.steps), desc="sample", disable=not progress, leave=False):
        if on_state is not None:
            on_state(i, y)
        history.insert(0, eps_at(i, y))
        del history[order:]
        w = grid.forward_weights(i, order)
        y = y + sum(wj * e for wj, e in zip(w, history))
    if on_state is not None:
        on_state(grid.steps, y)
    return y
