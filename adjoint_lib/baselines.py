"""Baselines: the same gradients from torchdiffeq on the *raw* probability-flow ODE in (t, x).

Without the change of variables the probability-flow ODE of an epsilon model is

    dx/dt = (d log alpha/dt) (x - eps(x, t, c) / sigma_t),

a stiff-ish linear drift plus the network term. ``torchdiffeq.odeint_adjoint`` solves it
forward and its adjoint backward (O(1) memory); ``odeint`` backpropagates through the solver.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from .adjoint import SampleStats, model_timesteps, pack_cond
from .schedule import VPSchedule

Tensor = torch.Tensor


class RawPFODE(nn.Module):
    """``f(t, x) = (d log alpha/dt)(x - eps/sigma)``; counts its evaluations in ``stats``
    (with ``adjoint=True``: forward when grad is disabled, backward when enabled, as in
    torchdiffeq's adjoint; otherwise all are forward evaluations)."""

    def __init__(self, eps_fn, cond: Any, schedule: VPSchedule, stats: SampleStats, adjoint: bool = True) -> None:
        super().__init__()
        self.eps_fn, self.cond, self.schedule, self.stats = eps_fn, cond, schedule, stats
        self.adjoint = adjoint

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        if self.adjoint and torch.is_grad_enabled():
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        # adaptive solvers may probe slightly past the end point: stay inside the schedule
        t64 = t.detach().to(torch.float64).clamp(self.schedule.t_min, self.schedule.t_max)
        slope = float(self.schedule.dlog_alpha_dt(t64))
        sigma = float(self.schedule.sigma(t64))
        eps = self.eps_fn(x, model_timesteps(float(t64), x), self.cond).to(x.dtype)
        return slope * (x - eps / sigma)


def raw_ode_sample(eps_fn, x_T: Tensor, cond: Any = None, *, schedule: VPSchedule,
                   method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   steps: int | None = None, t_start: float | None = None, t_end: float | None = None,
                   params: Sequence[Tensor] = (), adjoint: bool = True,
                   stats: SampleStats | None = None) -> Tensor:
    """Solve the raw (t, x) probability-flow ODE from ``t_start`` to ``t_end`` with torchdiffeq.

    ``method``: any torchdiffeq method (``"dopri5"`` adaptive with ``rtol/atol``, or a
    fixed-step one such as ``"euler"``, ``"midpoint"``, ``"rk4"`` with ``steps`` uniform
    steps in t). ``adjoint=True`` uses ``odeint_adjoint`` (gradients for ``x_T``, the
    tensors of ``cond`` and ``params``); ``False`` backpropagates through ``odeint``.
    """
    t0 = schedule.t_max if t_start is None else float(t_start)
    t1 = schedule.t_min if t_end is None else float(t_end)
    stats = stats if stats is not None else SampleStats()
    stats.mode, stats.nfe_forward, stats.nfe_backward = f"torchdiffeq-{method}", 0, 0
    func = RawPFODE(eps_fn, cond, schedule, stats, adjoint)
    times = torch.tensor([t0, t1], dtype=x_T.dtype)
    options = {}
    if method not in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"):
        if steps is None:
            raise ValueError(f"fixed-step method {method!r} needs steps=")
        options["step_size"] = (t0 - t1) / steps
        stats.steps = steps
    if adjoint:
        cond_tensors = [c for c in pack_cond(cond)[0] if c.requires_grad]
        adj_params = tuple(cond_tensors) + tuple(params)
        out = odeint_adjoint(func, x_T, times, method=method, rtol=rtol, atol=atol, options=options,
                             adjoint_params=adj_params, adjoint_options=dict(norm="seminorm"))
    else:
        out = odeint(func, x_T, times, method=method, rtol=rtol, atol=atol, options=options)
    return out[-1]
