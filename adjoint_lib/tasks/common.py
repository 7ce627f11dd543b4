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
from dataclasses import dataclass
from typing import Any

import torch

from ..models.text_to_image import Profile, ScaledHalfGrad, TaskModel  # noqa: F401 (the tasks' interface)
from ..paths import profile as resolve_profile
from ..schedule import VPSchedule
from .loading import (SD_MODEL_ID, TINY, freeze, load_pipeline, resolve_device, resolve_dtype,  # noqa: F401
                      sd_model_id)

Tensor = torch.Tensor


# ---------------------------------------------------------------------- loaders
def load_mini(path: str | os.PathLike | None = None, device: str | torch.device | None = "cpu") -> TaskModel:
    """MiniSD from ``data/mini`` (or ``path``) with its judges and vocabulary in the profile."""
    from ..models import mini

    return mini.task_model(mini.load(path), device=device)


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
