"""Continuous-time Gaussian noise schedules: alpha, sigma, lambda, rho and their inverses.

A schedule is a Gaussian path ``x_t = alpha_t x_0 + sigma_t eps`` on model timesteps
``t in [t_min, t_max]`` (diffusers' convention, a float). Everything the samplers need is
``lambda_t = log(alpha_t / sigma_t)``, ``rho_t = sigma_t / alpha_t = exp(-lambda_t)`` and
``alpha`` as a function of ``rho``; nothing requires ``alpha^2 + sigma^2 = 1``.

* :class:`VPSchedule`: variance preserving (``alpha^2 + sigma^2 = 1``), from a discrete
  ``alphas_cumprod`` made continuous by interpolating ``log alpha`` piecewise linearly in
  ``t``, as DPM-Solver's ``NoiseScheduleVP('discrete')`` does, so that at every integer ``t``
  ``alpha(t)**2 == alphas_cumprod[t]``.
* :class:`FlowSchedule`: rectified flow / flow matching, ``alpha = 1 - s``, ``sigma = s`` with
  ``s = t / num_train_timesteps`` (diffusers' ``FlowMatchEulerDiscreteScheduler``: timesteps
  ``= sigmas * num_train_timesteps``). Its noise end ``s = 1`` has ``alpha = 0``, ``rho = inf``.

``GaussianSchedule.from_diffusers(scheduler)`` picks the class from the scheduler.
"""
from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


class GaussianSchedule:
    """Base class of a Gaussian path ``x_t = alpha_t x_0 + sigma_t eps`` on ``[t_min, t_max]``.

    Subclasses define ``log_alpha``, ``lambda_``, ``t_of_lambda``, ``alpha_of_rho`` and the
    attributes ``t_min``, ``t_max``; the rest (``alpha``, ``sigma``, ``rho``, ``t_of_rho``,
    ``timesteps``) follows. All arithmetic is float64; results take the input's dtype.
    """

    t_min: float
    t_max: float
    SPACINGS: tuple[str, ...] = ("logsnr", "time", "quadratic")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "GaussianSchedule":
        """The schedule of a diffusers scheduler: :class:`VPSchedule` for those with
        ``alphas_cumprod`` (DDPM, DDIM, DPM-Solver, Euler, ...), :class:`FlowSchedule` for
        ``FlowMatchEulerDiscreteScheduler`` (and other ``FlowMatch...`` schedulers) and for
        multistep schedulers configured with ``use_flow_sigmas=True``.
        Called on a subclass, the scheduler must be of that kind."""
        if _is_flow_scheduler(scheduler):
            kind: type[GaussianSchedule] = FlowSchedule
        elif getattr(scheduler, "alphas_cumprod", None) is not None:
            kind = VPSchedule
        else:
            raise TypeError(f"{type(scheduler).__name__} is neither a VP scheduler (alphas_cumprod) nor a "
                            "flow-matching scheduler (FlowMatchEulerDiscreteScheduler)")
        if not issubclass(kind, cls):
            raise TypeError(f"{type(scheduler).__name__} is a {kind.__name__.replace('Schedule', '')} scheduler, "
                            f"not a {cls.__name__}: use {kind.__name__}.from_diffusers or "
                            "GaussianSchedule.from_diffusers")
        return kind._from_diffusers(scheduler)

    @classmethod
    def _from_diffusers(cls, scheduler: Any) -> "GaussianSchedule":
        raise NotImplementedError

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

    # ---------------------------------------------------------------- the path
    def log_alpha(self, t: Any) -> Tensor:
        """``log alpha_t``."""
        raise NotImplementedError

    def lambda_(self, t: Any) -> Tensor:
        """Half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (strictly decreasing in t)."""
        raise NotImplementedError

    def t_of_lambda(self, lam: Any) -> Tensor:
        """Inverse of ``lambda_(t)``, clamped to ``[t_min, t_max]``."""
        raise NotImplementedError

    def alpha_of_rho(self, rho: Any) -> Tensor:
        """``alpha`` at the point of the path with ``sigma / alpha = rho``."""
        rho64, dt = self._as64(rho, "rho")
        return torch.exp(self.log_alpha(self.t_of_rho(rho64))).to(dt)

    def alpha(self, t: Any) -> Tensor:
        """``alpha_t``."""
        t64, dt = self._as64(t)
        return torch.exp(self.log_alpha(t64)).to(dt)

    def sigma(self, t: Any) -> Tensor:
        """``sigma_t = alpha_t exp(-lambda_t)``."""
        t64, dt = self._as64(t)
        return torch.exp(self.log_alpha(t64) - self.lambda_(t64)).to(dt)

    def rho(self, t: Any) -> Tensor:
        """``rho_t = sigma_t / alpha_t = exp(-lambda_t)``: the reparameterized time."""
        t64, dt = self._as64(t)
        return torch.exp(-self.lambda_(t64)).to(dt)

    def t_of_rho(self, rho: Any) -> Tensor:
        """Inverse of ``rho(t)`` (``lambda = -log rho``). Clamped to ``[t_min, t_max]``."""
        rho64, dt = self._as64(rho, "rho")
        if bool((rho64 < 0).any()):
            raise ValueError(f"rho must be >= 0 (rho = sigma / alpha), got min {float(rho64.min()):.3g}")
        return self.t_of_lambda(-torch.log(rho64)).to(dt)

    # ---------------------------------------------------------------- grids
    @property
    def rho_end(self) -> float:
        """``rho`` where the scheduler's last step ends (0 for clean data)."""
        return 0.0

    @property
    def lambda_max(self) -> float:
        """The largest finite half log-SNR of the schedule: where an evaluation "at" ``rho = 0``
        is placed when interpolating in lambda."""
        return float(self.lambda_(torch.tensor(self.t_min, dtype=torch.float64)))

    def timesteps(self, steps: int, spacing: str = "logsnr", t_start: float | None = None,
                  t_end: float | None = None) -> Tensor:
        """``steps + 1`` decreasing float model timesteps from ``t_start`` (default
        ``t_max``) to ``t_end`` (default ``t_min``).

        ``spacing``: ``"logsnr"`` (uniform in lambda, the grid on which the exponential
        integrators show their order; both ends need a finite lambda), ``"time"`` (uniform in
        t, like DDIM's grid, or the flow-matching Euler grid with ``shift = 1``; its last step's
        lambda-width shrinks only logarithmically, so every order looks first-order there) or
        ``"quadratic"`` (uniform in sqrt(t)); :class:`FlowSchedule` adds ``"shift"``.
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"spacing must be one of {self.SPACINGS}, got {spacing!r}")
        t0 = self.t_max if t_start is None else float(t_start)
        t1 = self.t_min if t_end is None else float(t_end)
        if not self.t_min <= t1 < t0 <= self.t_max:
            raise ValueError(f"need t_min <= t_end < t_start <= t_max, got t_start={t0}, t_end={t1}")
        s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        t = self._spaced(spacing, t0, t1, s)
        t[0], t[-1] = t0, t1  # exact end points
        return t

    def _spaced(self, spacing: str, t0: float, t1: float, s: Tensor) -> Tensor:
        """The points of ``spacing`` from ``t0`` (``s = 0``) to ``t1`` (``s = 1``)."""
        if spacing == "logsnr":
            l0, l1 = self.lambda_(torch.tensor(t0)), self.lambda_(torch.tensor(t1))
            if not (math.isfinite(float(l0)) and math.isfinite(float(l1))):
                which = "t_start" if not math.isfinite(float(l0)) else "t_end"
                raise ValueError(f"spacing='logsnr' needs a finite lambda at both ends, but lambda is infinite at "
                                 f"{which}={t0 if which == 't_start' else t1} (alpha or sigma is 0 there): "
                                 "move that end inside the path or use spacing='time'")
            return self.t_of_lambda(l0 + (l1 - l0) * s)
        if spacing == "time":
            return t0 + (t1 - t0) * s
        return (math.sqrt(t0) + (math.sqrt(t1) - math.sqrt(t0)) * s) ** 2  # quadratic


# ====================================================================== VP
class VPSchedule(GaussianSchedule):
    """A variance-preserving schedule on ``t in [0, N - 1]`` (model timesteps).

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
        if _is_flow_scheduler(scheduler):
            raise TypeError(f"{type(scheduler).__name__} samples a flow-matching path (FlowMatch... or "
                            "use_flow_sigmas=True), not a VP one: use FlowSchedule.from_diffusers")
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: not a VP diffusers scheduler")
        return cls._from_diffusers(scheduler)

    @classmethod
    def _from_diffusers(cls, scheduler: Any) -> "VPSchedule":
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        final = getattr(scheduler, "final_alpha_cumprod", None)
        if final is None:
            final_type = getattr(scheduler.config, "final_sigmas_type", "zero")
            final = float(ac[0]) if final_type == "sigma_min" else 1.0
        return cls(ac, float(final))

    # ---------------------------------------------------------------- helpers
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

    def sigma(self, t: Any) -> Tensor:
        """``sigma_t = sqrt(1 - alpha_t^2)``."""
        t64, dt = self._as64(t)
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t64))).to(dt)

    def lambda_(self, t: Any) -> Tensor:
        """Half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (strictly decreasing in t)."""
        t64, dt = self._as64(t)
        la = self.log_alpha(t64)
        return (la - 0.5 * torch.log(-torch.expm1(2 * la))).to(dt)

    # ---------------------------------------------------------------- inverses
    def t_of_lambda(self, lam: Any) -> Tensor:
        """Inverse of ``lambda_(t)``: ``log alpha = -softplus(-2 lambda)/2``, then invert the
        piecewise-linear ``log alpha(t)``. Clamped to ``[t_min, t_max]``."""
        lam64, dt = self._as64(lam, "lambda")
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam64)
        # log_alpha decreases with t: interpolate on the reversed (increasing) arrays.
        t = self._interp(log_alpha, self._log_alpha.flip(0), self._t.flip(0))
        return t.clamp(self.t_min, self.t_max).to(dt)

    @staticmethod
    def alpha_of_rho(rho: Any) -> Tensor:
        """``alpha = 1 / sqrt(1 + rho^2)`` (from ``alpha^2 + sigma^2 = 1``): exact, no schedule needed."""
        rho = torch.as_tensor(rho)
        return torch.rsqrt(1 + rho * rho)

    # ---------------------------------------------------------------- misc
    @property
    def rho_end(self) -> float:
        """``rho`` where the scheduler's last step ends (0 for clean data)."""
        a = self.final_alpha_cumprod
        return 0.0 if a >= 1.0 else math.sqrt((1.0 - a) / a)

    def __repr__(self) -> str:
        return (f"VPSchedule(N={self.alphas_cumprod.numel()}, "
                f"final_alpha_cumprod={self.final_alpha_cumprod:.6g})")


# ====================================================================== flow
def _is_flow_scheduler(scheduler: Any) -> bool:
    """A diffusers flow-matching scheduler: ``FlowMatch...`` (no ``alphas_cumprod``), or a multistep
    scheduler configured with ``use_flow_sigmas=True`` (DPM-Solver, UniPC)."""
    config = getattr(scheduler, "config", None)
    if config is None or "num_train_timesteps" not in config:
        return False
    if config.get("use_flow_sigmas", False):
        return True
    return type(scheduler).__name__.startswith("FlowMatch") and getattr(scheduler, "alphas_cumprod", None) is None


class FlowSchedule(GaussianSchedule):
    """Rectified flow: ``x_s = (1 - s) x_0 + s eps`` with ``s = t / T`` on ``t in [0, T]``.

    ``alpha = 1 - s``, ``sigma = s``, ``rho = s / (1 - s)``, ``lambda = log((1 - s) / s)``,
    ``alpha(rho) = 1 / (1 + rho)``. A velocity model predicts ``v = eps - x_0 = dx/ds``
    (SD3, FLUX), so ``eps = x + (1 - s) v`` and ``x_0 = x - s v``
    (:class:`adjoint_lib.models.FlowEps`). At ``t = T`` (pure noise) ``alpha = 0`` and
    ``rho = inf``: a grid of ``sample()`` starts below it, or the first step is taken in
    data-prediction form (:func:`adjoint_lib.models.flow.sample_flow`).

    Args:
        num_train_timesteps: ``T``; diffusers' timesteps are ``sigmas * T``.
        shift: the timestep shift of diffusers' ``FlowMatchEulerDiscreteScheduler``,
            ``s' = shift s / (1 + (shift - 1) s)``; it changes only the grid
            (``spacing="shift"``), not the path.
    """

    SPACINGS = GaussianSchedule.SPACINGS + ("shift",)

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if not (isinstance(num_train_timesteps, int) and num_train_timesteps >= 2):
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        if not (math.isfinite(float(shift)) and float(shift) > 0):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)
        self.t_min, self.t_max = 0.0, float(num_train_timesteps)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> "FlowSchedule":
        """Schedule of diffusers' ``FlowMatchEulerDiscreteScheduler``: ``num_train_timesteps``
        and ``shift`` from its config (the grid is its ``timesteps`` after ``set_timesteps``;
        pass them to ``sample_flow(..., timesteps=scheduler.timesteps)``). Refuses
        ``invert_sigmas`` (a path run from data to noise). Multistep schedulers with
        ``use_flow_sigmas=True`` give their ``flow_shift`` (their integer timesteps round the
        sigmas down, so prefer ``steps=`` over their ``timesteps``)."""
        if not _is_flow_scheduler(scheduler):
            raise TypeError(f"{type(scheduler).__name__} is not a flow-matching scheduler "
                            "(FlowMatchEulerDiscreteScheduler); for VP schedulers use VPSchedule.from_diffusers")
        return cls._from_diffusers(scheduler)

    @classmethod
    def _from_diffusers(cls, scheduler: Any) -> "FlowSchedule":
        config = scheduler.config
        if config.get("invert_sigmas", False):
            raise ValueError("invert_sigmas=True schedulers (sigmas from 0 to 1) are not supported")
        if config.get("use_flow_sigmas", False):
            return cls(int(config.num_train_timesteps), float(config.get("flow_shift", 1.0)))
        return cls(int(config.num_train_timesteps), float(getattr(scheduler, "shift", config.get("shift", 1.0))))

    def s(self, t: Any) -> Tensor:
        """``s = t / T``: diffusers' sigma of the flow path."""
        t64, dt = self._as64(t)
        return (t64 / self.t_max).to(dt)

    def log_alpha(self, t: Any) -> Tensor:
        """``log alpha_t = log(1 - s)``."""
        t64, dt = self._as64(t)
        return torch.log1p(-t64 / self.t_max).to(dt)

    def alpha(self, t: Any) -> Tensor:
        """``alpha_t = 1 - s`` (0 at ``t = T``)."""
        t64, dt = self._as64(t)
        return (1.0 - t64 / self.t_max).to(dt)

    def sigma(self, t: Any) -> Tensor:
        """``sigma_t = s``."""
        return self.s(t)

    def lambda_(self, t: Any) -> Tensor:
        """``lambda_t = log((1 - s) / s)`` (``-inf`` at ``t = T``, ``+inf`` at ``t = 0``)."""
        t64, dt = self._as64(t)
        s = t64 / self.t_max
        return (torch.log1p(-s) - torch.log(s)).to(dt)

    def rho(self, t: Any) -> Tensor:
        """``rho_t = s / (1 - s)`` (``inf`` at ``t = T``)."""
        t64, dt = self._as64(t)
        s = t64 / self.t_max
        return (s / (1.0 - s)).to(dt)

    def t_of_lambda(self, lam: Any) -> Tensor:
        """``s = sigmoid(-lambda)``, ``t = T s``. Clamped to ``[0, T]``."""
        lam64, dt = self._as64(lam, "lambda")
        return (self.t_max * torch.sigmoid(-lam64)).clamp(self.t_min, self.t_max).to(dt)

    @staticmethod
    def alpha_of_rho(rho: Any) -> Tensor:
        """``alpha = 1 / (1 + rho)`` (from ``alpha + sigma = 1``; 0 at ``rho = inf``)."""
        rho = torch.as_tensor(rho)
        return 1.0 / (1.0 + rho)

    @property
    def lambda_max(self) -> float:
        """``lambda`` at the smallest training sigma ``s = 1 / T`` (``lambda(t = 0)`` is infinite)."""
        return math.log(self.t_max - 1.0)

    def shifted(self, s: Any) -> Tensor:
        """diffusers' timestep shift ``s' = shift s / (1 + (shift - 1) s)`` (monotone, fixes 0 and 1)."""
        s64, dt = self._as64(s, "s")
        return (self.shift * s64 / (1.0 + (self.shift - 1.0) * s64)).to(dt)

    def _spaced(self, spacing: str, t0: float, t1: float, s: Tensor) -> Tensor:
        """Adds ``"shift"``: uniform in the unshifted sigma, then shifted - the grid of
        ``FlowMatchEulerDiscreteScheduler`` (with its ``shift``) between ``t0`` and ``t1``."""
        if spacing != "shift":
            return super()._spaced(spacing, t0, t1, s)
        k = self.shift
        unshift = lambda x: x / (k - (k - 1.0) * x)  # inverse of shifted()
        u0, u1 = unshift(t0 / self.t_max), unshift(t1 / self.t_max)
        return self.t_max * self.shifted(u0 + (u1 - u0) * s)

    def __repr__(self) -> str:
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, shift={self.shift:g})"
