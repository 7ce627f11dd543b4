"""Paper task 2: stylization by fine-tuning the weights (LoRA) through the adjoint.

One style reference image; the generated images should take on its *texture statistics*
while still showing what their prompts ask for. Following Gatys et al., a fixed feature
network ``phi`` gives feature maps ``F_l`` (C_l x H_l W_l) and

    Gram        G_l(x) = F_l F_l^T / (H_l W_l)                       (C_l x C_l)
    style       L_s(x) = mean_l |G_l(x) - G_l(ref)|_F^2 / |G_l(ref)|_F^2
    content     L_c(x) = |F_c(x) - F_c(x_base)|^2 / |F_c(x_base)|^2
    loss               = L_s + content_weight * L_c

where ``x_base`` is the image the model generated for the same prompt and noise *before*
fine-tuning. The Gram matrix forgets where features are, so ``L_s`` only asks for the
reference's colors and local patterns; the content term (a deep layer of the same network,
Gatys' choice) keeps the layout and the object of the pre-fine-tuning image. Low-rank
adapters (peft ``LoraConfig`` through diffusers' ``unet.add_adapter``) receive
``dL/dtheta`` from :func:`adjoint_lib.sample` (``grad="adjoint"``: the adjoint ODE, memory
independent of the number of steps) over random prompts and noises, and are saved in
diffusers' LoRA format (``pytorch_lora_weights.safetensors``).

Profiles: on ``mini`` the feature network is the shipped auditee CNN (a digit classifier
trained with color jitter: its deep layer encodes the digit's shape, not its colors), the
reference a procedural 16x16 texture (:func:`make_style_reference`, shipped in
``data/styles/``), the content layer the classifier's penultimate features, and the
independent digit judge (an MLP on a color-normalized ink map) checks that the digits survive. On
``sd`` it is a ``transformers`` vision model's hidden states (:class:`HFFeatures`,
``microsoft/resnet-50`` unless ``--feature-model`` / ``$ADJOINTDPM_FEATURE_MODEL`` name
another hub id or local folder; no torchvision).

``python -m adjoint_lib.tasks.stylize --profile mini`` prints the metrics as one JSON line
(every :class:`StylizeConfig` field is a flag; see :mod:`.cli`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..paths import data_dir
from .cli import (GRAD_MODES, nonnegative_float, nonnegative_int, one_of, order_int, positive_float, positive_int,
                  run_cli, setting, validate)
from . import distributed
from .common import TaskModel, TaskResult
from .features import (FEATURE_ENV, HF_FEATURE_MODEL, FeatureNet, HFFeatures, SequentialTaps,  # noqa: F401
                       default_features, hf_features, mini_features, tiny_hf_features)
from .lora import (LORA_TARGETS, LORA_WEIGHT_NAME, activate, add_lora, base_model, load_lora,  # noqa: F401
                   lora_parameters, save_lora)

Tensor = torch.Tensor

STYLE_DIR = data_dir("styles")
STYLE_KINDS = ("stripes", "checker", "dots")
#: the default reference colors: orange and deep violet (neither is a MiniSD color)
STYLE_COLORS = ((1.0, 0.55, 0.0), (0.35, 0.0, 0.55))
SD_PROMPTS = ("a photo of a cat", "a mountain lake at sunrise", "a red sports car on a street",
              "a bowl of fruit on a table", "a lighthouse by the sea", "a portrait of an old man",
              "a city skyline at night", "a forest path in autumn")
SD_HELD_OUT_PROMPTS = ("a dog in a park", "a sailing boat on a calm sea", "a house with a garden",
                       "a vase of flowers", "a bridge over a river", "a snowy village")


# ============================================================== the style reference
def make_style_reference(kind: str = "stripes", size: int = 16, period: int = 4,
                         colors: Sequence[Sequence[float]] = STYLE_COLORS) -> Tensor:
    """A procedural texture (1, 3, size, size) in [-1, 1]: ``"stripes"`` (diagonal, width
    ``period/2``), ``"checker"`` (squares of side ``period/2``) or ``"dots"`` (one dot per
    ``period`` x ``period`` cell), in two colors (RGB in [0, 1])."""
    if kind not in STYLE_KINDS:
        raise ValueError(f"kind must be one of {STYLE_KINDS}, got {kind!r}")
    if size < 2 or period < 2:
        raise ValueError(f"size and period must be >= 2, got size={size}, period={period}")
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    half = period / 2
    if kind == "stripes":
        mask = ((i + j) % period) < half
    elif kind == "checker":
        mask = ((i // half + j // half) % 2) == 0
    else:
        c = (period - 1) / 2
        mask = ((i % period - c) ** 2 + (j % period - c) ** 2) <= (period / 3.2) ** 2
    a, b = (torch.tensor(c, dtype=torch.float32)[:, None, None] for c in colors)
    m = torch.from_numpy(mask.astype(np.float32))[None]
    return (a * m + b * (1 - m))[None] * 2 - 1


def save_style_image(image: Tensor, path: str | Path) -> Path:
    """Write an image (1 or no batch dim, 3, H, W) in [-1, 1] as a PNG."""
    from PIL import Image

    img = image[0] if image.ndim == 4 else image
    arr = ((img.clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path


def default_style_path(profile: str = "mini") -> Path:
    """The shipped reference: ``data/styles/stripes_16.png`` (mini) or ``stripes_128.png`` (sd)."""
    return STYLE_DIR / ("stripes_16.png" if profile == "mini" else "stripes_128.png")


def load_style_image(path: str | Path, size: int | None = None) -> Tensor:
    """Read a style reference (1, 3, H, W) in [-1, 1] from an image file (PNG, JPEG, ...),
    resized to ``size`` x ``size`` when given.

    Raises ``FileNotFoundError`` when the file does not exist and ``ValueError`` when it is
    empty or not a readable image, saying what to pass instead.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    hint = ("pass the path of a PNG/JPEG image, or build one with "
            "adjoint_lib.tasks.stylize.make_style_reference() (shipped: data/styles/)")
    if not path.is_file():
        raise FileNotFoundError(f"style image {str(path)!r} not found: {hint}")
    if path.stat().st_size == 0:
        raise ValueError(f"style image {str(path)!r} is an empty file (0 bytes): {hint}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"style image {str(path)!r} is not a readable image "
                         f"({type(exc).__name__}): {hint}") from exc
    if arr.size == 0 or min(arr.shape[:2]) < 2:
        raise ValueError(f"style image {str(path)!r} has no usable pixels ({arr.shape[1]}x{arr.shape[0]}): {hint}")
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


def as_style_image(style: str | Path | Tensor | None, profile: str, size: int | None = None) -> Tensor:
    """A style argument (path, image tensor in [-1, 1], or None for the shipped default)
    as a (1, 3, H, W) tensor."""
    if style is None:
        style = default_style_path(profile)
    if isinstance(style, Tensor):
        img = style[None] if style.ndim == 3 else style
        if img.ndim != 4 or img.shape[0] != 1 or img.shape[1] != 3 or img.numel() == 0:
            raise ValueError(f"a style image tensor must be (1, 3, H, W) or (3, H, W), got {tuple(style.shape)}")
        if size is not None and img.shape[-2:] != (size, size):
            img = F.interpolate(img.float(), size=(size, size), mode="bicubic", align_corners=False)
        return img.float()
    return load_style_image(style, size)


# ============================================================== Gram-matrix loss
def gram_matrix(features: Tensor) -> Tensor:
    """``G = F F^T / (H W)`` of feature maps (B, C, H, W) -> (B, C, C): the mean over
    positions of the outer product of the feature vector with itself (where a feature
    is, is forgotten; which features fire together, is kept)."""
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (h * w)


class StyleLoss(nn.Module):
    """``loss(images, base) -> (total, style, content)``, each per image (B,): the Gram
    loss against the reference (normalized per layer by ``|G_l(ref)|^2``, averaged over
    layers) plus ``content_weight`` times the relative squared distance of the content
    features to those of ``base`` (the pre-fine-tuning images; ``None``: no content term)."""

    def __init__(self, features: FeatureNet, style_image: Tensor, content_weight: float = 1.0) -> None:
        super().__init__()
        self.features, self.content_weight = features, float(content_weight)
        param = next(features.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            feats = features(style_image.to(device))
        self.targets = [gram_matrix(feats[i]).detach() for i in features.style_layers]
        self.norms = [float(g.pow(2).sum()) for g in self.targets]
        if any(not math.isfinite(n) or n <= 0 for n in self.norms):
            raise ValueError("the style image gives all-zero (or non-finite) features: pick a reference "
                             "with some contrast")

    def style(self, feats: list[Tensor]) -> Tensor:
        terms = [(gram_matrix(feats[i]) - g).pow(2).sum(dim=(1, 2)) / n
                 for i, g, n in zip(self.features.style_layers, self.targets, self.norms)]
        return torch.stack(terms).mean(0)

    def content(self, feats: list[Tensor], base_feats: list[Tensor]) -> Tensor:
        terms = []
        for i in self.features.content_layers:
            d = (feats[i] - base_feats[i]).pow(2).flatten(1).sum(1)
            terms.append(d / base_feats[i].pow(2).flatten(1).sum(1).clamp(min=1e-8))
        return torch.stack(terms).mean(0)

    def forward(self, images: Tensor, base: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.features(images)
        s = self.style(feats)
        if base is None or self.content_weight == 0.0:
            c = torch.zeros_like(s)
        else:
            with torch.no_grad():
                base_feats = self.features(base)
            c = self.content(feats, base_feats)
        return s + self.content_weight * c, s, c


# ============================================================== prompts and noises
@dataclass
class PromptSet:
    """Prompts with their noise seeds (and, on mini, the prompted digits)."""
    prompts: list[str]
    seeds: list[int]
    digits: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: Sequence[int]) -> "PromptSet":
        return PromptSet([self.prompts[i] for i in idx], [self.seeds[i] for i in idx],
                         None if self.digits is None else [self.digits[i] for i in idx])


def prompt_set(model: TaskModel, n: int, seed: int, split: str = "train") -> PromptSet:
    """``n`` random prompt/seed pairs. Training pairs use noise seeds >= 100000, held-out
    pairs (``split="held_out"``) seeds below it and other prompts (on sd: another list)."""
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 7919))
    base = 100_000 if split == "train" else 0
    seeds = (base + torch.randperm(100_000, generator=g)[:n]).tolist()
    if model.profile == "mini":
        from ..models import mini

        labels = mini.random_labels(n, g)
        return PromptSet(labels.captions(), seeds, labels.digit.tolist())
    pool = SD_PROMPTS if split == "train" else SD_HELD_OUT_PROMPTS
    return PromptSet([pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g)], seeds)


# ============================================================== the task
def style_file(text: str) -> str:
    """A readable style image (checked when the flag is parsed, before any model loads)."""
    try:
        load_style_image(text)
    except (FileNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


@dataclass
class StylizeConfig:
    """Settings of the fine-tuning loop (defaults: the ``mini`` profile)."""
    iterations: int = setting(32, positive_int)
    batch_size: int = setting(4, positive_int, "prompt/noise pairs per iteration")
    lr: float = setting(5e-3, positive_float, "Adam learning rate of the LoRA tensors")
    rank: int = setting(4, positive_int, "LoRA rank")
    content_weight: float = setting(3.0, nonnegative_float)
    steps: int = setting(8, positive_int, "sampler steps (DPM-Solver multistep, log-SNR grid)")
    order: int = setting(2, order_int)
    guidance_scale: float | None = setting(None, positive_float, "default: the model's")
    grad: str = setting("adjoint", one_of(*GRAD_MODES), "gradient method of adjoint_lib.sample")
    train_pairs: int = setting(64, positive_int, "training prompt/noise pairs")
    seed: int = setting(0, nonnegative_int)
    target_modules: tuple[str, ...] = setting(LORA_TARGETS, None, "module names that get LoRA adapters")
    held_out: int = setting(48, positive_int, "held-out prompt/noise pairs for the evaluation")
    style: str | None = setting(None, style_file, "style reference image (default data/styles/stripes_*.png)")
    feature_model: str | None = setting(None, None, f"sd: feature network (hub id or folder; ${FEATURE_ENV}, "
                                                    f"default {HF_FEATURE_MODEL})")


@dataclass
class StylizeResult:
    """What :func:`stylize` returns: the adapter's name and tensors, the loss history (one
    dict per iteration), the flattened LoRA gradient of the first iteration, wall time."""
    adapter_name: str
    params: list[Tensor]
    history: list[dict]
    first_grad: Tensor
    seconds: float
    config: StylizeConfig = field(default_factory=StylizeConfig)


@torch.no_grad()
def generate_images(model: TaskModel, pairs: PromptSet, *, steps: int, order: int = 2,
                    guidance_scale: float | None = None, batch_size: int | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] of ``pairs`` with the UNet's active adapter, generated
    ``batch_size`` at a time (default: 32 on mini, 4 on sd)."""
    return model.render(pairs.prompts, model.noise(pairs.seeds), batch_size=batch_size or (32 if model.profile == "mini" else 4),
                        steps=steps, order=order, guidance_scale=guidance_scale)


def stylize(model: TaskModel, loss_fn: StyleLoss, config: StylizeConfig | None = None,
            train: PromptSet | None = None, base_images: Tensor | None = None,
            adapter_name: str | None = None, progress: bool = True) -> StylizeResult:
    """Fine-tune a fresh LoRA adapter so that generated images minimize ``loss_fn``.

    Each iteration draws ``batch_size`` prompt/noise pairs from ``train`` (random, seeded),
    generates them through :func:`adjoint_lib.sample` with ``grad=config.grad`` and
    ``params=`` the LoRA tensors, and takes one Adam step on the mean loss. ``base_images``
    (the pre-fine-tuning images of ``train``, for the content term) are generated when not
    given; pass them to share them between runs.

    Under a launcher (:mod:`.distributed`) every process draws the same batch, generates and
    backpropagates its share of it, and the gradients of the global mean loss are summed
    across processes before the (identical) Adam step; ``history`` and ``first_grad`` are the
    global batch's on every process.
    """
    cfg = config or StylizeConfig()
    if cfg.iterations < 1 or cfg.batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {cfg.iterations} and {cfg.batch_size}")
    if cfg.batch_size < distributed.world_size():
        raise ValueError(f"batch_size ({cfg.batch_size}) must be at least the number of processes "
                         f"({distributed.world_size()}): each process takes a share of every batch")
    train = train if train is not None else prompt_set(model, cfg.train_pairs, cfg.seed, "train")
    if base_images is None:
        with base_model(model.unet):
            base_images = distributed.map_rows(
                lambda i: generate_images(model, train.take(i), steps=cfg.steps, order=cfg.order,
                                          guidance_scale=cfg.guidance_scale), len(train), model.device)
    name = adapter_name or f"style_{cfg.grad}"
    params = add_lora(model.unet, name, rank=cfg.rank, target_modules=cfg.target_modules, seed=cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    history, first_grad = [], None
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc=f"LoRA ({cfg.grad})",
               disable=not progress or not distributed.is_main_process())
    for it in bar:
        idx = torch.randperm(len(train), generator=g)[:cfg.batch_size].tolist()
        mine = [idx[i] for i in distributed.shard(len(idx))]  # this process's share of the batch
        batch = train.take(mine)
        with torch.no_grad():
            cond = model.encode(batch.prompts)
        images = model.generate(model.noise(batch.seeds), cond, steps=cfg.steps, order=cfg.order,
                                grad=cfg.grad, params=params, guidance_scale=cfg.guidance_scale)
        total, style, content = loss_fn(images.float(), base_images[mine].to(images.device))
        opt.zero_grad(set_to_none=True)
        (total.sum() / len(idx)).backward()  # the global batch's mean loss, this process's terms
        distributed.all_reduce_grads(params)
        if first_grad is None:
            first_grad = torch.cat([p.grad.detach().flatten().float().cpu() for p in params])
        opt.step()
        total, style, content = (distributed.gather_rows(v.detach(), len(idx)) for v in (total, style, content))
        history.append({"iteration": it, "loss": float(total.mean()),
                        "style": float(style.mean()), "content": float(content.mean()),
                        "seconds": time.perf_counter() - t0})
        bar.set_postfix(style=f"{history[-1]['style']:.3f}", content=f"{history[-1]['content']:.3f}")
    for p in params:
        p.requires_grad_(False)
    return StylizeResult(name, params, history, first_grad, time.perf_counter() - t0, cfg)


@torch.no_grad()
def evaluate(model: TaskModel, loss_fn: StyleLoss, images: Tensor, base: Tensor | None,
             pairs: PromptSet) -> dict[str, float]:
    """Mean style loss, content loss against ``base`` and (mini) the independent digit
    judge's accuracy on the prompted digits, for images of ``pairs``."""
    _, style, content = loss_fn(images, base)
    out = {"style_loss": float(style.mean()), "content_loss": float(content.mean())}
    judges = model.spec.judges
    if judges is not None and pairs.digits is not None:
        pred = judges.digit(images.cpu()).argmax(1)
        out["judge_acc"] = float((pred == torch.tensor(pairs.digits)).float().mean())
    return out


def gradient_cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flattened gradients."""
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def default_config(profile: str, **overrides) -> StylizeConfig:
    """Tuned settings: ``mini`` (CPU minutes) or ``sd`` (GPU), with ``overrides``."""
    base = {} if profile == "mini" else dict(iterations=100, batch_size=1, lr=1e-3, rank=4, content_weight=3.0,
                                             steps=20, order=2, train_pairs=64)
    return dataclasses.replace(StylizeConfig(**base), **overrides)


CONFIG = StylizeConfig


def run(model: TaskModel, cfg: StylizeConfig | None = None, *, out_dir: str | Path | None = None,
        features: FeatureNet | None = None, progress: bool = False) -> TaskResult:
    """The whole task: fine-tune, evaluate on held-out pairs before/after, save the LoRA in
    diffusers' format, load it back and check it reproduces the images. Returns a
    :class:`TaskResult` (``artifacts``: tensors for plots)."""
    from ..paths import outputs_dir

    cfg = validate(cfg or default_config(model.profile))
    prof = model.profile
    ref = as_style_image(cfg.style, prof, 16 if prof == "mini" else None)
    features = features if features is not None else default_features(model, cfg.feature_model)
    loss_fn = StyleLoss(features, ref.to(model.device), cfg.content_weight)
    held = prompt_set(model, cfg.held_out, cfg.seed, "held_out")

    def held_images() -> Tensor:  # each process generates its share (one process: all of them)
        return distributed.map_rows(lambda i: generate_images(model, held.take(i), steps=cfg.steps, order=cfg.order,
                                                              guidance_scale=cfg.guidance_scale),
                                    len(held), model.device)

    with base_model(model.unet):
        before = held_images()
    result = stylize(model, loss_fn, cfg, progress=progress)
    after = held_images()
    m_before, m_after = evaluate(model, loss_fn, before, None, held), evaluate(model, loss_fn, after, before, held)
    out = Path(out_dir) if out_dir is not None else outputs_dir("stylize", prof)
    if distributed.is_main_process():
        save_lora(model.unet, out, result.adapter_name)
    distributed.barrier()  # the file is in place before any process reads it
    load_lora(model.unet, out, "style_loaded")  # a second copy, read back from the file
    reloaded = held_images()
    metrics = {
        "profile": prof, "grad": cfg.grad, "n_held_out": len(held),
        "style_loss_before": round(m_before["style_loss"], 4), "style_loss_after": round(m_after["style_loss"], 4),
        "style_loss_drop": round(1 - m_after["style_loss"] / m_before["style_loss"], 4),
        "content_loss_after": round(m_after["content_loss"], 4),
        **({"judge_acc_before": round(m_before["judge_acc"], 4), "judge_acc_after": round(m_after["judge_acc"], 4)}
           if "judge_acc" in m_after else {}),
        "lora_params": int(sum(p.numel() for p in result.params)),
        "lora_roundtrip_max_abs_diff": float((reloaded - after).abs().max()),
        "iterations": cfg.iterations, "batch_size": cfg.batch_size, "steps": cfg.steps, "order": cfg.order,
        "lr": cfg.lr, "rank": cfg.rank, "content_weight": cfg.content_weight,
        "train_seconds": round(result.seconds, 1), "lora_file": str(out / LORA_WEIGHT_NAME),
    }
    artifacts = {"before": before, "after": after, "reloaded": reloaded, "reference": ref, "held_out": held,
                 "history": result.history, "result": result}
    return TaskResult(metrics, artifacts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run the task and print its metrics as one JSON line."""
    import sys

    run_cli(sys.modules[__name__], "Paper task 2: stylization by LoRA fine-tuning through the adjoint.", argv)


# ============================================================== what the images show of the reference
def luminance(images: Tensor) -> Tensor:
    """Rec. 601 luminance ``0.299 R + 0.587 G + 0.114 B`` in [0, 1] of images (B, 3, H, W) in [-1, 1] -> (B, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    w = torch.tensor((0.299, 0.587, 0.114), dtype=torch.float32, device=images.device)
    return torch.einsum("bchw,c->bhw", (images.float().clamp(-1, 1) + 1) / 2, w)


def _power(images: Tensor) -> Tensor:
    lum = luminance(images)
    return torch.fft.fft2(lum - lum.mean(dim=(1, 2), keepdim=True)).abs().pow(2)


def dominant_frequency(reference: Tensor) -> tuple[int, int]:
    """``(ky, kx)``, in cycles per image (signed, ``fftfreq`` order), of the largest peak of the
    DC-removed 2-D DFT power of a reference's luminance (1, 3, H, W): its stripes' frequency and
    orientation (``(4, 4)``: period 4 along the diagonal ``i + j``; ``(4, -4)`` along ``i - j``)."""
    p = _power(reference[:1] if reference.ndim == 4 else reference[None])[0]
    h, w = p.shape
    i = int(p.flatten().argmax())
    ky, kx = i // w, i % w
    return (ky - h if ky > h // 2 else ky, kx - w if kx > w // 2 else kx)


def spectral_share(images: Tensor, freq: tuple[int, int]) -> Tensor:
    """Per image (B,): the share of its DC-removed luminance DFT power at ``freq`` and ``-freq``
    (1 for pure stripes of that frequency and orientation, about ``2 / (H W)`` for white noise)."""
    p = _power(images)
    total = p.flatten(1).sum(1).clamp_min(1e-12)
    ky, kx = freq
    at = p[:, ky % p.shape[1], kx % p.shape[2]] + p[:, -ky % p.shape[1], -kx % p.shape[2]]
    if (ky % p.shape[1], kx % p.shape[2]) == (-ky % p.shape[1], -kx % p.shape[2]):
        at = at / 2  # a self-conjugate (Nyquist) frequency counted once
    return at / total


def reference_colors(reference: Tensor, k: int = 2) -> Tensor:
    """The ``k`` most frequent pixel colors (k, 3), RGB in [0, 1] rounded to 8 bits, of a reference (1, 3, H, W)."""
    px = ((reference[0].float().clamp(-1, 1) + 1) / 2 * 255).round().flatten(1).T
    colors, counts = px.unique(dim=0, return_counts=True)
    return colors[counts.argsort(descending=True)[:k]] / 255


def palette_distance(images: Tensor, colors: Tensor) -> Tensor:
    """Per image (B,): the mean over pixels of the RGB distance (in [0, 1] units) to the nearest of ``colors`` (k, 3)."""
    px = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)[..., None, :]   # (B, H, W, 1, 3)
    return (px - colors.to(px)).norm(dim=-1).amin(-1).flatten(1).mean(1)


def texture_measures(images: Tensor, reference: Tensor) -> dict[str, Tensor]:
    """Per image: ``stripe_share`` (:func:`spectral_share` at the reference's
    :func:`dominant_frequency`) and ``palette_distance`` to the reference's two colors."""
    return {"stripe_share": spectral_share(images, dominant_frequency(reference)),
            "palette_distance": palette_distance(images, reference_colors(reference))}


if __name__ == "__main__":
    main()
