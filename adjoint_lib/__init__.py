"""adjoint_lib: gradients through diffusion-model sampling (AdjointDPM, reproduced).

Public API::

    schedule = adjoint_lib.GaussianSchedule.from_diffusers(scheduler)   # VP or flow matching
    x0 = adjoint_lib.sample(eps_fn, x_T, cond, schedule=schedule, steps=20, order=2,
                            grad=adjoint_lib.Adjoint(), params=(...))  # or "checkpoint", ...
    loss(x0).backward()   # fills .grad of x_T, cond and params
"""
from .adjoint import SampleStats, sample
from .gradient_methods import GRAD_MODES, SCHEMES, Adjoint, Backprop, Checkpoint, GradMethod
from .schedule import FlowSchedule, GaussianSchedule, VPSchedule
from .solvers import Grid, ei_weights, make_grid, phi_integrals

__all__ = ["GaussianSchedule", "VPSchedule", "FlowSchedule", "sample", "SampleStats", "Adjoint", "Checkpoint",
           "Backprop", "GradMethod", "GRAD_MODES", "SCHEMES", "Grid", "make_grid", "ei_weights", "phi_integrals"]
__version__ = "0.1.0"
