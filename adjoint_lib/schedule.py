"""Continuous-time VP noise schedule: alpha, sigma, lambda, rho and their inverses.

``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``. Time ``t`` is in the
diffusers model-timestep convention (0 .. num_train_timesteps - 1), a float. A discrete
schedule (``alphas_cumprod``) is made continuous by interpolating ``log alpha`` piecewise
linearly in ``t``, as DPM-Solver's ``NoiseScheduleVP('discrete')`` does, so that at every
integer ``t`` ``alpha(t)**2 == alphas_cumprod[t]``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


class VPSchedule:
    """A variance-preserving schedule on ``t in [t_min, t_max]`` (model timesteps).

    All arithmetic is done in float64 and results are cast back to the input dtype.

    Args:
        alphas_cumprod: 1-D tensor ``alphabar_n`` for ``n = 0..N-1`` (decreasing).
        final_alpha_cumprod: ``alphabar`` where a sampler's last step ends (``1.0`` means
            clean data, ``rho = 0``). Recorded from the scheduler by ``from_diffusers``.
    """

    def __init__(self, alphas_cumprod: Tensor, final_alpha_cumprod: float = 1.0) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not bool(((ac > 0) & (ac < 1 + 1e-12)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        if not 0.0 < float(final_alpha_cumprod) <= 1.0:
            raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
        self.alphas_cumprod = ac
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self._t = torch.arange(ac.numel(), dtype=torch.float64)
        self._log_alpha = 0.5 * torch.log(ac)
        self._lambda = self._log_alpha - 0.5 * torch.log1p(-ac.clamp(max=1 - 1e-15))
        self.t_min, self.t_max = 0.0, float(ac.numel() - 1)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Any, final_alpha_cumprod: float = 1.0) -> "VPSchedule":
        """Schedule from a discrete ``alphas_cumprod`` array."""
        return cls(torch.as_tensor(alphas_cumprod), final_alpha_cumprod)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "VPSchedule":
        """Schedule of a diffusers scheduler (DDIM, DDPM, DPM-Solver, Euler, ... : any
        ``beta_schedule`` - linear, scaled_linear, squaredcos_cap_v2 - since it reads the
        scheduler's own ``alphas_cumprod``).

        ``final_alpha_cumprod`` is where the scheduler's last step ends: DDIM's
        ``final_alpha_cumprod`` when it has one; ``alphas_cumprod[0]`` for
        ``final_sigmas_type="sigma_min"``; otherwise clean data (``1.0``).
        """
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: not a VP diffusers scheduler")
        ac = torch.as_tensor(ac, dtype=torch.float64)
        final = getattr(scheduler, "final_alpha_cumprod", None)
        if final is None:
            final_type = getattr(scheduler.config, "final_sigmas_type", "zero")
            final = float(ac[0]) if final_type == "sigma_min" else 1.0
        return cls(ac, float(final))

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _as64(t: Any, name: str = "t") -> tuple[Tensor, torch.dtype]:
        """``t`` in float64 (on the CPU for devices without float64, e.g. MPS) and the dtype
        to return; NaN input is refused naming the argument."""
        t = torch.as_tensor(t)
        out = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        if t.device.type == "mps":
            t = t.cpu()
        t = t.to(torch.float64)
        if t.device.type != "meta" and bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
        return t, out

    @staticmethod
    def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
        """Piecewise-linear interpolation with linear extrapolation (xp increasing; the tables
        follow ``x``'s device)."""
        xp, fp = xp.to(x.device), fp.to(x.device)
        idx = torch.searchsorted(xp, x.detach().clamp(xp[0], xp[-1])).clamp(1, xp.numel() - 1)
        x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        return f0 + (f1 - f0) * (x - x0) / (x1 - x0)

    # ---------------------------------------------------------------- forward maps
    def log_alpha(self, t: Any) -> Tensor:
        """``log alpha_t``, piecewise linear in t between integer timesteps."""
        t64, dt = self._as64(t)
        return self._interp(t64, self._t, self._log_alpha).to(dt)

    def dlog_alpha_dt(self, t: Any) -> Tensor:
        """``d log alpha / dt``: the slope of the interpolation segment containing t."""
        t64, dt = self._as64(t)
        tt, la = self._t.to(t64.device), self._log_alpha.to(t64.device)
        idx = torch.searchsorted(tt, t64.detach().clamp(self.t_min, self.t_max)).clamp(1, tt.numel() - 1)
        return (la[idx] - la[idx - 1]).to(dt)

    def alpha(self, t: Any) -> Tensor:
        """``alpha_t = sqrt(alphabar_t)``."""
        t64, dt = self._as64(t)
        return torch.exp(self.log_alpha(t64)).to(dt)

    def sigma(self, t: Any) -> Tensor:
        """``sigma_t = sqrt(1 - alpha_t^2)``."""
        t64, dt = self._as64(t)
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t64))).to(dt)

    def lambda_(self, t: Any) -> Tensor:
        """Half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (strictly decreasing in t)."""
        t64, dt = self._as64(t)
        la = self.log_alpha(t64)
        return (la - 0.5 * torch.log(-torch.expm1(2 * la))).to(dt)

    def rho(self, t: Any) -> Tensor:
        """``rho_t = sigma_t / alpha_t = exp(-lambda_t)``: the reparameterized time."""
        t64, dt = self._as64(t)
        return torch.exp(-self.lambda_(t64)).to(dt)

    # ---------------------------------------------------------------- inverses
    def t_of_lambda(self, lam: Any) -> Tensor:
        """Inverse of ``lambda_(t)``: ``log alpha = -softplus(-2 lambda)/2``, then invert the
        piecewise-linear ``log alpha(t)``. Clamped to ``[t_min, t_max]``."""
        lam64, dt = self._as64(lam, "lambda")
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam64)
        # log_alpha decreases with t: interpolate on the reversed (increasing) arrays.
        t = self._interp(log_alpha, self._log_alpha.flip(0), self._t.flip(0))
        return t.clamp(self.t_min, self.t_max).to(dt)

    def t_of_rho(self, rho: Any) -> Tensor:
        """Inverse of ``rho(t)`` (``lambda = -log rho``). Clamped to ``[t_min, t_max]``."""
        rho64, dt = self._as64(rho, "rho")
        if bool((rho64 < 0).any()):
            raise ValueError(f"rho must be >= 0 (rho = sigma / alpha), got min {float(rho64.min()):.3g}")
        return self.t_of_lambda(-torch.log(rho64)).to(dt)

    @staticmethod
    def alpha_of_rho(rho: Any) -> Tensor:
        """``alpha = 1 / sqrt(1 + rho^2)``: exact, no schedule needed."""
        rho = torch.as_tensor(rho)
        return torch.rsqrt(1 + rho * rho)

    # ---------------------------------------------------------------- misc
    @property
    def rho_end(self) -> float:
        """``rho`` where the scheduler's last step ends (0 for clean data)."""
        a = self.final_alpha_cumprod
        return 0.0 if a >= 1.0 else math.sqrt((1.0 - a) / a)

    def timesteps(self, steps: int, spacing: str = "logsnr", t_start: float | None = None,
                  t_end: float | None = None) -> Tensor:
        """``steps + 1`` decreasing float model timesteps from ``t_start`` (default
        ``t_max``) to ``t_end`` (default ``t_min``).

        ``spacing``: ``"logsnr"`` (uniform in lambda, the grid on which the exponential
        integrators show their order), ``"time"`` (uniform in t, like DDIM's grid; its last
        step's lambda-width shrinks only logarithmically, so every order looks first-order
        there) or ``"quadratic"`` (uniform in sqrt(t)).
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        t0 = self.t_max if t_start is None else float(t_start)
        t1 = self.t_min if t_end is None else float(t_end)
        if not self.t_min <= t1 < t0 <= self.t_max:
            raise ValueError(f"need t_min <= t_end < t_start <= t_max, got t_start={t0}, t_end={t1}")
        s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        if spacing == "logsnr":
            l0, l1 = self.lambda_(torch.tensor(t0)), self.lambda_(torch.tensor(t1))
            t = self.t_of_lambda(l0 + (l1 - l0) * s)
        elif spacing == "time":
            t = t0 + (t1 - t0) * s
        elif spacing == "quadratic":
            t = (math.sqrt(t0) + (math.sqrt(t1) - math.sqrt(t0)) * s) ** 2
        else:
            raise ValueError(f"spacing must be 'logsnr', 'time' or 'quadratic', got {spacing!r}")
        t[0], t[-1] = t0, t1  # exact end points
        return t

    def __repr__(self) -> str:
        return (f"VPSchedule(N={self.alphas_cumprod.numel()}, "
                f"final_alpha_cumprod={self.final_alpha_cumprod:.6g})")
