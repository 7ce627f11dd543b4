"""One gradient of a :class:`~adjoint_lib.bench.problems.Problem` by each gradient mode, its
saved-tensor memory, and its error against another gradient."""
from __future__ import annotations

import torch

from ..adjoint import SampleStats, sample
from ..gradient_methods import Adjoint, Backprop, Checkpoint
from ..memory import SavedTensorMeter
from .problems import Problem

Tensor = torch.Tensor

# gradient mode -> the sample() arguments that select it, and its label in tables and plots
MODES = {
    "adjoint": dict(grad=Adjoint(), label="adjoint (backsolve)"),
    "adjoint-cache": dict(grad=Adjoint(trajectory="cache"), label="adjoint (cached trajectory)"),
    "adjoint-cont": dict(grad=Adjoint(scheme="continuous"), label="adjoint, continuous scheme (backsolve)"),
    "checkpoint": dict(grad=Checkpoint(), label="checkpoint (exact discrete)"),
    "backprop": dict(grad=Backprop(), label="backprop"),
    "dopri5": dict(grad=None, label="torchdiffeq odeint_adjoint dopri5 (raw ODE)"),
}
COMPONENTS = ("x_T", "cond", "weights")  # the gradients every mode returns


def gradient(problem: Problem, mode: str, steps: int | None = None, order: int = 2,
             rtol: float | None = None, stats: SampleStats | None = None) -> dict[str, Tensor]:
    """One gradient of ``problem.loss`` by ``mode`` (a key of :data:`MODES`): returns
    ``{"x_T", "cond", "weights"}`` (weights flattened into one vector); ``stats`` gets the
    eps-evaluation counts. ``steps``/``order`` for the library modes, ``rtol`` (= atol)
    for ``dopri5``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    stats = stats if stats is not None else SampleStats()
    x = problem.x_T.clone().requires_grad_(True)
    c = problem.cond.clone().requires_grad_(True)
    for p in problem.params:
        p.grad = None
    if mode == "dopri5":
        from ..baselines import raw_ode_sample
        if rtol is None:
            raise ValueError("mode 'dopri5' needs rtol=")
        eps_fn = problem.eps_fn
        if x.device.type != "cpu":  # RawPFODE builds its timestep tensor on the CPU
            def eps_fn(x_, t_, c_, _f=problem.eps_fn):
                return _f(x_, t_.to(x_.device), c_)
        x0 = raw_ode_sample(eps_fn, x, problem.cond_arg(c), schedule=problem.schedule,
                            method="dopri5", rtol=rtol, atol=rtol, params=problem.params,
                            adjoint=True, stats=stats)
    else:
        if steps is None:
            raise ValueError(f"mode {mode!r} needs steps=")
        spec = MODES[mode]
        x0 = sample(problem.eps_fn, x, problem.cond_arg(c), schedule=problem.schedule, steps=steps,
                    order=order, grad=spec["grad"], params=problem.params, stats=stats)
    problem.loss(x0).backward()
    out = {"x_T": x.grad.detach(), "cond": c.grad.detach(),
           "weights": torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in problem.params])}
    for p in problem.params:
        p.grad = None
    return out


def saved_tensor_peak(problem: Problem, mode: str, steps: int | None = None, order: int = 2,
                      rtol: float | None = None) -> tuple[int, SampleStats]:
    """Deterministic memory of one gradient: the peak bytes of autograd's saved tensors
    (:class:`~adjoint_lib.memory.SavedTensorMeter`) over forward and backward, and the stats."""
    stats = SampleStats()
    with SavedTensorMeter() as meter:
        gradient(problem, mode, steps, order, rtol, stats)
    return meter.peak_bytes, stats


def grad_errors(g: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Relative error ``|g - ref| / |ref|`` and cosine similarity per component."""
    out = {}
    for k in COMPONENTS:
        a, b = g[k].double().flatten().cpu(), ref[k].double().flatten().cpu()
        nb = float(b.norm())
        out[k] = dict(rel=float((a - b).norm()) / nb if nb > 0 else float("nan"),
                      cos=float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    out["max_rel"] = max(out[k]["rel"] for k in COMPONENTS)
    return out
