"""Train MiniSD from scratch on CPU: ``python -m adjoint_lib.models.mini.train``.

Builds the tokenizer offline (:func:`build_tokenizer`), a small ``CLIPTextModel`` and a
pixel-space ``UNet2DConditionModel`` (:func:`build_models`) and trains both on the
DDPM denoising objective, written for the noise estimate ``eps_theta`` the samplers use:

    L = E_{x0, c, t, eps} [ w(t) || eps - eps_theta(alpha_t x0 + sigma_t eps, t, tau(c)) ||^2 ]

with ``t`` uniform over the 1000 training steps, caption dropout (10% of captions replaced
by the empty prompt, for classifier-free guidance) and Min-SNR-5 weights
``w(t) = min(SNR(t), 5) / SNR(t)`` (Hang et al., 2023), which speed up convergence. AdamW
with warmup + cosine decay; the exponential moving average of the weights is what is saved.

The text encoder is trained jointly at a tenth of the UNet's learning rate
(``text_encoder_lr_scale=0.1``; ``--text-encoder-lr-scale 0`` freezes it), and the UNet outputs
v (``prediction_type="v_prediction"``, ``eps = alpha_t v + sigma_t x_t``, applied by
:class:`adjoint_lib.models.UNetEps`); why, with measurements: ``data/mini/MODEL_CARD.md``.

Writes ``<out>/{tokenizer,text_encoder,unet,scheduler}`` (``save_pretrained``),
``<out>/samples.png`` (a labelled sample grid) and ``<out>/train_metrics.json``; ``--out``
defaults to ``outputs/mini`` (replacing the shipped model needs ``--out data/mini --force``).
Every tenth of the run the EMA weights go to ``<out>/checkpoint/`` (with ``step.json``),
which is removed when the run completes; the model at ``<out>`` is swapped in only at the end,
so an interrupted run leaves the previous model there. Seeded and deterministic for a fixed
thread count.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import GUIDANCE_SCALE, MAX_LENGTH, MiniSD, encode_prompts, generate
from .data import DIGITS, VOCABULARY, caption, sample_batch
from ...cli import add_output_arguments, nonnegative_float, output_path, positive_float, positive_int
from ...io import atomic_dir, atomic_path, write_json
from ...paths import outputs_dir
from ...schedule import VPSchedule

Tensor = torch.Tensor
Merge = tuple[str, str]


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (the defaults are the shipped model's)."""
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    prediction_type: str = "v_prediction"
    grad_clip: float = 1.0
    seed: int = 0
    unet_channels: tuple[int, ...] = (16, 32, 64)
    attention_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    train_text_encoder: bool = True
    text_encoder_lr_scale: float = 0.1


def bpe_merges(words: Sequence[str]) -> list[Merge]:
    """BPE merges that assemble every word of ``words`` into one token.

    CLIP's BPE splits a word into characters, marks the last with ``</w>`` and then applies
    merges by rank. These merges are learned the standard way (repeatedly merge the most
    frequent adjacent pair, ties broken alphabetically) until each word is a single symbol,
    so replaying them by rank rebuilds each word (checked in :func:`build_tokenizer`).
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[Merge] = []
    while True:
        counts: dict[Merge, int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def build_tokenizer(words: Sequence[str] = VOCABULARY):
    """A ``CLIPTokenizer`` in which each of ``words`` is exactly one token.

    Its vocabulary holds the characters and merged pieces BPE needs on the way, the
    words, and CLIP's ``<|startoftext|>`` / ``<|endoftext|>`` (EOS is also pad and unk).
    """
    from transformers import CLIPTokenizer

    merges = bpe_merges(words)
    chars = sorted({c for w in words for c in w} | {c + "</w>" for w in words for c in w})
    tokens = list(dict.fromkeys(chars + [a + b for a, b in merges]))
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if tok.convert_ids_to_tokens(ids) != [w + "</w>"]:
            raise RuntimeError(f"BPE does not rebuild {w!r}: {tok.convert_ids_to_tokens(ids)}")
    return tok


def save_tokenizer(tok, path: Path) -> None:
    """``save_pretrained`` plus CLIP's classic ``vocab.json``/``merges.txt`` (read by older
    transformers versions, which have no ``tokenizer.json`` support for CLIP)."""
    tok.save_pretrained(path)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"], indent=0))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_models(tokenizer, cfg: TrainConfig):
    """Fresh (text_encoder, unet, scheduler) for ``cfg``.

    Speed shapes the UNet: three levels (16x16, 8x8, 4x4) of one ResNet block each, and
    attention (self + cross) only at 4x4, so one guided call on a batch of 32 costs tens of
    milliseconds on a CPU core. To condition every ResNet block on the prompt anyway, the
    text is also attention-pooled into the time embedding (diffusers'
    ``addition_embed_type="text"``), in addition to the cross-attention.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_heads,
        norm_num_groups=8, time_embedding_dim=128, addition_embed_type="text",
        addition_embed_type_num_heads=4)
    unet.set_attn_processor(AttnProcessor())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, prediction_type=cfg.prediction_type, clip_sample=False)
    return text_encoder, unet, scheduler


def diffusion_loss(text_encoder: torch.nn.Module, unet: torch.nn.Module, tokenizer,
                   scheduler, images: Tensor, prompts: Sequence[str], t: Tensor,
                   noise: Tensor, min_snr_gamma: float | None) -> tuple[Tensor, Tensor]:
    """(weighted loss, plain eps-MSE) of one batch at integer timesteps ``t`` with noise ``noise``."""
    ac = scheduler.alphas_cumprod.to(images.device)[t].float().view(-1, 1, 1, 1)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    x_t = alpha * images + sigma * noise
    emb = encode_prompts(tokenizer, text_encoder, prompts)
    pred = unet(x_t, t, encoder_hidden_states=emb).sample
    eps = pred if scheduler.config.prediction_type == "epsilon" else alpha * pred + sigma * x_t
    mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma is None:
        return mse.mean(), mse.mean()
    snr = (alpha / sigma).pow(2).flatten()
    return (mse * snr.clamp(max=min_snr_gamma) / snr).mean(), mse.mean()


def _swap_in(params: list[Tensor], values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")


def save_model(out_dir: Path, tokenizer, text_encoder: torch.nn.Module, unet: torch.nn.Module,
               scheduler) -> None:
    """``save_pretrained`` every component into ``out_dir/{tokenizer,text_encoder,unet,scheduler}``.

    All four are written to temporary folders first and swapped in together at the end, so an
    exception or Ctrl-C while saving leaves the previous model untouched."""
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_dir(out_dir / name)) for name in COMPONENTS}
        save_tokenizer(tokenizer, tmp["tokenizer"])
        text_encoder.save_pretrained(tmp["text_encoder"])
        unet.save_pretrained(tmp["unet"])
        scheduler.save_pretrained(tmp["scheduler"])


def fixed_eval_batch(n: int = 256, seed: int = 1234) -> tuple[Tensor, list[str], Tensor, Tensor]:
    """A fixed held-out batch (images, prompts, t, noise) to track the loss comparably."""
    g = torch.Generator().manual_seed(seed)
    images, labels = sample_batch(n, g, split="test")
    t = torch.randint(0, 1000, (n,), generator=g)
    return images, labels.captions(), t, torch.randn(images.shape, generator=g)


def train(cfg: TrainConfig, out_dir: Path | None = None, progress: bool = True,
          device: str = "cpu"):
    """Train for ``cfg.steps`` steps on ``device``; save to ``out_dir`` if given.

    The batches, timesteps and noise are drawn on the CPU from one seeded generator, so
    every device sees the same data stream. With ``out_dir``, the EMA weights are saved every
    tenth of the run to ``out_dir/checkpoint`` (removed at the end) and the final model to
    ``out_dir`` (:func:`save_model`).

    Returns ``(text_encoder, unet, scheduler, tokenizer, metrics)`` with the EMA weights
    loaded into the returned modules.
    """
    for name in ("steps", "batch_size", "warmup"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
    tokenizer = build_tokenizer()
    text_encoder, unet, scheduler = build_models(tokenizer, cfg)
    text_encoder.to(device), unet.to(device)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    groups = [{"params": list(unet.parameters()), "lr": cfg.lr}]
    if cfg.train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.lr * cfg.text_encoder_lr_scale})
    params = [p for g in groups for p in g["params"]]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay to 0
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    ev_images, ev_prompts, ev_t, ev_noise = (v.to(device) if torch.is_tensor(v) else v
                                             for v in fixed_eval_batch())

    def held_out_mse() -> float:
        with torch.no_grad():
            return float(diffusion_loss(text_encoder, unet, tokenizer, scheduler, ev_images,
                                        ev_prompts, ev_t, ev_noise, None)[1])

    history: list[dict] = [{"step": 0, "held_out_mse": held_out_mse()}]
    running, t0 = None, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="MiniSD", disable=not progress)
    for step in bar:
        text_encoder.train(), unet.train()
        images, labels = sample_batch(cfg.batch_size, g)
        prompts = ["" if torch.rand((), generator=g) < cfg.caption_dropout else c
                   for c in labels.captions()]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noise = torch.randn(images.shape, generator=g)
        images, t, noise = images.to(device), t.to(device), noise.to(device)
        loss, mse = diffusion_loss(text_encoder, unet, tokenizer, scheduler, images, prompts, t,
                                   noise, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running = float(mse.detach()) if running is None else 0.99 * running + 0.01 * float(mse.detach())
        bar.set_postfix(mse=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            text_encoder.eval(), unet.eval()
            history.append({"step": step + 1, "train_mse_running": running,
                            "held_out_mse": held_out_mse(), "seconds": time.perf_counter() - t0})
            if out_dir is not None and step + 1 < cfg.steps:  # a usable checkpoint (EMA weights)
                live = [p.detach().clone() for p in params]
                _swap_in(params, ema)
                save_model(Path(out_dir) / "checkpoint", tokenizer, text_encoder, unet, scheduler)
                write_json(Path(out_dir) / "checkpoint" / "step.json", {"step": step + 1, "of": cfg.steps})
                _swap_in(params, live)
    _swap_in(params, ema)
    text_encoder.eval(), unet.eval()
    metrics = {
        "config": asdict(cfg), "device": str(device), "torch_threads": torch.get_num_threads(),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_train_mse_running": running, "final_held_out_mse_ema": held_out_mse(),
        "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "params_unet": sum(p.numel() for p in unet.parameters()),
        "history": history,
    }
    if out_dir is not None:
        save_model(out_dir, tokenizer, text_encoder, unet, scheduler)
        shutil.rmtree(Path(out_dir) / "checkpoint", ignore_errors=True)
    return text_encoder, unet, scheduler, tokenizer, metrics


def sample_grid(model: MiniSD, path: Path, guidance_scale: float = GUIDANCE_SCALE) -> None:
    """Save a labelled grid (PNG, written atomically): the ten digits (columns) under six
    attribute rows, seed = column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("normal", "red", "black"), ("bold", "yellow", "gray"), ("normal", "blue", "white"),
            ("bold", "white", "black"), ("normal", "black", "gray"), ("bold", "magenta", "white")]
    prompts = [caption(d, c, b, s) for s, c, b in rows for d in range(10)]
    images = generate(model, prompts, list(range(10)) * len(rows), guidance_scale=guidance_scale)
    images = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows) + 0.5))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if i < 10:
            ax.set_title(DIGITS[i], fontsize=9)
        if i % 10 == 0:
            s, c, b = rows[i // 10]
            ax.set_ylabel(f"{s} {c}\non {b}", fontsize=8)
    fig.suptitle(f"MiniSD samples: 20 steps, DPM-Solver order 2, guidance {guidance_scale}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=60, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train, save the model, the sample grid and the metrics."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=positive_int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=positive_float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--text-encoder-lr-scale", type=nonnegative_float,
                   default=TrainConfig.text_encoder_lr_scale, help="text encoder lr / UNet lr (0 freezes it)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1: reproducible)")
    add_output_arguments(p, "outputs/mini", "folder of the trained model")
    p.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    a = p.parse_args(argv)
    out = output_path(a, lambda: outputs_dir("mini"))
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      train_text_encoder=a.text_encoder_lr_scale > 0,
                      text_encoder_lr_scale=a.text_encoder_lr_scale)
    text_encoder, unet, scheduler, tokenizer, metrics = train(cfg, out, device=a.device)
    text_encoder.cpu(), unet.cpu()
    model = MiniSD(tokenizer, text_encoder, unet, scheduler, VPSchedule.from_diffusers(scheduler), None)
    sample_grid(model, out / "samples.png")
    write_json(out / "train_metrics.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "config")}))


if __name__ == "__main__":
    main()
