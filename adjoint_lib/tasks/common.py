"""One interface over the two profiles the paper tasks run on.

``mini``: MiniSD (pixel space, 3x16x16, shipped in ``data/mini``). ``sd``: Stable Diffusion
1.x by model id (latent space, decoded by the VAE inside the loss), or ``tiny`` components
built from configs with random weights (the CI path of ``sd``). Task code only talks to a
:class:`TaskModel`: ``encode`` prompts, ``generate`` images through
:func:`adjoint_lib.sample`, ``decode`` latents.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..adjoint import SampleStats, sample
from ..models.diffusers_eps import UNetEps
from ..paths import profile as resolve_profile
from ..schedule import VPSchedule

Tensor = torch.Tensor
SD_MODEL_ID = "runwayml/stable-diffusion-v1-5"
TINY = "tiny"


@dataclass
class TaskModel:
    """A text-to-image diffusion model as the tasks see it.

    ``latent_shape``: shape of one ``x_T``; ``vae``: ``None`` in pixel space;
    ``guidance_scale``: default classifier-free guidance; ``extra``: profile-specific
    objects (MiniSD judges, ...).
    """

    profile: str
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
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ text
    def check_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as a list; on ``mini`` every word must be in MiniSD's vocabulary (or
        a token added to the tokenizer, e.g. by textual inversion): ``ValueError`` naming the
        unknown words and listing the known ones otherwise."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if self.profile == "mini":
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
        """Text embeddings (B, L, D) of ``prompts``. ``token_vectors`` maps token ids to
        input embeddings that replace the lookup table's rows for this call (how a new
        token is learned: gradients flow through the text encoder into those vectors)."""
        ids = self.token_ids(prompts)
        if not token_vectors:
            return self.text_encoder(ids)[0]

        def swap(module: torch.nn.Module, inputs: tuple, out: Tensor) -> Tensor:
            for tid, vec in token_vectors.items():
                out = torch.where((inputs[0] == tid)[..., None], vec.to(out.dtype), out)
            return out

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(swap)
        try:
            return self.text_encoder(ids)[0]
        finally:
            handle.remove()

    def null(self) -> Tensor:
        """Embedding of the empty prompt (1, L, D), for classifier-free guidance."""
        with torch.no_grad():
            return self.encode([""])

    # ------------------------------------------------------------------ images
    def noise(self, seeds: Sequence[int]) -> Tensor:
        """x_T (B, *latent_shape); item i depends only on ``seeds[i]``."""
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W): identity in pixel space, the VAE otherwise."""
        if self.vae is None:
            return latents
        scale = getattr(self.vae.config, "scaling_factor", 0.18215)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / scale).to(dtype)).sample.float()

    def eps_fn(self, guidance_scale: float | None = None) -> UNetEps:
        return UNetEps(self.unet, schedule=self.schedule,
                       guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
                       prediction_type=self.scheduler.config.get("prediction_type", "epsilon"))

    def generate(self, x_T: Tensor, cond: Tensor, *, steps: int = 20, order: int = 2,
                 grad: str | None = None, params: Sequence[Tensor] = (), guidance_scale: float | None = None,
                 stats: SampleStats | None = None, decode: bool = True, **kwargs: Any) -> Tensor:
        """Sample from ``x_T`` with text embeddings ``cond`` (guidance against the null
        prompt) through :func:`adjoint_lib.sample`, then decode. Gradients reach ``x_T``,
        ``cond`` and ``params`` according to ``grad``."""
        x0 = sample(self.eps_fn(guidance_scale), x_T, (cond, self.null()), schedule=self.schedule,
                    steps=steps, order=order, grad=grad, params=params, stats=stats, **kwargs)
        return self.decode(x0) if decode else x0


# ---------------------------------------------------------------------- loaders
def load_mini(path: str | os.PathLike | None = None) -> TaskModel:
    """MiniSD from ``data/mini`` (or ``path``) with its judges in ``extra["judges"]``."""
    from ..models import mini

    m = mini.load(path)
    return TaskModel("mini", m.tokenizer, m.text_encoder, m.unet, m.scheduler, m.schedule, None,
                     mini.IMAGE_SHAPE, mini.GUIDANCE_SCALE, mini.MAX_LENGTH,
                     extra={"judges": m.judges, "mini": m})


def build_tiny_sd(seed: int = 0) -> TaskModel:
    """Stable Diffusion's component classes at toy size with random weights (offline; the
    way diffusers' own tests build pipelines): UNet2DConditionModel on 4x8x8 latents,
    AutoencoderKL to 3x16x16 images, CLIPTextModel, and MiniSD's CLIPTokenizer files."""
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
    for m in (text_encoder, unet, vae):
        m.eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    return TaskModel("sd", tokenizer, text_encoder, unet, scheduler, VPSchedule.from_diffusers(scheduler),
                     vae, (4, 8, 8), 7.5, 16, extra={"tiny": True})


def load_sd(model_id: str = SD_MODEL_ID, device: str | None = None, dtype: torch.dtype | None = None) -> TaskModel:
    """Stable Diffusion 1.x by hub id or local path; the UNet and VAE in half precision on
    GPU (the adjoint accumulates in float32). ``model_id="tiny"`` builds random tiny
    components instead (CI). Raises a clear error when the weights are not available
    offline instead of hanging on the hub."""
    if model_id == TINY:
        return build_tiny_sd()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, safety_checker=None,
                                                       local_files_only=offline or os.path.isdir(model_id))
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not load Stable Diffusion {model_id!r}"
            + (" offline (HF_HUB_OFFLINE=1): it is not in the local Hugging Face cache. Download it once "
               "online, pass a local path, or use profile='mini'" if offline else "")
            + f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    pipe.to(device)
    for m in (pipe.text_encoder, pipe.unet, pipe.vae):
        m.eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size
    return TaskModel("sd", pipe.tokenizer, pipe.text_encoder, pipe.unet, scheduler,
                     VPSchedule.from_diffusers(scheduler), pipe.vae, (pipe.unet.config.in_channels, size, size),
                     7.5, pipe.tokenizer.model_max_length, device=torch.device(device), extra={"pipe": pipe})


def load_task_model(profile: str | None = None, model_id: str = SD_MODEL_ID) -> TaskModel:
    """``mini`` or ``sd`` (default: ``$ADJOINTDPM_PROFILE``, else ``sd`` with CUDA, else ``mini``)."""
    name = resolve_profile(profile)
    return load_mini() if name == "mini" else load_sd(model_id)


def task_cli(description: str, config_cls: type) -> argparse.ArgumentParser:
    """The flags every task command shares (profile, model, gradient mode, threads) plus one
    ``--some-setting`` per field of the task's config dataclass."""
    p = argparse.ArgumentParser(description=description + " Prints one JSON line of metrics.")
    p.add_argument("--profile", choices=("mini", "sd"), default=None)
    p.add_argument("--model-id", default=SD_MODEL_ID, help="sd: hub id or local path ('tiny': random CI model)")
    p.add_argument("--mini-path", default=None, help="mini: folder of the MiniSD model (default data/mini)")
    p.add_argument("--grad", default="adjoint", choices=("adjoint", "checkpoint", "backprop"))
    p.add_argument("--threads", type=int, default=None)
    for f in dataclasses.fields(config_cls):  # every setting, e.g. --iterations 30 --lr 0.05
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    return p


def task_from_cli(a: argparse.Namespace, config_cls: type, default_config: Callable[..., Any]) -> tuple[TaskModel, Any]:
    """Threads, model and config from parsed :func:`task_cli` flags (unset settings keep the
    profile's defaults)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    name = resolve_profile(a.profile)
    model = load_mini(a.mini_path) if name == "mini" else load_sd(a.model_id)
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(config_cls)
                 if getattr(a, f.name, None) is not None}
    return model, default_config(model.profile, **overrides)
