"""A diffusers UNet as an ``eps_fn(x, t, cond)`` for :func:`adjoint_lib.sample`.

Classifier-free guidance: ``eps = eps_u + w (eps_c - eps_u)``; v-prediction:
``eps = alpha_t v + sigma_t x``. Both are part of eps, so gradients reach the
conditioning and the weights through them.
"""
from __future__ import annotations

from typing import Any

import torch

from ..schedule import VPSchedule

Tensor = torch.Tensor


class UNetEps:
    """Wrap a diffusers ``UNet2DConditionModel`` (or an unconditional ``UNet2DModel``).

    Args:
        unet: the diffusers UNet (any dtype/device; inputs are cast to it and eps is
            returned in the input dtype, so the adjoint can accumulate in float32).
        schedule: needed for ``prediction_type="v_prediction"``.
        guidance_scale: classifier-free guidance weight ``w`` (1 = no guidance).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (read it from the
            scheduler's config: ``scheduler.config.prediction_type``).

    ``cond`` is ``None`` (unconditional UNet), a tensor of encoder hidden states
    (B or 1, L, D), or a tuple ``(cond, uncond)`` for guidance.
    """

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule | None = None,
                 guidance_scale: float = 1.0, prediction_type: str = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if prediction_type == "v_prediction" and schedule is None:
            raise ValueError("v_prediction needs the schedule to convert v to eps")
        self.unet, self.schedule = unet, schedule
        self.guidance_scale, self.prediction_type = float(guidance_scale), prediction_type

    def _unet(self, x: Tensor, t: Tensor, emb: Tensor | None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        if emb is None:
            return self.unet(x.to(dtype), t).sample
        return self.unet(x.to(dtype), t, encoder_hidden_states=emb.to(dtype)).sample

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(b) if torch.as_tensor(t).ndim == 0 else t
        if isinstance(cond, (tuple, list)):
            c, u = cond
            c = c.expand(b, *c.shape[1:]) if c.shape[0] == 1 else c
            if self.guidance_scale == 1.0:
                out = self._unet(x, t, c)
            else:
                u = u.expand(b, *u.shape[1:])
                out_u, out_c = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
                out = out_u + self.guidance_scale * (out_c - out_u)
        else:
            if self.guidance_scale != 1.0:
                raise ValueError("guidance_scale != 1 needs cond=(cond, uncond)")
            if cond is not None and cond.shape[0] == 1:
                cond = cond.expand(b, *cond.shape[1:])
            out = self._unet(x, t, cond)
        out = out.to(x.dtype)
        if self.prediction_type == "v_prediction":
            shape = (b,) + (1,) * (x.ndim - 1)
            alpha = self.schedule.alpha(t.double()).to(x.dtype).view(shape)
            sigma = self.schedule.sigma(t.double()).to(x.dtype).view(shape)
            out = alpha * out + sigma * x
        return out
