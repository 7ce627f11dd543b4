"""The benchmark's gradient problems: one loss ``L = |x_0 - target|^2 / B`` of one batch on the
toy 2-D MLP, MiniSD or the SD 1.x UNet architecture, with gradients for ``x_T``, the
conditioning and the weights. Model code is imported inside :func:`build_problem`, for the
model asked for."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..paths import ROOT
from ..schedule import VPSchedule

Tensor = torch.Tensor

MODELS = ("toy2d", "mini", "sd-arch")


# Per-model defaults: batch, guidance scale, full grid and the --quick grid.
DEFAULTS: dict[str, dict[str, Any]] = {
    "toy2d": dict(batch=1024, guidance=2.0, ref_steps=500,
                  steps=[5, 10, 20, 50, 100], tols=[1e-2, 1e-3, 1e-4],
                  sweep_steps=[3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 70, 100, 150, 200],
                  sweep_tols=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6],
                  nfe_cap=40000,
                  quick=dict(batch=512, steps=[5, 10, 20], tols=[1e-2], ref_steps=200,
                             sweep_steps=[3, 5, 8, 12, 20], sweep_tols=[1e-1, 1e-2, 1e-3, 1e-4],
                             nfe_cap=5000)),
    "mini": dict(batch=8, guidance=3.0, ref_steps=500,
                 steps=[5, 10, 20, 50, 100], tols=[1e-2, 1e-3],
                 sweep_steps=[3, 4, 5, 6, 8, 10, 14, 20, 30, 50, 70, 100],
                 sweep_tols=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5],
                 nfe_cap=3000,
                 quick=dict(batch=2, steps=[5, 10], tols=[1e-1], ref_steps=50,
                            sweep_steps=[3, 5, 8], sweep_tols=[1e-1], nfe_cap=600)),
    "sd-arch": dict(batch=1, guidance=7.5, ref_steps=500,
                    steps=[5, 10, 20, 50, 100], tols=[1e-2, 1e-3],
                    sweep_steps=[4, 6, 8, 10, 14, 20, 30, 50],
                    sweep_tols=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4],
                    nfe_cap=3000,
                    # dopri5 on the raw ODE of a random SD UNet takes minutes even at rtol 0.1
                    quick=dict(size="tiny", modes=["adjoint", "adjoint-cache", "checkpoint", "backprop"],
                               steps=[5, 10], tols=[1e-1], ref_steps=50,
                               sweep_steps=[4, 8], sweep_tols=[1e-1], nfe_cap=600)),
}


@dataclass
class Problem:
    """One gradient problem: ``L(x_0) = |x_0 - target|^2 / B`` with ``x_0`` sampled from
    ``x_T`` and the conditioning ``cond`` (``uncond`` fixed, for guidance), and gradients
    for ``x_T``, ``cond`` and ``params`` (the weights)."""
    eps_fn: Callable
    schedule: VPSchedule
    x_T: Tensor
    cond: Tensor
    uncond: Tensor | None
    params: list[Tensor]
    target: Tensor
    info: dict = field(default_factory=dict)

    def cond_arg(self, c: Tensor) -> Any:
        """The ``cond`` argument of the sampler for conditioning ``c``: ``c`` or ``(c, uncond)``."""
        return c if self.uncond is None else (c, self.uncond)

    def loss(self, x0: Tensor) -> Tensor:
        """``|x0 - target|^2 / B``."""
        return ((x0 - self.target) ** 2).sum() / x0.shape[0]


class GuidedToyEps:
    """Classifier-free guidance on the toy MLP: ``eps_u + w (eps_c - eps_u)``, both halves in
    one batched call; ``cond = (c, uncond)`` with ``uncond`` the zero vector(s)."""

    def __init__(self, model: torch.nn.Module, guidance_scale: float) -> None:
        self.model, self.w = model, float(guidance_scale)

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        c, u = cond
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
        e_u, e_c = self.model(torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([u.expand(b, -1), c.expand(b, -1)])).chunk(2)
        return e_u + self.w * (e_c - e_u)


def sd_unet_config(size: str = "full") -> dict:
    """Stable Diffusion 1.x ``UNet2DConditionModel`` config (block widths 320/640/1280/1280,
    2 layers per block, cross-attention dim 768, 8 heads, 64x64x4 latents). ``size="reduced"``
    keeps the block structure, cross-attention dim and heads but uses widths 32/64/128/128
    and 16x16 latents (a CPU-sized profile of the same architecture); ``size="tiny"`` (the
    ``--quick`` smoke test) widths 32/32/64/64 and 8x8 latents."""
    cfg = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    if size == "reduced":
        cfg.update(sample_size=16, block_out_channels=(32, 64, 128, 128))
    elif size == "tiny":
        cfg.update(sample_size=8, block_out_channels=(32, 32, 64, 64))
    elif size != "full":
        raise ValueError(f"size must be 'full', 'reduced' or 'tiny', got {size!r}")
    return cfg


def drop_time_frequencies(unet: torch.nn.Module, k: int) -> list[int]:
    """Drop the ``k`` fastest of a diffusers UNet's sinusoidal timestep features (frequencies
    ``max_period^(-i / (half - shift))`` per timestep, ``i < k``; columns ``i`` and ``half + i``
    of ``time_proj``'s output, zeroed by a forward hook): a diagnostic variant whose eps does
    not oscillate in t on the scale of ``2 pi`` timesteps (:func:`eps_roughness`), and whose
    weight gradients do not integrate those features. Returns the dropped columns."""
    half = unet.time_proj.num_channels // 2
    if not 0 <= k <= half:
        raise ValueError(f"drop_time_freqs must be in [0, {half}], got {k}")
    cols = list(range(k)) + [half + i for i in range(k)]
    keep = torch.ones(2 * half)
    keep[cols] = 0.0
    unet.time_proj.register_forward_hook(lambda mod, args, out: out * keep.to(out))
    return cols


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_problem(model: str = "toy2d", device: str = "cpu", batch: int | None = None,
                  guidance: float | None = None, size: str | None = None, seed: int = 0,
                  dtype: str = "float32", weights: str | None = None, drop_time_freqs: int = 0) -> Problem:
    """Build the benchmark problem for ``model`` (deterministic given ``seed``).

    * ``toy2d``: the shipped class-conditional 2-D MLP (``data/toy2d/ring``; a freshly
      initialized :class:`~adjoint_lib.models.ToyEps` with seed 0 if missing), one-hot
      class conditioning with guidance, weights = all MLP parameters.
    * ``mini``: MiniSD (``data/mini``; the same UNet config with random weights if missing),
      3x16x16 pixels, prompt embeddings (B, 16, 64) with guidance against the empty prompt,
      weights = all UNet parameters. ``weights``: another MiniSD folder (default ``data/mini``).
    * ``sd-arch``: the SD 1.x UNet architecture with random weights (:func:`sd_unet_config`),
      latents (B, 4, 64, 64) and embeddings (B, 77, 768) with guidance; ``size="reduced"``
      (the default on CPU) and ``"tiny"`` shrink widths and latents. Weights = all UNet parameters.

    ``drop_time_freqs=k`` (UNet models): :func:`drop_time_frequencies` on the loaded UNet.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    d = DEFAULTS[model]
    batch = d["batch"] if batch is None else int(batch)
    guidance = d["guidance"] if guidance is None else float(guidance)
    dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    dev = torch.device(device)
    info: dict[str, Any] = dict(model=model, batch=batch, guidance=guidance, dtype=dtype, seed=seed)

    if model == "toy2d":
        from ..toy2d import load_toy, toy_schedule

        try:
            net, schedule = load_toy("ring")
            info["weights"] = "trained (data/toy2d/ring.safetensors)"
        except FileNotFoundError:
            from ..models.toy import ToyEps
            torch.manual_seed(0)
            net, schedule = ToyEps(cond_dim=8), toy_schedule()
            info["weights"] = "random (ToyEps(cond_dim=8), seed 0): data/toy2d/ring missing"
        net = net.to(dev, dt).eval()
        eps_fn = GuidedToyEps(net, guidance)
        k = net.cond_dim
        x_T = torch.randn(batch, 2, generator=_gen(seed))
        cond = torch.nn.functional.one_hot(torch.arange(batch) % k, k).float()
        uncond = torch.zeros(1, k)
        target = torch.randn(batch, 2, generator=_gen(seed + 1))
        info["description"] = (f"toy 2-D MLP ({sum(p.numel() for p in net.parameters())} params), "
                               f"{batch} points, one-hot class conditioning, guidance {guidance}")
    elif model == "mini":
        from diffusers.models.attention_processor import AttnProcessor

        from ..models import UNetEps
        from ..models import mini as mini_mod
        try:
            m = mini_mod.load(weights, judges=False)
            tok, te, unet, scheduler = m.tokenizer, m.text_encoder, m.unet, m.scheduler
            folder = Path(weights) if weights else mini_mod.DATA_DIR
            blob = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
            info["weights"] = f"trained MiniSD (unet sha1 {hashlib.sha1(blob).hexdigest()[:10]})"
            info["weights_path"] = str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
        except FileNotFoundError:
            from ..models.mini import train as mini_train
            tok = mini_train.build_tokenizer()
            te, unet, scheduler = mini_train.build_models(tok, mini_train.TrainConfig())
            unet.set_attn_processor(AttnProcessor())
            info["weights"] = "random (MiniSD UNet config, seed 0): data/mini missing"
        te.eval().requires_grad_(False)
        schedule = VPSchedule.from_diffusers(scheduler)
        prompts = [mini_mod.caption(i % 10, c, "black", "bold")
                   for i, c in zip(range(batch), ["red", "green", "blue", "yellow", "white"] * batch)]
        with torch.no_grad():
            cond = mini_mod.encode_prompts(tok, te, prompts).float()
            uncond = mini_mod.encode_prompts(tok, te, [""]).float()
        net = unet.to(dev, dt).eval()
        eps_fn = UNetEps(net, schedule=schedule, guidance_scale=guidance,
                         prediction_type=scheduler.config.prediction_type)
        x_T = torch.randn(batch, *mini_mod.IMAGE_SHAPE, generator=_gen(seed))
        target = torch.randn(batch, *mini_mod.IMAGE_SHAPE, generator=_gen(seed + 1)).clamp(-1, 1)
        info["description"] = (f"MiniSD UNet2DConditionModel ({sum(p.numel() for p in net.parameters())} "
                               f"params), {batch}x3x16x16 pixels, prompt embeddings {tuple(cond.shape[1:])}, "
                               f"guidance {guidance}, {scheduler.config.prediction_type}")
    else:
        from diffusers import DDIMScheduler, UNet2DConditionModel

        from ..models import UNetEps
        size = size or ("full" if dev.type == "cuda" else "reduced")
        cfg = sd_unet_config(size)
        torch.manual_seed(seed)
        net = UNet2DConditionModel(**cfg).to(dev, dt).eval()
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False)
        schedule = VPSchedule.from_diffusers(scheduler)
        eps_fn = UNetEps(net, schedule=schedule, guidance_scale=guidance)
        hw = cfg["sample_size"]
        x_T = torch.randn(batch, 4, hw, hw, generator=_gen(seed))
        cond = torch.randn(batch, 77, 768, generator=_gen(seed + 2))
        uncond = torch.randn(1, 77, 768, generator=_gen(seed + 3))
        target = torch.randn(batch, 4, hw, hw, generator=_gen(seed + 1))
        info["weights"] = "random (SD 1.x UNet config)"
        info["size"] = size
        info["unet_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        info["description"] = (f"SD 1.x UNet architecture ({size}: widths {cfg['block_out_channels']}, "
                               f"{sum(p.numel() / 1e6 for p in net.parameters()):.1f}M params), "
                               f"latents {batch}x4x{hw}x{hw}, embeddings 77x768, guidance {guidance}")
    if drop_time_freqs:
        if model == "toy2d":
            raise ValueError("drop_time_freqs applies to the UNet models (mini, sd-arch)")
        info["drop_time_freqs"] = drop_time_frequencies(net, drop_time_freqs)
        info["description"] += f", its {drop_time_freqs} fastest timestep frequencies dropped"
    params = [p.requires_grad_(True) for p in net.parameters()]
    info["n_params"] = sum(p.numel() for p in params)
    to = dict(device=dev, dtype=dt)
    return Problem(eps_fn, schedule, x_T.to(**to), cond.to(**to),
                   None if uncond is None else uncond.to(**to), params, target.to(**to), info)
