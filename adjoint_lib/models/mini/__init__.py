"""MiniSD: a small text-to-image diffusion model with Stable Diffusion's component classes.

A ``CLIPTokenizer`` over a 23-word vocabulary, a small ``CLIPTextModel``, a pixel-space
``UNet2DConditionModel`` (16x16 RGB) and a ``DDPMScheduler`` config, trained by this project
on CPU from scikit-learn's digits (:mod:`.data`, :mod:`.train`) and shipped in
``data/mini/``, together with the judges of :mod:`.judges`::

    from adjoint_lib.models import mini
    model = mini.load()                                   # ~0.1 s, offline
    x0 = mini.generate(model, [mini.caption(7, "red", "black", "bold")], seeds=[0])

Sampling goes through :func:`adjoint_lib.sample` with :class:`adjoint_lib.models.UNetEps`
(classifier-free guidance with the empty prompt), so every gradient mode of the library
works on MiniSD exactly as on Stable Diffusion. The UNet is a v-prediction model (see
:mod:`.train`); :func:`eps_fn` builds the matching ``UNetEps``, which turns v into eps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ...paths import data_dir
from ...schedule import VPSchedule
from ..diffusers_eps import UNetEps
from ..text_to_image import Profile, TaskModel, check_vocabulary, seeded_noise
from .data import (BACKGROUNDS, COLORS, DIGITS, PAIRS, STYLES, VOCABULARY, Labels, caption,
                   random_labels)
from .judges import Judges, load_judges

Tensor = torch.Tensor

DATA_DIR = data_dir("mini")  # shipped MiniSD (``$ADJOINTDPM_DATA/mini`` when set)
MAX_LENGTH = 16          # tokens per prompt, BOS and EOS included (= max_position_embeddings)
GUIDANCE_SCALE = 3.0     # classifier-free guidance weight used by generate() and evaluate
IMAGE_SHAPE = (3, 16, 16)

__all__ = ["MiniSD", "load", "generate", "eps_fn", "encode_prompts", "initial_noise", "check_prompt",
           "caption", "random_labels", "Labels", "Judges", "DIGITS", "COLORS", "BACKGROUNDS",
           "STYLES", "VOCABULARY", "PAIRS", "DATA_DIR", "MAX_LENGTH", "GUIDANCE_SCALE",
           "IMAGE_SHAPE"]


@dataclass
class MiniSD:
    """The loaded model: diffusers/transformers components, the :class:`VPSchedule` of the
    scheduler, and the :class:`Judges` (``None`` if loaded with ``judges=False``)."""
    tokenizer: "CLIPTokenizer"  # noqa: F821 (transformers type, imported lazily)
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    schedule: VPSchedule
    judges: Judges | None
    load_seconds: float = 0.0


def check_prompt(prompt: str, extra_words: Iterable[str] = ()) -> list[str]:
    """Split a prompt into words and check each is in the MiniSD vocabulary.

    ``extra_words`` are also accepted (e.g. tokens added by textual inversion).
    Returns the words; raises ``ValueError`` naming the unknown ones and listing the vocabulary.
    """
    return check_vocabulary(prompt, VOCABULARY, extra_words, MAX_LENGTH, "MiniSD")


def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str]) -> Tensor:
    """Text embeddings (B, MAX_LENGTH, D) of prompts, as the UNet's ``encoder_hidden_states``.

    Prompts are padded with EOS to ``MAX_LENGTH`` as in Stable Diffusion; ``[""]`` gives the
    null (unconditional) embedding used for classifier-free guidance. Gradients flow to the
    text encoder's weights when they require grad.
    """
    ids = tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = IMAGE_SHAPE) -> Tensor:
    """Standard normal x_T (B, 3, 16, 16); item i depends only on ``seeds[i]``."""
    return seeded_noise(seeds, shape)


def load(path: str | Path | None = None, judges: bool = True) -> MiniSD:
    """Load MiniSD from ``data/mini`` (or ``path``) offline, float32, eval mode, frozen.

    All parameters have ``requires_grad=False``; enable the ones you optimize (or add LoRA
    adapters). The UNet uses diffusers' plain ``AttnProcessor``, which is faster than SDPA
    for its 16-token attentions on CPU.

    Raises ``FileNotFoundError`` if the model (or, with ``judges=True``, the judges) is
    missing and ``RuntimeError`` if the tokenizer comes back empty.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    t0 = time.perf_counter()
    root = Path(path) if path is not None else DATA_DIR
    missing = [p for p in ("tokenizer", "text_encoder", "unet", "scheduler") + (("judges",) if judges else ())
               if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"MiniSD not found in {root} (missing {missing}); train it with "
                                "`python -m adjoint_lib.models.mini.train` and the judges with "
                                "`python -m adjoint_lib.models.mini.judges`")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    if len(tokenizer) <= 2 or any(len(tokenizer(w).input_ids) != 3 for w in VOCABULARY):
        raise RuntimeError(f"the tokenizer in {root / 'tokenizer'} loaded empty or broken "
                           f"({len(tokenizer)} tokens): its files are missing or unreadable")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                 dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True,
                                                torch_dtype=torch.float32)
    unet.set_attn_processor(AttnProcessor())
    for m in (text_encoder, unet):
        m.eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    return MiniSD(tokenizer, text_encoder, unet, scheduler, VPSchedule.from_diffusers(scheduler),
                  load_judges(root / "judges") if judges else None,
                  load_seconds=time.perf_counter() - t0)


def task_model(model: MiniSD, device: str | torch.device | None = "cpu") -> TaskModel:
    """MiniSD as a :class:`~adjoint_lib.models.text_to_image.TaskModel` (its judges and
    vocabulary in the profile), on ``device``: the one interface MiniSD's tools and the tasks use."""
    device = torch.device(device or "cpu")
    judges = [model.judges.auditee, model.judges.digit, model.judges.style] if model.judges else []
    for mod in [model.text_encoder, model.unet] + judges:
        mod.to(device)
    return TaskModel(Profile("mini", judges=model.judges, vocabulary=tuple(VOCABULARY)), model.tokenizer,
                     model.text_encoder, model.unet, model.scheduler, model.schedule, None, IMAGE_SHAPE,
                     GUIDANCE_SCALE, MAX_LENGTH, device=device)


def eps_fn(model: MiniSD, guidance_scale: float = GUIDANCE_SCALE) -> UNetEps:
    """The model's ``eps_fn(x, t, cond)`` for :func:`adjoint_lib.sample`: guidance with
    ``cond=(prompt_embeddings, null_embedding)``, and the UNet's v turned into eps."""
    return task_model(model).eps_fn(guidance_scale)


def generate(model: MiniSD, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20,
             order: int = 2, guidance_scale: float = GUIDANCE_SCALE, grad: str | None = None,
             x_T: Tensor | None = None, params: Sequence[Tensor] = ()) -> Tensor:
    """Generate images (B, 3, 16, 16), roughly in [-1, 1], from prompts and seeds
    (:meth:`TaskModel.generate`: DPM-Solver of ``order`` on a log-SNR grid of ``steps`` steps,
    guidance against the empty prompt). ``x_T`` overrides the noise of ``seeds`` (pass one that
    requires grad to get dL/dx_T); ``grad`` and ``params`` are handed to ``sample``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    tm = task_model(model, device=model.unet.device)
    with torch.enable_grad() if grad is not None else torch.no_grad():
        cond = tm.encode(prompts)
    return tm.generate(tm.noise(seeds) if x_T is None else x_T, cond, steps=steps, order=order, grad=grad,
                       params=params, guidance_scale=guidance_scale, decode=False)
