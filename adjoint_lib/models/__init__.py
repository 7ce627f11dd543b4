"""eps-function adapters: diffusers UNets (+ guidance, v-prediction), flow-matching velocity
models (SD3; ``FlowEps``), the toy 2-D MLP, the closed-form Gaussian model, and MiniSD
(``adjoint_lib.models.mini``)."""
from .analytic import GaussianEps
from .diffusers_eps import UNetEps
from .flow import FlowEps, sample_flow
from .toy import ToyEps

__all__ = ["UNetEps", "FlowEps", "sample_flow", "GaussianEps", "ToyEps"]
