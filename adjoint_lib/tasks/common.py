"""One interface over the two profiles the paper tasks run on.

``mini``: MiniSD (pixel space, 3x16x16, shipped in ``data/mini``). ``sd``: Stable Diffusion
by hub id, local folder or single-file checkpoint (latent space, decoded by the VAE inside the
loss; see :mod:`.loading`), or ``tiny`` components built from configs with random weights (the
CI path of ``sd``). Task code only talks to a :class:`TaskModel`: ``encode`` prompts,
``generate`` images through :func:`adjoint_lib.sample`, ``decode`` latents; what a profile
brings beyond the diffusion model (MiniSD's judges and vocabulary, SD's pipeline) is its typed
:class:`Profile`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..adjoint import SampleStats, sample
from ..models.diffusers_eps import UNetEps
from ..paths import profile as resolve_profile
from ..schedule import VPSchedule
from .loading import (SD_MODEL_ID, TINY, freeze, load_pipeline, resolve_device, resolve_dtype,  # noqa: F401
                      sd_model_id)

Tensor = torch.Tensor


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
        return _Exit.apply(y, self)

    def enter(self, v: Tensor, dtype: torch.dtype) -> Tensor:
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
            from ..models.mini import check_prompt

            specials = set(self.tokenizer.all_special_tokens)
            added = [t for t in self.tokenizer.get_added_vocab() if t not in specials]
            for p in prompts:
                check_prompt(p, added)
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
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W), float32: identity in pixel space, the VAE otherwise."""
        if self.vae is None:
            return latents
        scale = getattr(self.vae.config, "scaling_factor", 0.18215)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / scale).to(dtype)).sample.float()

    def eps_fn(self, guidance_scale: float | None = None) -> UNetEps:
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


# ---------------------------------------------------------------------- loaders
def load_mini(path: str | os.PathLike | None = None, device: str | torch.device | None = "cpu") -> TaskModel:
    """MiniSD from ``data/mini`` (or ``path``) with its judges and vocabulary in the profile."""
    from ..models import mini

    m = mini.load(path)
    device = torch.device(device or "cpu")
    modules = [m.text_encoder, m.unet] + ([m.judges.auditee, m.judges.digit, m.judges.style] if m.judges else [])
    for mod in modules:
        mod.to(device)
    return TaskModel(Profile("mini", judges=m.judges, vocabulary=tuple(mini.VOCABULARY)), m.tokenizer,
                     m.text_encoder, m.unet, m.scheduler, m.schedule, None, mini.IMAGE_SHAPE,
                     mini.GUIDANCE_SCALE, mini.MAX_LENGTH, device=device)


def tiny_resnet_config(**kwargs: Any):
    """A two-stage ``ResNetConfig`` with 8 and 16 channels (CI stand-in for ResNet-50)."""
    from transformers import ResNetConfig

    return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                        layer_type="basic", **kwargs)


def tiny_sd_components(seed: int = 0) -> dict[str, Any]:
    """Stable Diffusion's component classes at toy size with random weights (offline; the way
    diffusers' own tests build pipelines), keyed as ``StableDiffusionPipeline`` takes them:
    UNet2DConditionModel on 4x8x8 latents, AutoencoderKL to 3x16x16 images, CLIPTextModel,
    MiniSD's CLIPTokenizer files and a DDIM scheduler with SD's betas."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..paths import data_dir

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(data_dir("mini", "tokenizer"), local_files_only=True)
    if len(tokenizer) <= 2:
        raise RuntimeError("the tokenizer in data/mini/tokenizer loaded empty")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    freeze(text_encoder, unet, vae)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def from_components(c: dict[str, Any], spec: Profile, *, device: torch.device = torch.device("cpu"),
                    guidance_scale: float = 7.5) -> TaskModel:
    """A :class:`TaskModel` from a pipeline's components (``pipe.components``)."""
    from diffusers import DDIMScheduler

    if c.get("text_encoder_2") is not None:
        raise ValueError("SDXL pipelines (two text encoders) are supported by UNetEps and adjoint_lib.sample "
                         "(added_cond_kwargs), not by the task models: pass an SD 1.x/2.x model")
    scheduler = DDIMScheduler.from_config(c["scheduler"].config)
    unet, tok = c["unet"], c["tokenizer"]
    if len(tok) <= 2:  # a CLIPTokenizer whose files are missing can load empty without an error
        raise ValueError(f"the tokenizer loaded empty ({len(tok)} tokens): its files are missing or unreadable")
    size = unet.config.sample_size
    max_length = min(tok.model_max_length, c["text_encoder"].config.max_position_embeddings)
    return TaskModel(spec, tok, c["text_encoder"], unet, scheduler, VPSchedule.from_diffusers(scheduler), c["vae"],
                     (unet.config.in_channels, size, size), guidance_scale, max_length, device=device)


def build_tiny_sd(seed: int = 0) -> TaskModel:
    """The ``sd`` profile on :func:`tiny_sd_components` (CI; no download)."""
    return from_components(tiny_sd_components(seed), Profile("sd", tiny=True))


def load_sd(model_id: str | None = None, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> TaskModel:
    """Stable Diffusion by hub id, local diffusers folder or single-file checkpoint (default
    ``$ADJOINTDPM_SD_MODEL``, else :data:`SD_MODEL_ID`); ``"tiny"`` builds random tiny
    components (CI). UNet and text encoder in ``dtype`` (``"auto"``: bfloat16/float16 on CUDA,
    float32 on the CPU), the VAE in float32. A failed load raises one ``RuntimeError`` saying
    what was tried and the ways out, instead of hanging on the hub."""
    model_id = sd_model_id(model_id)
    dev = resolve_device(device)
    if model_id == TINY:
        model = build_tiny_sd()
        return to_device(model, dev, resolve_dtype(dtype, dev) if dtype is not None else torch.float32)
    dt = resolve_dtype(dtype, dev)
    pipe = load_pipeline(model_id, dt)
    c = pipe.components
    model = from_components(c, Profile("sd", pipe=pipe))
    if dev.type == "cuda" and hasattr(model.vae, "enable_gradient_checkpointing"):
        model.vae.enable_gradient_checkpointing()  # 512x512 decoder activations recomputed in backward (T4: 15 GB)
    return to_device(model, dev, dt)


def to_device(model: TaskModel, device: torch.device, dtype: torch.dtype) -> TaskModel:
    """Move ``model`` to ``device``: UNet and text encoder in ``dtype``, the VAE in float32."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "modules that should be kept in float32: []": none here
    try:
        for module, want in ((model.unet, dtype), (model.text_encoder, dtype), (model.vae, torch.float32)):
            if module is not None:
                module.to(device)
                if next(module.parameters()).dtype != want:
                    module.to(want)
    finally:
        dlogging.set_verbosity(level)
    freeze(model.unet, model.text_encoder, model.vae)
    model.device = device
    return model


def load_task_model(profile: str | None = None, model_id: str | None = None, *, device: str | None = None,
                    dtype: str | None = None, mini_path: str | None = None) -> TaskModel:
    """``mini`` or ``sd`` (default: ``$ADJOINTDPM_PROFILE``, else ``sd`` with CUDA, else ``mini``)."""
    name = resolve_profile(profile)
    if name == "mini":
        if dtype not in (None, "auto", "float32", torch.float32):
            raise ValueError(f"the mini profile runs in float32 (got dtype={dtype!r})")
        return load_mini(mini_path, device=device or "cpu")
    return load_sd(model_id, device=device, dtype=dtype)


@dataclass
class TaskResult:
    """What a task's ``run`` returns: ``metrics`` (JSON-ready, rounded) and ``artifacts``
    (tensors and results for plots). Unpacks as ``metrics, artifacts = run(...)``."""

    metrics: dict
    artifacts: dict

    def __iter__(self):
        return iter((self.metrics, self.artifacts))
