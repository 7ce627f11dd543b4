"""Rectified-flow (flow-matching) velocity models as an ``eps_fn``, and sampling from pure noise.

On the path ``x_s = (1 - s) x_0 + s eps`` (:class:`~adjoint_lib.schedule.FlowSchedule`,
``s = t / T``) a network predicts the velocity ``v = eps - x_0 = dx/ds`` (SD3, FLUX), so

    eps = x + (1 - s) v,        x_0 = x - s v,

and the reparameterized ODE ``dy/drho = eps`` of :func:`adjoint_lib.sample` applies unchanged.
Classifier-free guidance ``v = v_u + w (v_c - v_u)`` is affine in ``v``, hence the same as
guiding eps. At ``s = 1`` (``alpha = 0``, ``rho = inf``) eps is just ``x`` and carries no
information about ``v``: the first step from pure noise needs the data prediction
(:func:`sample_flow`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..adjoint import SampleStats, model_timesteps, sample
from ..schedule import FlowSchedule, GaussianSchedule

Tensor = torch.Tensor


def _kind(model: Any) -> str:
    """``"sd3"``, ``"flux"`` (diffusers transformers) or ``"callable"``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    return "flux" if isinstance(model, FluxTransformer2DModel) else "callable"


def _flux_pack(x: Tensor) -> Tensor:
    """FluxPipeline's ``_pack_latents``: (B, C, H, W) -> (B, H/2 * W/2, 4 C) tokens of 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`_flux_pack`."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _flux_image_ids(h: int, w: int, like: Tensor) -> Tensor:
    """FluxPipeline's ``_prepare_latent_image_ids``: (H/2 * W/2, 3) rows ``[0, row, column]``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=like.device, dtype=like.dtype)


class FlowEps:
    """A velocity model on the rectified-flow path as ``eps_fn(x, t, cond)`` for :func:`adjoint_lib.sample`.

    ``eps = x + (1 - s) v`` with ``s = schedule.sigma(t)``; :meth:`data_prediction` gives
    ``x_0 = x - s v`` (finite at ``s = 1``, where :func:`sample_flow` needs it).

    Args:
        model: a diffusers ``SD3Transformer2DModel`` (called as ``model(hidden_states=x,
            timestep=t, encoder_hidden_states=e, pooled_projections=p)``, timestep ``t = 1000 s``
            as in ``StableDiffusion3Pipeline``), a ``FluxTransformer2DModel`` (latents ``x`` of
            shape (B, C, H, W) are packed into 2x2-patch tokens with position ids and the
            timestep ``s``, as in ``FluxPipeline``), or any callable ``model(x, t, *cond) -> v``
            (e.g. the 2-D toy MLP of :mod:`adjoint_lib.flow2d`).
        schedule: the :class:`FlowSchedule` (``FlowSchedule.from_diffusers(scheduler)``).
        guidance_scale: classifier-free guidance weight ``w`` (1 = none; FluxPipeline's
            ``true_cfg_scale``).
        flux_guidance: the distilled guidance a FLUX transformer with ``guidance_embeds`` takes
            as an input (FluxPipeline's ``guidance_scale``, e.g. 3.5 for FLUX.1-dev).

    ``cond``: for SD3 and FLUX ``(prompt_embeds, pooled_prompt_embeds)`` - the text encoders'
    outputs, whose gradient flows - and with guidance ``(prompt_embeds, pooled,
    negative_embeds, negative_pooled)``; for a callable ``None``, a tensor ``c`` or, with
    guidance, ``(c, u)`` (with ``guidance_scale = 1`` the unconditional half is ignored).
    Batch-1 conditioning is broadcast. The network runs in its own dtype; eps comes back in
    the dtype of ``x``.
    """

    def __init__(self, model: Callable, schedule: FlowSchedule, guidance_scale: float = 1.0,
                 flux_guidance: float | None = None) -> None:
        if not isinstance(schedule, FlowSchedule):
            raise TypeError("schedule must be an adjoint_lib.FlowSchedule (FlowSchedule.from_diffusers(scheduler)): "
                            "eps = x + (1 - s) v holds on the rectified-flow path only")
        if not callable(model):
            raise TypeError("model must be an SD3 or FLUX transformer or a callable model(x, t, *cond) -> v")
        self.model, self.schedule, self.guidance_scale = model, schedule, float(guidance_scale)
        self._kind = _kind(model)
        self._per = 1 if self._kind == "callable" else 2  # conditioning tensors per branch
        if self._kind == "flux" and model.config.guidance_embeds and flux_guidance is None:
            raise ValueError("this FLUX transformer embeds a distilled guidance: pass flux_guidance= "
                             "(FluxPipeline's guidance_scale, e.g. 3.5)")
        self.flux_guidance = flux_guidance

    # ------------------------------------------------------------------ network
    def _dtype(self, x: Tensor) -> torch.dtype:
        params = getattr(self.model, "parameters", None)
        p = next(params(), None) if callable(params) else None
        return p.dtype if p is not None else x.dtype

    def _net(self, x: Tensor, t: Tensor, parts: Sequence[Tensor]) -> Tensor:
        dtype = self._dtype(x)
        x, parts = x.to(dtype), [c.to(dtype) for c in parts]
        if self._kind == "sd3":
            return self.model(hidden_states=x, timestep=t, encoder_hidden_states=parts[0],
                              pooled_projections=parts[1], return_dict=False)[0]
        if self._kind == "flux":
            h, w = x.shape[-2:]
            if x.ndim != 4 or h % 2 or w % 2:
                raise ValueError(f"FLUX latents must be (B, C, H, W) with even H and W, got {tuple(x.shape)}")
            guidance = (torch.full((x.shape[0],), float(self.flux_guidance), device=x.device, dtype=torch.float32)
                        if self.model.config.guidance_embeds else None)
            out = self.model(hidden_states=_flux_pack(x), timestep=t.to(dtype) / self.schedule.t_max,
                             guidance=guidance, pooled_projections=parts[1], encoder_hidden_states=parts[0],
                             txt_ids=torch.zeros(parts[0].shape[1], 3, device=x.device, dtype=dtype),
                             img_ids=_flux_image_ids(h, w, x), return_dict=False)[0]
            return _flux_unpack(out, h, w)
        return self.model(x, t, *parts)

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The (guided) velocity ``v = v_u + w (v_c - v_u)``, in the dtype of ``x``."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        parts = [] if cond is None else [cond] if isinstance(cond, Tensor) else list(cond)
        parts = [c.expand(b, *c.shape[1:]) if c.shape[0] == 1 else c for c in parts]
        per = self._per
        if len(parts) not in ((0,) if per == 1 else ()) + (per, 2 * per) or (self.guidance_scale != 1.0 and len(parts) != 2 * per):
            want = ("(prompt_embeds, pooled), or with guidance (prompt_embeds, pooled, negative_embeds, "
                    "negative_pooled)") if per == 2 else "None or c, or with guidance (c, u)"
            raise ValueError(f"cond must be {want}; got {len(parts)} tensor(s) with "
                             f"guidance_scale={self.guidance_scale:g}")
        if self.guidance_scale == 1.0:
            return self._net(x, t, parts[:per]).to(x.dtype)
        both = [torch.cat([u, c]) for c, u in zip(parts[:per], parts[per:])]
        v_u, v_c = self._net(torch.cat([x, x]), torch.cat([t, t]), both).to(x.dtype).chunk(2)
        return v_u + self.guidance_scale * (v_c - v_u)

    # ------------------------------------------------------------------ conversions
    def _s(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        s = self.schedule.sigma(t.double()).to(x.dtype)
        return s.view((-1,) + (1,) * (x.ndim - 1)) if s.ndim else s

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``eps = x + (1 - s) v``."""
        return x + (1.0 - self._s(t, x)) * self.velocity(x, t, cond)

    def data_prediction(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``x_0 = x - s v``."""
        return x - self._s(t, x) * self.velocity(x, t, cond)


# ---------------------------------------------------------------------- sampling from s = 1
def _first_step(eps_fn: Any, x_T: Tensor, cond: Any, schedule: GaussianSchedule, t0: float, rho1: float) -> Tensor:
    """``x_1 = alpha_1 x0_hat(x_T, t_0) + (sigma_1 / sigma_0) x_T``: the order-1 step from ``alpha_0 = 0``
    (the limit of Euler in rho, ``y_1 = y_0 + (rho_1 - rho_0) eps_0``, as ``rho_0 -> inf``)."""
    x0_hat = eps_fn.data_prediction(x_T, model_timesteps(t0, x_T), cond)
    a1 = float(schedule.alpha_of_rho(torch.tensor(rho1, dtype=torch.float64)))
    sigma0 = float(schedule.sigma(torch.tensor(t0, dtype=torch.float64)))
    return a1 * x0_hat.to(x_T.dtype) + (a1 * rho1 / sigma0) * x_T


def sample_flow(eps_fn: Any, x_T: Tensor, cond: Any = None, *, schedule: GaussianSchedule,
                steps: int | None = None, timesteps: Sequence[float] | Tensor | None = None,
                spacing: str = "shift", t_start: float | None = None, t_end: float | None = None,
                grad: str | None = None, params: Sequence[Tensor] = (), stats: SampleStats | None = None,
                **kwargs: Any) -> Tensor:
    """:func:`adjoint_lib.sample` for a grid that starts at pure noise, where ``alpha = 0``
    (a flow's ``s = 1``, e.g. ``FlowMatchEulerDiscreteScheduler``'s first timestep ``T``).

    There ``rho = inf`` and ``y = x / alpha`` is infinite, but the first step in
    data-prediction form is finite (it is Euler in ``s`` for a flow: ``x_T + (s_1 - 1) v``):

        x_1 = alpha_1 x0_hat(x_T, T) + (sigma_1 / sigma_0) x_T,

    with ``x0_hat`` from ``eps_fn.data_prediction`` (:class:`FlowEps`). Its gradient comes from
    autograd (one network evaluation's activations, whatever the number of steps); the
    remaining steps are ``sample()`` from ``t_1`` with the same ``order``, ``grad`` and
    ``params`` (their first step is order 1: a polynomial in lambda cannot use a node at
    ``lambda = -inf``). A grid that does not start at ``alpha = 0`` goes to ``sample()`` whole.

    Args: as :func:`adjoint_lib.sample` (``kwargs``: ``order``, ``trajectory``, ``scheme``,
        ``progress``); ``spacing`` defaults to ``"shift"``, the grid of diffusers'
        flow-matching Euler scheduler (uniform in ``s`` for ``shift = 1``). ``stats`` counts
        the first step in ``nfe_forward``.
    """
    common = dict(schedule=schedule, grad=grad, params=params, stats=stats, **kwargs)
    if timesteps is not None:
        full = torch.as_tensor(timesteps).to(torch.float64).flatten()
        if steps is not None:
            raise ValueError("give exactly one of steps= or timesteps=")
        if full.numel() == 0 or float(schedule.alpha(full[0])) > 0:
            return sample(eps_fn, x_T, cond, timesteps=timesteps, **common)
        rest = full[1:]
        t1 = float(rest[0]) if rest.numel() else None
        rho1 = float(schedule.rho(rest[0])) if rest.numel() else schedule.rho_end
    else:
        if steps is None:
            raise ValueError("give exactly one of steps= or timesteps=")
        full = schedule.timesteps(steps, spacing, t_start, t_end)
        if float(schedule.alpha(full[0])) > 0:
            return sample(eps_fn, x_T, cond, steps=steps, spacing=spacing, t_start=t_start, t_end=t_end, **common)
        t1, rho1 = float(full[1]), float(schedule.rho(full[1]))
        if steps == 1:
            t1 = None
    if not callable(getattr(eps_fn, "data_prediction", None)):
        raise TypeError("sampling from alpha = 0 needs eps_fn.data_prediction(x, t, cond) (eps alone does not "
                        "determine x_0 there): wrap a velocity model in adjoint_lib.models.FlowEps")
    if params and grad is None:
        raise ValueError("params were given but grad=None: pick a gradient mode")
    with torch.set_grad_enabled(grad is not None and torch.is_grad_enabled()):
        x1 = _first_step(eps_fn, x_T, cond, schedule, float(full[0]), rho1)
    if t1 is None:  # a single step, straight to the end
        if stats is not None:
            stats.mode, stats.steps, stats.nfe_forward, stats.nfe_backward = grad, 1, 1, 0
        return x1
    if timesteps is not None:
        out = sample(eps_fn, x1, cond, timesteps=rest, **common)
    else:
        out = sample(eps_fn, x1, cond, steps=steps - 1, spacing=spacing, t_start=t1, t_end=float(full[-1]), **common)
    if stats is not None:
        stats.steps += 1
        stats.nfe_forward += 1
    return out
