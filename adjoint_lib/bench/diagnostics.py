"""Diagnostics of a problem's eps network along t (notebook 07): eps at one state as a function
of t alone, its roughness in t, and where one parameter lies in the flattened weight gradient."""
from __future__ import annotations

from typing import Sequence

import torch

from ..adjoint import sample
from .problems import Problem

Tensor = torch.Tensor


@torch.no_grad()
def eps_along_t(problem: Problem, t_center: float, offsets: Sequence[float] | Tensor,
                steps: int = 50) -> Tensor:
    """``eps(x_t, t_center + offset, c)`` for each offset, at the fixed state ``x_t`` that
    sampling from the problem's ``x_T`` reaches at ``t_center`` (order 2, ``steps`` steps):
    the network's dependence on ``t`` alone. Returns (len(offsets), *x.shape)."""
    sch = problem.schedule
    if not sch.t_min < t_center < sch.t_max:
        raise ValueError(f"t_center must lie in ({sch.t_min}, {sch.t_max}), got {t_center}")
    c = problem.cond_arg(problem.cond)
    x = sample(problem.eps_fn, problem.x_T, c, schedule=sch, steps=steps, order=2, t_end=t_center)
    n = x.shape[0]
    return torch.stack([problem.eps_fn(x, torch.full((n,), t_center + float(o), dtype=x.dtype,
                                                     device=x.device), c)
                        for o in torch.as_tensor(offsets).tolist()])


def eps_roughness(problem: Problem, t_center: float,
                  spacings: Sequence[float] = (0.25, 1.0, 4.0, 16.0)) -> dict[float, float]:
    """RMS second difference of eps in t, ``|eps(t+h) - 2 eps(t) + eps(t-h)| / h^2`` per spacing
    ``h`` (:func:`eps_along_t`). For eps smooth in t it is the same at every h; growing as h
    shrinks it shows oscillation on the scale of h, which no step size above h resolves."""
    hs = [float(h) for h in spacings]
    e = eps_along_t(problem, t_center, [0.0] + [s * h for h in hs for s in (-1.0, 1.0)])  # one trajectory
    return {h: float(((e[1 + 2 * j] - 2 * e[0] + e[2 + 2 * j]) / h ** 2).double().pow(2).mean().sqrt())
            for j, h in enumerate(hs)}


def weight_slice(net: torch.nn.Module, name: str) -> slice:
    """Where parameter ``name`` of ``net`` lies in the flattened ``"weights"`` gradient of
    :func:`~adjoint_lib.bench.gradients.gradient` (the problem's params are ``net.parameters()``, in order)."""
    start = 0
    for n, p in net.named_parameters():
        if n == name:
            return slice(start, start + p.numel())
        start += p.numel()
    raise KeyError(f"{type(net).__name__} has no parameter {name!r}")
