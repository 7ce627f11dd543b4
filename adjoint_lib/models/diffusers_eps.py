"""A diffusers UNet as an ``eps_fn(x, t, cond)`` for :func:`adjoint_lib.sample`.

Classifier-free guidance: ``eps = eps_u + w (eps_c - eps_u)``; v-prediction:
``eps = alpha_t v + sigma_t x``. Both are part of eps, so gradients reach the
conditioning and the weights through them. SDXL's added conditioning (pooled text
embeddings and ``time_ids``) rides along in ``cond`` the same way.
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
        time_ids: SDXL (``addition_embed_type="text_time"``): the (1 or B, 6) size and crop
            conditioning ``(H, W, top, left, H, W)``, constant during sampling.

    ``cond`` is ``None`` (unconditional UNet), a tensor of encoder hidden states
    (B or 1, L, D), or a tuple ``(cond, uncond)`` for guidance. For SDXL it is
    ``(cond, pooled)`` without guidance or ``(cond, uncond, pooled, pooled_uncond)`` with it
    (pooled: (B or 1, D_pool), passed as ``added_cond_kwargs["text_embeds"]``). Every
    conditioning tensor has batch size 1 (broadcast) or B.
    """

    def __init__(self, unet: torch.nn.Module, schedule: VPSchedule | None = None,
                 guidance_scale: float = 1.0, prediction_type: str = "epsilon",
                 time_ids: Tensor | None = None) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if prediction_type == "v_prediction" and schedule is None:
            raise ValueError("v_prediction needs the schedule to convert v to eps")
        config = getattr(unet, "config", None)
        self.sdxl = getattr(config, "addition_embed_type", None) == "text_time"
        if self.sdxl and time_ids is None:
            raise ValueError("this UNet has SDXL's added conditioning (addition_embed_type='text_time'): pass "
                             "time_ids=(1 or B, 6) and cond=(cond, pooled) or (cond, uncond, pooled, pooled_uncond)")
        self.unet, self.schedule, self.time_ids = unet, schedule, time_ids
        self.guidance_scale, self.prediction_type = float(guidance_scale), prediction_type

    def _unet(self, x: Tensor, t: Tensor, emb: Tensor | None, pooled: Tensor | None = None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        if emb is None:
            return self.unet(x.to(dtype), t).sample
        kwargs = {}
        if self.sdxl:
            time_ids = _batch(self.time_ids.to(x.device), x.shape[0], "time_ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=emb.to(dtype), **kwargs).sample

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if self.sdxl:
            out = self._sdxl(x, t, cond)
        elif isinstance(cond, (tuple, list)):
            if len(cond) != 2:
                raise ValueError(f"cond must be a tensor or a pair (cond, uncond), got a {len(cond)}-tuple")
            c, u = _batch(cond[0], b, "cond"), cond[1]
            if self.guidance_scale == 1.0:
                out = self._unet(x, t, c)
            else:
                u = _batch(u, b, "uncond")
                out_u, out_c = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
                out = out_u + self.guidance_scale * (out_c - out_u)
        else:
            if self.guidance_scale != 1.0:
                raise ValueError("guidance_scale != 1 needs cond=(cond, uncond)")
            out = self._unet(x, t, None if cond is None else _batch(cond, b, "cond"))
        out = out.to(x.dtype)
        if self.prediction_type == "v_prediction":
            shape = (b,) + (1,) * (x.ndim - 1)
            tt = t.double() if t.device.type != "mps" else t.float()  # the schedule follows t's device
            alpha = self.schedule.alpha(tt).to(x.dtype).view(shape)
            sigma = self.schedule.sigma(tt).to(x.dtype).view(shape)
            out = alpha * out + sigma * x
        return out

    def _sdxl(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        b = x.shape[0]
        if not isinstance(cond, (tuple, list)) or len(cond) not in (2, 4):
            raise ValueError("an SDXL UNet needs cond=(cond, pooled) or (cond, uncond, pooled, pooled_uncond)")
        if len(cond) == 2:
            if self.guidance_scale != 1.0:
                raise ValueError("guidance_scale != 1 needs cond=(cond, uncond, pooled, pooled_uncond)")
            return self._unet(x, t, _batch(cond[0], b, "cond"), _batch(cond[1], b, "pooled"))
        c, u, pc, pu = cond
        c, pc = _batch(c, b, "cond"), _batch(pc, b, "pooled")
        if self.guidance_scale == 1.0:
            return self._unet(x, t, c, pc)
        u, pu = _batch(u, b, "uncond"), _batch(pu, b, "pooled_uncond")
        out_u, out_c = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c]),
                                  torch.cat([pu, pc])).chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


def _batch(c: Tensor, b: int, name: str) -> Tensor:
    """``c`` with batch size ``b`` (a batch of 1 is broadcast); ``ValueError`` naming it otherwise."""
    if c.shape[0] == b:
        return c
    if c.shape[0] == 1:
        return c.expand(b, *c.shape[1:])
    raise ValueError(f"{name} has batch size {c.shape[0]} but x has {b}: pass 1 (shared) or {b} (one per sample)")
