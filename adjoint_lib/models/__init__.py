"""eps-function adapters: diffusers UNets (+ guidance, v-prediction), the toy 2-D MLP,
the closed-form Gaussian model, and MiniSD (``adjoint_lib.models.mini``)."""
from .analytic import GaussianEps
from .diffusers_eps import UNetEps
from .toy import ToyEps

__all__ = ["UNetEps", "GaussianEps", "ToyEps"]
