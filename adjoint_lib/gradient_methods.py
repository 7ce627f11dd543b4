"""How ``sample()`` computes gradients: one small frozen class per method, passed as ``grad=``.

Rule of thumb (the same in the README and notebook 07):

* **Checkpoint** when N copies of the sample fit in memory (a 4x64x64 latent is 64 KB, so
  for latent diffusion they almost always do): the sampler's exact gradient, at the
  adjoint's cost.
* **Adjoint** (AdjointDPM) when they do not, or to keep memory flat in the number of steps:
  large samples, many steps, large batches. With the default transpose scheme its only error
  is the backsolve's reconstruction of the trajectory.
* **Backprop** for a few steps of a small network, or to check the others: autograd through
  the loop, memory grows with every step's activations.

The strings ``"adjoint"``, ``"checkpoint"`` and ``"backprop"`` are shortcuts for the default
instance of each class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

TRAJECTORIES = ("backsolve", "cache")
SCHEMES = ("transpose", "continuous")


@dataclass(frozen=True)
class Adjoint:
    """AdjointDPM: solve the adjoint equations ``da/drho = -a^T deps/dy`` backwards.

    Memory: O(1) in the number of steps N with ``trajectory="backsolve"`` (``y`` is re-solved
    backwards alongside); O(N |x|) with ``"cache"`` (the forward grid states are kept, no
    activations). Cost: N + 1 eps evaluations and N vector-Jacobian products backwards.

    ``scheme="transpose"`` (recommended) steps the equations with the transpose of the
    forward step: on the exact states it *is* the sampler's exact gradient (``"cache"`` equals
    :class:`Checkpoint`), so with backsolve its only error is the reconstruction of ``y``.
    ``scheme="continuous"`` integrates them with their own exponential integrator: the ODE's
    gradient (AdjointDPM as published), O(N^-order) from the sampler's; not recommended
    except to study the ODE's gradient or a stiff flow sampled in very few steps.
    """

    trajectory: Literal["backsolve", "cache"] = "backsolve"
    scheme: Literal["transpose", "continuous"] = "transpose"

    def __post_init__(self) -> None:
        if self.trajectory not in TRAJECTORIES:
            raise ValueError(f"Adjoint(trajectory=...) must be one of {TRAJECTORIES}, got {self.trajectory!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"Adjoint(scheme=...) must be one of {SCHEMES}, got {self.scheme!r}")

    name = "adjoint"


@dataclass(frozen=True)
class Checkpoint:
    """The discrete sampler's exact gradient from the N stored grid states.

    Memory O(N |x|) (states only, no activations); cost as :class:`Adjoint` (one eps
    evaluation and one vector-Jacobian product per step). Recommended whenever N copies of the
    sample fit in memory."""

    name = "checkpoint"
    trajectory = "cache"
    scheme = "transpose"


@dataclass(frozen=True)
class Backprop:
    """Autograd through the sampling loop: exact, but memory grows with N times the network's
    activations. For a few steps of a small network, or as a reference."""

    name = "backprop"


GradMethod = Union[Adjoint, Checkpoint, Backprop]
SHORTCUTS = {"adjoint": Adjoint, "checkpoint": Checkpoint, "backprop": Backprop}
GRAD_MODES = (None, *SHORTCUTS)


def resolve_grad(grad: str | GradMethod | None, trajectory: str | None = None,
                 scheme: str | None = None) -> GradMethod | None:
    """The gradient method for ``sample(grad=..., trajectory=..., scheme=...)``.

    ``trajectory`` and ``scheme`` refine the ``"adjoint"`` shortcut only; with any other
    ``grad`` they are refused rather than ignored."""
    if isinstance(grad, (Adjoint, Checkpoint, Backprop)) or grad is None:
        method = grad
    elif isinstance(grad, str) and grad in SHORTCUTS:
        if grad == "adjoint":
            return Adjoint(trajectory=trajectory or "backsolve", scheme=scheme or "transpose")
        method = SHORTCUTS[grad]()
    else:
        raise ValueError(f"grad must be None, one of {tuple(SHORTCUTS)} or an Adjoint(), Checkpoint() "
                         f"or Backprop() instance, got {grad!r}")
    for arg, value in (("trajectory", trajectory), ("scheme", scheme)):
        if value is not None:
            raise ValueError(f"{arg}= applies to grad='adjoint' only (got grad={grad!r}); "
                             f"pass grad=Adjoint({arg}={value!r}) instead")
    return method
