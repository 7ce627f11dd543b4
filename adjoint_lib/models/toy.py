"""A small MLP epsilon model for 2-D toy data (optionally conditioned on a vector)."""
from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


def time_features(t: Tensor, dim: int = 16, t_scale: float = 1000.0) -> Tensor:
    """Sinusoidal features of ``t / t_scale``: ``[sin(2^k pi s), cos(2^k pi s)]``-style, (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), half, dtype=t.dtype, device=t.device))
    ang = (t / t_scale)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class ToyEps(nn.Module):
    """``eps_theta(x, t, c)`` for ``x`` in R^2: an MLP on ``[x, time features, c]``.

    Args:
        cond_dim: size of the conditioning vector ``c`` (0: unconditional; ``cond`` ignored).
        hidden: width; depth: hidden layers.
    """

    def __init__(self, cond_dim: int = 0, hidden: int = 128, depth: int = 3, t_dim: int = 16) -> None:
        super().__init__()
        self.cond_dim, self.t_dim = cond_dim, t_dim
        dims = [2 + t_dim + cond_dim] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        feats = [x, time_features(t, self.t_dim)]
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"this ToyEps needs a conditioning vector of size {self.cond_dim}")
            feats.append(cond.expand(x.shape[0], self.cond_dim))
        return self.net(torch.cat(feats, dim=1))
