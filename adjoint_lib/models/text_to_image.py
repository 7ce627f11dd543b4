"""A text-to-image diffusion model as one object: the interface MiniSD's tools and the paper's
tasks share. :class:`TaskModel` ``encode``s prompts, draws seeded noise, ``generate``s images
through :func:`adjoint_lib.sample` (classifier-free guidance against the empty prompt) and
``decode``s latents; what a profile brings beyond the diffusion model (MiniSD's judges and
vocabulary, Stable Diffusion's pipeline) is its typed :class:`Profile`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..adjoint import SampleStats, sample
from ..schedule import VPSchedule
from .diffusers_eps import UNetEps

Tensor = torch.Tensor

__all__ = ["Profile", "TaskModel", "ScaledHalfGrad", "seeded_noise", "check_vocabulary"]


def check_vocabulary(prompt: str, vocabulary: Sequence[str], extra_words: Iterable[str] = (),
                     max_length: int | None = None, model_name: str = "the model") -> list[str]:
    """The prompt's words, each checked to be in ``vocabulary`` or ``extra_words`` (e.g. tokens
    added by textual inversion); ``ValueError`` naming the unknown words and listing the known ones."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words, extra_words = prompt.lower().split(), list(extra_words)
    allowed = set(vocabulary) | {w.lower() for w in extra_words}
    unknown = [w for w in words if w not in allowed]
    if unknown:
        raise ValueError(f"prompt {prompt!r} has word(s) outside the {model_name} vocabulary: {unknown}. "
                         f"Known words: {' '.join(vocabulary)}"
                         + (f" (+ added tokens: {' '.join(sorted(extra_words))})" if extra_words else ""))
    if max_length is not None and len(words) + 2 > max_length:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {max_length - 2} fit")
    return words


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Standard normal noise (B, *shape), float32; item i depends only on ``seeds[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@dataclass(frozen=True)
class Profile:
    """What a profile brings beyond the diffusion model.

    ``name``: ``"mini"`` or ``"sd"``; ``judges``: MiniSD's judge networks (digit, style,
    auditee; ``None`` on sd); ``vocabulary``: the words prompts may use (``None``: any);
    ``pipe``: the diffusers pipeline the sd components came from; ``tiny``: random tiny sd
    components (CI), whose metric networks default to tiny random ones too.
    """

    name: str
    judges: Any | None = None
    vocabulary: tuple[str, ...] | None = None
    pipe: Any | None = None
    tiny: bool = False

    @property
    def is_mini(self) -> bool:
        """Whether this is the ``mini`` profile (MiniSD)."""
        return self.name == "mini"


class ScaledHalfGrad:
    """Carry a float32 gradient through a half-precision network without underflow.

    ``exit(y)`` returns ``y.float()``; in the backward pass it scales the incoming gradient ``g``
    to ``g / max|g|`` before casting it to half precision (pixel-MSE gradients of ~1e-7 per
    element are below float16's normal range and would round to zero). ``enter(v, dtype)``
    returns ``v`` cast to ``dtype``; its backward multiplies the gradient that arrives by the
    recorded ``max|g|`` in float32. Between the two the network is linear in its cotangent, so
    the result is the exact gradient, computed at unit scale."""

    def __init__(self) -> None:
        self.scale: Tensor | None = None

    def exit(self, y: Tensor) -> Tensor:
        """``y`` in float32; backward: the incoming gradient scaled to unit max-norm."""
        return _Exit.apply(y, self)

    def enter(self, v: Tensor, dtype: torch.dtype) -> Tensor:
        """``v`` cast to ``dtype``; backward: the gradient scaled back in float32."""
        return _Enter.apply(v, dtype, self)


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, holder: ScaledHalfGrad) -> Tensor:
        ctx.holder, ctx.dtype = holder, y.dtype
        return y.float()

    @staticmethod
    def backward(ctx, g: Tensor):
        m = g.detach().abs().amax().float()
        m = torch.where(m > 0, m, torch.ones_like(m))
        ctx.holder.scale = m
        return (g.float() / m).to(ctx.dtype), None


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, dtype: torch.dtype, holder: ScaledHalfGrad) -> Tensor:
        ctx.holder, ctx.dtype = holder, v.dtype
        return v.to(dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        scale = ctx.holder.scale if ctx.holder.scale is not None else 1.0
        return g.to(ctx.dtype) * scale, None, None


@dataclass
class TaskModel:
    """A text-to-image diffusion model as the tasks see it.

    ``latent_shape``: shape of one ``x_T``; ``vae``: ``None`` in pixel space;
    ``guidance_scale``: default classifier-free guidance; ``spec``: the :class:`Profile`.
    Text embeddings, images and losses are float32 whatever the networks' dtype.
    """

    spec: Profile
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    schedule: VPSchedule
    vae: torch.nn.Module | None
    latent_shape: tuple[int, ...]
    guidance_scale: float
    max_length: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def profile(self) -> str:
        """The profile's name, ``"mini"`` or ``"sd"``."""
        return self.spec.name

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype (the networks may be half precision; the tasks' tensors are float32)."""
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ text
    def check_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as a list; with a profile vocabulary (mini) every word must be in it (or
        a token added to the tokenizer, e.g. by textual inversion): ``ValueError`` naming the
        unknown words and listing the known ones otherwise."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if self.spec.vocabulary is not None:
            specials = set(self.tokenizer.all_special_tokens)
            added = [t for t in self.tokenizer.get_added_vocab() if t not in specials]
            for p in prompts:
                check_vocabulary(p, self.spec.vocabulary, added, self.max_length,
                                 "MiniSD" if self.spec.is_mini else "the model")
        return prompts

    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        """Token ids (B, max_length), padded as Stable Diffusion pads (prompts checked by
        :meth:`check_prompts`)."""
        return self.tokenizer(self.check_prompts(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode(self, prompts: Sequence[str], token_vectors: dict[int, Tensor] | None = None) -> Tensor:
        """Text embeddings (B, L, D), float32, of ``prompts``. ``token_vectors`` maps token ids
        to input embeddings that replace the lookup table's rows for this call (how a new token
        is learned: gradients flow through the text encoder into those vectors; through a
        half-precision encoder they travel scaled to unit max-norm, see :class:`ScaledHalfGrad`)."""
        ids = self.token_ids(prompts)
        if not token_vectors:
            return self.text_encoder(ids)[0].float()
        half = next(self.text_encoder.parameters()).dtype in (torch.float16, torch.bfloat16)
        scale = ScaledHalfGrad() if half else None

        def swap(module: torch.nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            for tid, vec in token_vectors.items():
                v = scale.enter(vec, out.dtype) if scale is not None else vec.to(out.dtype)
                out = torch.where((inputs[0] == tid)[..., None], v, out)
            return out

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            out = self.text_encoder(ids)[0]
        finally:
            handle.remove()
        return scale.exit(out) if scale is not None else out.float()

    def null(self) -> Tensor:
        """Embedding of the empty prompt (1, L, D), for classifier-free guidance."""
        with torch.no_grad():
            return self.encode([""])

    # ------------------------------------------------------------------ images
    def noise(self, seeds: Sequence[int]) -> Tensor:
        """x_T (B, *latent_shape), float32; item i depends only on ``seeds[i]``."""
        return seeded_noise(seeds, self.latent_shape).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W), float32: identity in pixel space, the VAE otherwise."""
        if self.vae is None:
            return latents
        scale = getattr(self.vae.config, "scaling_factor", 0.18215)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / scale).to(dtype)).sample.float()

    def eps_fn(self, guidance_scale: float | None = None) -> UNetEps:
        """The guided ``eps_fn(x, t, cond)`` of this model for :func:`adjoint_lib.sample` (v-prediction turned into eps)."""
        return UNetEps(self.unet, schedule=self.schedule,
                       guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
                       prediction_type=self.scheduler.config.get("prediction_type", "epsilon"))

    def generate(self, x_T: Tensor, cond: Tensor, *, steps: int | None = 20, order: int = 2,
                 grad: str | None = None, params: Sequence[Tensor] = (), guidance_scale: float | None = None,
                 stats: SampleStats | None = None, decode: bool = True, **kwargs: Any) -> Tensor:
        """Sample from ``x_T`` with text embeddings ``cond`` (guidance against the null
        prompt) through :func:`adjoint_lib.sample`, then decode. Gradients reach ``x_T``,
        ``cond`` and ``params`` according to ``grad``. ``timesteps=`` (an explicit grid)
        replaces ``steps``."""
        if kwargs.get("timesteps") is not None:
            steps = None
        x0 = sample(self.eps_fn(guidance_scale), x_T, (cond, self.null()), schedule=self.schedule,
                    steps=steps, order=order, grad=grad, params=params, stats=stats, **kwargs)
        return self.decode(x0) if decode else x0

    @torch.no_grad()
    def render(self, prompts: Sequence[str], x_T: Tensor, *, batch_size: int, steps: int | None = 20,
               order: int = 2, guidance_scale: float | None = None,
               token_vectors: dict[int, Tensor] | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] of ``prompts`` from noises ``x_T``, generated
        ``batch_size`` at a time, without gradients."""
        prompts = list(prompts)
        if len(prompts) != x_T.shape[0]:
            raise ValueError(f"{len(prompts)} prompts but {x_T.shape[0]} noises: they must match")
        out = []
        for i in range(0, len(prompts), batch_size):
            cond = self.encode(prompts[i:i + batch_size], token_vectors=token_vectors)
            out.append(self.generate(x_T[i:i + batch_size], cond, steps=steps, order=order,
                                     guidance_scale=guidance_scale).float())
        return torch.cat(out)
