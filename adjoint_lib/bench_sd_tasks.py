"""Full-scale evidence for the three paper tasks without downloading weights.

Builds Stable Diffusion 1.5's architecture from configs in code (UNet 860M, the VAE, a CLIP
ViT-L/14 text encoder; a ResNet-50 from ``transformers`` as feature network and auditee), all
with random weights, and runs each task's optimization for a few iterations at the paper's
settings (512x512 images, guidance 7.5; task 1: 50 DDIM steps, AdamW lr 0.05; task 2: 20
steps, LoRA rank 4; task 3: 50 DDIM steps, lr 0.01, clamp 0.1) under the precision policy (UNet
and text encoder in bfloat16/float16, VAE, losses, adjoint state and gradients in float32).
Records per task: peak GPU memory (``torch.cuda.max_memory_allocated``), seconds per iteration
and whether the gradient is finite and non-zero::

    python -m adjoint_lib.bench_sd_tasks --device cuda          # -> outputs/bench/sd-tasks_cuda/
    python -m adjoint_lib.bench_sd_tasks --device cuda --out data/bench/sd-tasks_cuda --force
    python -m adjoint_lib.bench_sd_tasks --size tiny --device cpu --steps 3   # the CI smoke run

Random weights say nothing about image quality; they do exercise every shape, dtype and memory
path of the real model. A 15 GB GPU (Colab's T4) needs every task's peak below ~14 GiB.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .io import check_out, dumps, write_json
from .paths import outputs_dir
from .tasks import adversarial as adv
from .tasks import effect_embedding as ee
from .tasks import stylize as st
from .cli import nonnegative_int, positive_int
from .tasks.cli import one_of
from .tasks.common import Profile, TaskModel, from_components, tiny_resnet_config, tiny_sd_components, to_device
from .tasks.loading import DTYPES, resolve_device, resolve_dtype


def sd15_components(seed: int = 0) -> dict[str, Any]:
    """Stable Diffusion 1.5's components from their configs, random weights (no download).
    The tokenizer is MiniSD's (token ids only; prompts are padded to CLIP's 77 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .paths import data_dir

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(data_dir("mini", "tokenizer"), local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build(size: str, device: torch.device, dtype: torch.dtype) -> tuple[TaskModel, Any, Any]:
    """(model, ResNet feature backbone, ResNet classifier) at ``size`` ``"full"`` or ``"tiny"``."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    if size == "full":
        model = from_components(sd15_components(), Profile("sd"))
        model = dataclasses.replace(model, max_length=77)
        model.vae.enable_gradient_checkpointing()  # the decoder's 512x512 activations, recomputed in backward
        feat_cfg, clf_cfg, px = ResNetConfig(), ResNetConfig(num_labels=1000), 224
    else:
        model = from_components(tiny_sd_components(), Profile("sd", tiny=True))
        feat_cfg, clf_cfg, px = tiny_resnet_config(hidden_act="relu"), tiny_resnet_config(num_labels=10), 32
    model = to_device(model, device, dtype)
    torch.manual_seed(1)
    features = st.HFFeatures(ResNetModel(feat_cfg).eval(), size=px).to(device)
    auditee = adv.ImageNetClassifier(ResNetForImageClassification(clf_cfg), size=px).to(device)
    return model, features, auditee


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _grad_record(g: torch.Tensor) -> dict:
    g = g.detach().float()
    return {"grad_finite": bool(torch.isfinite(g).all()), "grad_nonzero": bool(g.abs().max() > 0),
            "grad_norm": float(g.norm())}


def bench_effect(model: TaskModel, iterations: int, batch: int, steps: int | None) -> dict:
    """Task 1: AdamW on a new token's embedding (pixel MSE), ``iterations`` steps."""
    over = {"steps": steps} if steps else {}
    cfg = ee.default_config("sd", n_train=batch, iterations=iterations, **over)
    pairs = ee.make_pairs(model, cfg, batch)
    targets = ee.render(model, pairs.target_prompts, model.noise(pairs.seeds), cfg, batch_size=batch)
    _peak_reset(model.device)
    res = ee.learn_embedding(model, pairs, targets, cfg, progress=False)
    return {"steps": cfg.steps, "order": cfg.order, "lr": cfg.lr, "guidance_scale": cfg.guidance_scale,
            "iterations": iterations, "batch": batch, "peak_memory_bytes": _peak(model.device),
            "seconds_per_iteration": res.seconds / iterations, "nfe_per_iteration": res.nfe / iterations,
            "loss": res.losses, **_grad_record(res.grad0)}


def bench_stylize(model: TaskModel, features: Any, iterations: int, batch: int, steps: int | None) -> dict:
    """Task 2: Adam on LoRA adapters (Gram style loss + content), ``iterations`` steps."""
    over = {"steps": steps} if steps else {}
    cfg = st.default_config("sd", iterations=iterations, batch_size=batch, train_pairs=batch, **over)
    ref = st.as_style_image(None, "sd")
    loss_fn = st.StyleLoss(features, ref.to(model.device), cfg.content_weight)
    train = st.prompt_set(model, batch, cfg.seed, "train")
    base = st.generate_images(model, train, steps=cfg.steps, order=cfg.order, batch_size=batch)
    _peak_reset(model.device)
    res = st.stylize(model, loss_fn, cfg, train, base, progress=False)
    model.unet.delete_adapters(res.adapter_name)
    return {"steps": cfg.steps, "order": cfg.order, "lr": cfg.lr, "rank": cfg.rank,
            "guidance_scale": model.guidance_scale, "iterations": iterations, "batch": batch,
            "lora_params": int(sum(p.numel() for p in res.params)), "peak_memory_bytes": _peak(model.device),
            "seconds_per_iteration": res.seconds / iterations, "loss": [h["loss"] for h in res.history],
            **_grad_record(res.first_grad)}


def bench_adversarial(model: TaskModel, auditee: Any, iterations: int, batch: int, steps: int | None) -> dict:
    """Task 3: normalized gradient ascent on x_T against the auditee, ``iterations`` steps
    (labels: the auditee's own reading of the clean images, so the attack has work to do)."""
    over = {"steps": steps} if steps else {}
    cfg = adv.default_config("sd", iterations=iterations, n_pairs=batch, **over)
    prompts, _ = adv.candidate_prompts(model, batch, cfg.seed)
    x_T = model.noise([cfg.seed * 100_000 + i for i in range(batch)])
    with torch.no_grad():
        labels = auditee(adv.generate_images(model, prompts, x_T, cfg, batch_size=batch)).argmax(1)
    _peak_reset(model.device)
    res = adv.attack(model, prompts, x_T, labels, auditee, cfg, progress=False)
    return {"steps": cfg.steps, "order": cfg.order, "lr": cfg.lr, "delta": cfg.delta,
            "guidance_scale": cfg.guidance_scale, "iterations": iterations, "batch": batch,
            "peak_memory_bytes": _peak(model.device),
            "seconds_per_iteration": res.seconds / max(1, len(res.losses)),
            "linf": float((res.x_adv - res.x_T).abs().amax()), **_grad_record(res.grad0)}


TASKS = ("effect_embedding", "stylize", "adversarial")


def run(size: str = "full", device: str | None = None, dtype: str = "auto", iterations: int = 2, batch: int = 1,
        steps: int | None = None, tasks: Sequence[str] = TASKS) -> dict:
    """Build the model at ``size`` and benchmark ``tasks``; returns the JSON-ready results."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    model, features, auditee = build(size, dev, dt)
    out: dict[str, Any] = {
        "size": size, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dt).replace("torch.", ""), "vae_dtype": "float32",
        "image_size": model.vae.config.sample_size,
        "latent_shape": list(model.latent_shape), "grad": "adjoint",
        "unet_params": int(sum(p.numel() for p in model.unet.parameters())),
        "build_seconds": time.perf_counter() - t0, "tasks": {},
    }
    runners = {"effect_embedding": lambda: bench_effect(model, iterations, batch, steps),
               "stylize": lambda: bench_stylize(model, features, iterations, batch, steps),
               "adversarial": lambda: bench_adversarial(model, auditee, iterations, batch, steps)}
    for name in tasks:
        try:
            out["tasks"][name] = runners[name]()
        except (torch.cuda.OutOfMemoryError, FloatingPointError) as exc:  # record it, go on with the next task
            out["tasks"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                                  "peak_memory_bytes": _peak(dev)}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(name, dumps(out["tasks"][name]), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: run the three tasks on SD 1.5's architecture and write the results JSON."""
    p = argparse.ArgumentParser(description="The three paper tasks on Stable Diffusion 1.5's architecture with "
                                            "random weights: peak memory, time per iteration, gradient finiteness.")
    p.add_argument("--size", type=one_of("full", "tiny"), default="full",
                   help="full: SD 1.5 at 512x512; tiny: toy components (CPU smoke run)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", type=one_of("auto", *DTYPES), default="auto")
    p.add_argument("--iterations", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=1, help="prompt/noise pairs per iteration")
    p.add_argument("--steps", type=nonnegative_int, default=0, help="sampler steps (0: each task's paper setting)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--out", default=None, help="results folder (default outputs/bench/sd-tasks_<device>)")
    p.add_argument("--force", action="store_true", help="allow --out inside the shipped data/ folder")
    a = p.parse_args(argv)
    dev = resolve_device(a.device)
    folder = Path(a.out) if a.out else outputs_dir("bench", f"sd-tasks_{dev.type}" + ("" if a.size == "full" else "-tiny"))
    check_out(folder / "results.json", force=a.force, flag="--out")
    results = run(a.size, a.device, a.dtype, a.iterations, a.batch, a.steps or None, a.tasks)
    path = write_json(folder / "results.json", results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
