"""Benchmarks: memory, wall time, eps evaluations and gradient accuracy of every gradient mode.

::

    python -m adjoint_lib.bench --model toy2d --device cpu            # full grid
    python -m adjoint_lib.bench --model mini --device cpu --quick     # smoke-test grid
    python -m adjoint_lib.bench --model sd-arch --device cuda         # SD 1.x UNet, random weights

``--quick`` runs a reduced grid in-process, without the continuous scheme's rows (and, for
``sd-arch``, at ``size="tiny"`` and without dopri5): about 35 s for toy2d, 75 s for mini and
100 s for sd-arch on one CPU thread.

For one loss ``L = |x_0 - target|^2 / B`` of one batch it measures, for each gradient mode

==================  =====================================================================
``adjoint``         AdjointDPM, ``grad="adjoint"``, ``trajectory="backsolve"`` (O(1) memory),
                    the default ``scheme="transpose"``
``adjoint-cache``   the same on the stored grid states (``trajectory="cache"``): equals checkpoint
``adjoint-cont``    ``scheme="continuous"`` with backsolve: the adjoint ODE's own integrator
``checkpoint``      ``grad="checkpoint"``: the exact gradient of the discrete sampler
``backprop``        ``grad="backprop"``: autograd through the sampling loop
``dopri5``          torchdiffeq ``odeint_adjoint`` (dopri5) on the raw (t, x) ODE, per tolerance
==================  =====================================================================

and every number of steps N:

* **peak memory** of one gradient (forward + backward). CPU: peak resident set size above
  the baseline taken right before the gradient, after a warm-up, each configuration in a
  fresh subprocess (``isolate="process"``). The peak is read exactly from the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; a 1 ms polling thread
  where that is unavailable), and glibc's mmap threshold is pinned at 64 KiB so freed
  tensors go back to the OS instead of lingering in the heap. CUDA:
  ``torch.cuda.max_memory_allocated`` above the baseline.
* the **saved-tensor peak** (:class:`~adjoint_lib.memory.SavedTensorMeter`): the bytes
  autograd keeps for backward - deterministic, independent of allocator and load.
* **wall time**: median of ``repeats`` (>= 3) gradients after a warm-up.
* **eps evaluations** forward and backward (:class:`~adjoint_lib.SampleStats`).
* **gradient errors** (relative error and cosine) for ``x_T``, the conditioning and the
  weights, against the exact discrete gradient at the same N (``checkpoint``) and against
  a converged reference (``checkpoint`` at ``ref_steps``, default 500, checked against half
  as many steps).

Then the **NFE-to-accuracy** comparison: the eps evaluations (forward + backward) the
order-2 adjoint needs to bring the gradient error (the largest relative error of the three
gradients) below ``1e-2`` against the reference, and the same for torchdiffeq
``odeint_adjoint`` dopri5 over a sweep of tolerances (``rtol = atol``).

Results go to ``<out>/<model>_<device>/results.json`` (with device, CPU/GPU name, torch
version, load average and date) and PNG plots next to it, and a table is printed.
:func:`run_benchmark` is the same from Python; :func:`plot_results` and
:func:`format_table` read a results dict (e.g. the shipped ``data/bench/*/results.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .adjoint import SampleStats, sample
from .cli import (add_output_arguments, int_at_least, nonnegative_float, nonnegative_int,
                  output_path, positive_float, positive_int)
from .io import atomic_path, read_json, write_json
from .memory import SavedTensorMeter
from .paths import ROOT, data_dir, outputs_dir
from .schedule import VPSchedule

Tensor = torch.Tensor

MODELS = ("toy2d", "mini", "sd-arch")
MODES = {
    "adjoint": dict(grad="adjoint", trajectory="backsolve", label="adjoint (backsolve)"),
    "adjoint-cache": dict(grad="adjoint", trajectory="cache", label="adjoint (cached trajectory)"),
    "adjoint-cont": dict(grad="adjoint", trajectory="backsolve", scheme="continuous",
                         label="adjoint, continuous scheme (backsolve)"),
    "checkpoint": dict(grad="checkpoint", trajectory="backsolve", label="checkpoint (exact discrete)"),
    "backprop": dict(grad="backprop", trajectory="backsolve", label="backprop"),
    "dopri5": dict(grad=None, trajectory=None, label="torchdiffeq odeint_adjoint dopri5 (raw ODE)"),
}
COMPONENTS = ("x_T", "cond", "weights")
TARGET_ERROR = 1e-2

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


# =========================================================================== problems
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
        return c if self.uncond is None else (c, self.uncond)

    def loss(self, x0: Tensor) -> Tensor:
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
    of ``time_proj``'s output, zeroed by a forward hook): a diagnostic variant whose eps no
    longer oscillates in t on the scale of ``2 pi`` timesteps (:func:`eps_roughness`), and whose
    weight gradients no longer integrate those features. Returns the dropped columns."""
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
        from .toy2d import load_toy, toy_schedule

        try:
            net, schedule = load_toy("ring")
            info["weights"] = "trained (data/toy2d/ring.safetensors)"
        except FileNotFoundError:
            from .models.toy import ToyEps
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

        from .models import UNetEps
        from .models import mini as mini_mod
        try:
            m = mini_mod.load(weights, judges=False)
            tok, te, unet, scheduler = m.tokenizer, m.text_encoder, m.unet, m.scheduler
            folder = Path(weights) if weights else mini_mod.DATA_DIR
            blob = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
            info["weights"] = f"trained MiniSD (unet sha1 {hashlib.sha1(blob).hexdigest()[:10]})"
            info["weights_path"] = str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
        except FileNotFoundError:
            from .models.mini import train as mini_train
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

        from .models import UNetEps
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


# =========================================================================== one gradient
def gradient(problem: Problem, mode: str, steps: int | None = None, order: int = 2,
             rtol: float | None = None, stats: SampleStats | None = None) -> dict[str, Tensor]:
    """One gradient of ``problem.loss`` by ``mode`` (a key of :data:`MODES`): returns
    ``{"x_T", "cond", "weights"}`` (weights flattened into one vector); ``stats`` gets the
    eps-evaluation counts. ``steps``/``order`` for the library modes, ``rtol`` (= atol)
    for ``dopri5``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    stats = stats if stats is not None else SampleStats()
    x = problem.x_T.clone().requires_grad_(True)
    c = problem.cond.clone().requires_grad_(True)
    for p in problem.params:
        p.grad = None
    if mode == "dopri5":
        from .baselines import raw_ode_sample
        if rtol is None:
            raise ValueError("mode 'dopri5' needs rtol=")
        eps_fn = problem.eps_fn
        if x.device.type != "cpu":  # RawPFODE builds its timestep tensor on the CPU
            def eps_fn(x_, t_, c_, _f=problem.eps_fn):
                return _f(x_, t_.to(x_.device), c_)
        x0 = raw_ode_sample(eps_fn, x, problem.cond_arg(c), schedule=problem.schedule,
                            method="dopri5", rtol=rtol, atol=rtol, params=problem.params,
                            adjoint=True, stats=stats)
    else:
        if steps is None:
            raise ValueError(f"mode {mode!r} needs steps=")
        spec = MODES[mode]
        x0 = sample(problem.eps_fn, x, problem.cond_arg(c), schedule=problem.schedule, steps=steps,
                    order=order, grad=spec["grad"], trajectory=spec["trajectory"],
                    scheme=spec.get("scheme", "transpose"),
                    params=problem.params, stats=stats)
    problem.loss(x0).backward()
    out = {"x_T": x.grad.detach(), "cond": c.grad.detach(),
           "weights": torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in problem.params])}
    for p in problem.params:
        p.grad = None
    return out


def saved_tensor_peak(problem: Problem, mode: str, steps: int | None = None, order: int = 2,
                      rtol: float | None = None) -> tuple[int, SampleStats]:
    """Deterministic memory of one gradient: the peak bytes of autograd's saved tensors
    (:class:`~adjoint_lib.memory.SavedTensorMeter`) over forward and backward, and the stats."""
    stats = SampleStats()
    with SavedTensorMeter() as meter:
        gradient(problem, mode, steps, order, rtol, stats)
    return meter.peak_bytes, stats


@torch.no_grad()
def eps_along_t(problem: Problem, t_center: float, offsets: Sequence[float] | Tensor,
                steps: int = 50) -> Tensor:
    """``eps(x_t, t_center + offset, c)`` for each offset, at the fixed state ``x_t`` that
    sampling from the problem's ``x_T`` reaches at ``t_center`` (order 2, ``steps`` steps):
    the network's dependence on ``t`` alone. Returns (len(offsets), *x.shape)."""
    sch = problem.schedule
    if not sch.t_min < t_center < sch.t_max:
        raise ValueError(f"t_center must lie in ({sch.t_min}, {sch.t_max}), got {t_center}")
    c = problem.cond_arg(problem.cond)
    x = sample(problem.eps_fn, problem.x_T, c, schedule=sch, steps=steps, order=2, t_end=t_center)
    n = x.shape[0]
    return torch.stack([problem.eps_fn(x, torch.full((n,), t_center + float(o), dtype=x.dtype,
                                                     device=x.device), c)
                        for o in torch.as_tensor(offsets).tolist()])


def eps_roughness(problem: Problem, t_center: float,
                  spacings: Sequence[float] = (0.25, 1.0, 4.0, 16.0)) -> dict[float, float]:
    """RMS second difference of eps in t, ``|eps(t+h) - 2 eps(t) + eps(t-h)| / h^2`` per spacing
    ``h`` (:func:`eps_along_t`). For eps smooth in t it is the same at every h; growing as h
    shrinks it shows oscillation on the scale of h, which no step size above h resolves."""
    hs = [float(h) for h in spacings]
    e = eps_along_t(problem, t_center, [0.0] + [s * h for h in hs for s in (-1.0, 1.0)])  # one trajectory
    return {h: float(((e[1 + 2 * j] - 2 * e[0] + e[2 + 2 * j]) / h ** 2).double().pow(2).mean().sqrt())
            for j, h in enumerate(hs)}


def weight_slice(net: torch.nn.Module, name: str) -> slice:
    """Where parameter ``name`` of ``net`` lies in the flattened ``"weights"`` gradient of
    :func:`gradient` (the problem's params are ``net.parameters()``, in order)."""
    start = 0
    for n, p in net.named_parameters():
        if n == name:
            return slice(start, start + p.numel())
        start += p.numel()
    raise KeyError(f"{type(net).__name__} has no parameter {name!r}")


def grad_errors(g: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Relative error ``|g - ref| / |ref|`` and cosine similarity per component."""
    out = {}
    for k in COMPONENTS:
        a, b = g[k].double().flatten().cpu(), ref[k].double().flatten().cpu()
        nb = float(b.norm())
        out[k] = dict(rel=float((a - b).norm()) / nb if nb > 0 else float("nan"),
                      cos=float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    out["max_rel"] = max(out[k]["rel"] for k in COMPONENTS)
    return out


# =========================================================================== memory meters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_malloc(threshold: int = 65536) -> bool:
    """Pin glibc's mmap threshold (and trim threshold) so that large blocks are mmapped and
    returned to the OS when freed: RSS then follows the live tensors. Returns success."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _status_kb(field_name: str) -> int | None:
    try:
        m = re.search(field_name + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.peak_bytes`` is the peak resident set size above
    the RSS at entry. Exact via the kernel's high-water mark (``VmHWM`` reset by writing 5 to
    ``/proc/self/clear_refs``); otherwise a polling thread (psutil, every ``interval`` s)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak_bytes, self.baseline_bytes, self.method = interval, 0, 0, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _poll(self) -> None:
        import psutil
        proc = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        rss = _status_kb("VmRSS")
        if rss is not None and self._reset_hwm() and _status_kb("VmHWM") is not None:
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
            self.baseline_bytes = _status_kb("VmRSS") * 1024
        else:
            import psutil
            self.method = f"psutil RSS polling every {self.interval * 1000:g} ms"
            self.baseline_bytes = self._max = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._max
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self.baseline_bytes)


@contextlib.contextmanager
def _cuda_peak(device: torch.device):
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    box = {"baseline_bytes": torch.cuda.memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    yield box
    torch.cuda.synchronize(device)
    box["peak_bytes"] = torch.cuda.max_memory_allocated(device) - box["baseline_bytes"]


# =========================================================================== jobs
def _save_grads(g: dict[str, Tensor], path: str | None) -> None:
    if path:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save({k: v.float().cpu() for k, v in g.items()}, tmp)


def _readable_grads(path: str) -> bool:
    """Whether the gradient file ``path`` opens (a truncated or corrupt one warns; memory-mapped,
    so checking a large file reads little of it)."""
    try:
        torch.load(path, mmap=True, weights_only=True)
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - any unreadable file is re-computed
        warnings.warn(f"ignoring unreadable bench cache file {path}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=2)
        return False


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


_PROBLEM_CACHE: dict[str, Problem] = {}


def _problem_for(job: dict) -> Problem:
    key = json.dumps(job["problem"], sort_keys=True)
    if key not in _PROBLEM_CACHE:
        _PROBLEM_CACHE.clear()
        _PROBLEM_CACHE[key] = build_problem(**job["problem"])
    return _PROBLEM_CACHE[key]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_job(job: dict) -> dict:
    """Run one job (``kind``: ``profile``, ``reference``, ``sweep-adjoint``, ``sweep-dopri5``)
    in this process and return its result dict."""
    torch.set_num_threads(job["threads"])
    pin_malloc()
    problem = _problem_for(job)
    device = job["problem"]["device"]
    kind, order = job["kind"], job["order"]
    res: dict[str, Any] = dict(kind=kind, status="ok")
    try:
        if kind == "profile":
            mode, steps, rtol = job["mode"], job.get("steps"), job.get("rtol")
            # warm-up: a small gradient of the same mode (libraries, kernels, thread pools)
            gradient(problem, mode, min(steps, 2) if steps else None, order, 1e-1 if rtol else None)
            stats = SampleStats()
            with SavedTensorMeter() as meter:
                if device.startswith("cuda"):
                    with _cuda_peak(torch.device(device)) as peak:
                        g = gradient(problem, mode, steps, order, rtol, stats)
                    peak_bytes, baseline, method = peak["peak_bytes"], peak["baseline_bytes"], peak["method"]
                else:
                    with PeakRSS() as peak:
                        g = gradient(problem, mode, steps, order, rtol, stats)
                    peak_bytes, baseline, method = peak.peak_bytes, peak.baseline_bytes, peak.method
            _save_grads(g, job.get("grads_path"))
            del g
            times, cpu_times = [], []
            for _ in range(job["repeats"]):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                gradient(problem, mode, steps, order, rtol)
                _sync(device)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            res.update(mode=mode, steps=steps, rtol=rtol, order=order,
                       nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                       peak_bytes=int(peak_bytes), baseline_bytes=int(baseline), memory_method=method,
                       saved_peak_bytes=int(meter.peak_bytes), saved_count=int(meter.count),
                       time_s=statistics.median(times), times_s=times,
                       cpu_time_s=statistics.median(cpu_times), cpu_times_s=cpu_times)
        elif kind == "reference":
            steps = job["steps"]
            stats = SampleStats()
            g = gradient(problem, "checkpoint", steps, order, stats=stats)
            _save_grads(g, job.get("grads_path"))
            half = gradient(problem, "checkpoint", steps // 2, order)
            res.update(mode="checkpoint", steps=steps, order=order, nfe_forward=stats.nfe_forward,
                       nfe_backward=stats.nfe_backward,
                       self_check=dict(steps=steps // 2, errors=grad_errors(half, g)))
        elif kind in ("sweep-adjoint", "sweep-dopri5"):
            ref = torch.load(job["ref_path"])
            points = []
            below = 0
            for v in job["values"]:
                stats = SampleStats()
                t0 = time.perf_counter()
                try:
                    if kind == "sweep-adjoint":
                        g = gradient(problem, job.get("mode", "adjoint"), v, order, stats=stats)
                    else:
                        g = gradient(problem, "dopri5", rtol=v, stats=stats)
                except AssertionError as e:  # torchdiffeq: underflow in dt / max steps
                    points.append(dict(value=v, status=f"failed: {e}"))
                    break
                err = grad_errors(g, ref)
                points.append(dict(value=v, nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                                   nfe=stats.nfe_forward + stats.nfe_backward,
                                   seconds=time.perf_counter() - t0, errors=err))
                below = below + 1 if err["max_rel"] <= job["target"] else 0
                if kind == "sweep-dopri5" and (below >= 2 or stats.nfe_forward + stats.nfe_backward > job["nfe_cap"]):
                    break
            res.update(points=points)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        if not _is_oom(e):
            raise
        res.update(status="oom", error=str(e).splitlines()[0][:300])
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["problem_info"] = problem.info
    return res


def _job_key(job: dict) -> str:
    core = {k: v for k, v in job.items() if k not in ("grads_path", "ref_path", "result_path")}
    return hashlib.sha1(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]


def _run_isolated(job: dict, job_dir: Path) -> dict:
    """Run a job in a fresh Python process (``python -m adjoint_lib.bench --worker job.json``)."""
    spec = job_dir / f"{job['name']}.job.json"
    job = dict(job, result_path=str(job_dir / f"{job['name']}.result.json"))
    write_json(spec, job, indent=None)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "adjoint_lib.bench", "--worker", str(spec)],
                          env=env, capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        killed = proc.returncode in (-9, 137)
        return dict(kind=job["kind"], status="oom" if killed else "failed", returncode=proc.returncode,
                    error=tail, mode=job.get("mode"), steps=job.get("steps"), rtol=job.get("rtol"))
    return json.loads(Path(job["result_path"]).read_text())


# =========================================================================== the benchmark
def _meta(device: str, threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import torchdiffeq
    meta = dict(device=device, cpu_model=cpu, cpu_count=os.cpu_count(), torch_threads=threads,
                torch_version=torch.__version__, diffusers_version=diffusers.__version__,
                torchdiffeq_version=getattr(torchdiffeq, "__version__", "?"),
                python_version=platform.python_version(), platform=platform.platform(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                loadavg_start=[round(x, 2) for x in os.getloadavg()])
    if device.startswith("cuda"):
        meta["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
        meta["cuda_version"] = torch.version.cuda
        meta["device_name"] = meta["gpu_name"]
    else:
        meta["device_name"] = f"CPU: {cpu} ({threads} thread{'s' if threads > 1 else ''})"
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return meta


def run_tag(model: str, device: str, drop_time_freqs: int = 0) -> str:
    """Results folder name: ``<model>[-drop<k>]_<device type>``, e.g. ``mini_cpu``."""
    return f"{model}{f'-drop{drop_time_freqs}' if drop_time_freqs else ''}_{device.split(':')[0]}"


def run_benchmark(model: str = "toy2d", device: str = "cpu", quick: bool = False,
                  steps: Sequence[int] | None = None, modes: Sequence[str] | None = None,
                  tols: Sequence[float] | None = None, order: int = 2, batch: int | None = None,
                  guidance: float | None = None, size: str | None = None, repeats: int = 3,
                  ref_steps: int | None = None, sweep_steps: Sequence[int] | None = None,
                  sweep_tols: Sequence[float] | None = None, threads: int | None = None,
                  isolate: str | None = None, out: str | Path | None = None, resume: bool = False,
                  seed: int = 0, dtype: str = "float32", plots: bool = True,
                  progress: bool = True, command: str | None = None,
                  weights: str | Path | None = None, drop_time_freqs: int = 0) -> dict:
    """Run the benchmark and write ``<out>/<run_tag>/results.json`` (+ PNGs), e.g. ``mini_cpu``.

    ``isolate="process"`` (default for the full grid) runs each configuration in a fresh
    subprocess; ``"none"`` (default with ``quick``) runs everything in this process (same
    meters; the RSS numbers are then less independent). ``resume`` reuses job results of an
    earlier run with identical settings (cached under ``outputs/bench/_jobs``); a cache entry
    that cannot be read (truncated JSON or gradient file) is re-run, with a warning.
    Every file is written to a temporary name and moved into place.
    Returns the results dict.
    """
    from tqdm.auto import tqdm

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if repeats < 3:
        raise ValueError("repeats must be at least 3 (the wall time is a median)")
    d = dict(DEFAULTS[model])
    if quick:
        d.update(d["quick"])
    # --quick leaves out the continuous scheme's rows (and sd-arch's dopri5); ask with modes=
    modes = list(modes or d.get("modes") or [m for m in MODES if not (quick and m == "adjoint-cont")])
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {list(MODES)}")
    steps = sorted(set(steps or d["steps"]))
    tols = sorted(set(tols or d["tols"]), reverse=True)
    ref_steps = ref_steps or d["ref_steps"]
    sweep_steps = sorted(set(sweep_steps or d["sweep_steps"]))
    sweep_tols = sorted(set(sweep_tols or d["sweep_tols"]), reverse=True)
    threads = threads or (1 if device == "cpu" else max(1, torch.get_num_threads()))
    isolate = isolate or ("none" if quick else "process")
    if isolate not in ("process", "none"):
        raise ValueError(f"isolate must be 'process' or 'none', got {isolate!r}")
    batch = batch or d["batch"]
    size = size or d.get("size")
    problem_cfg = dict(model=model, device=device, batch=batch, guidance=guidance, size=size,
                       seed=seed, dtype=dtype, weights=None if weights is None else str(weights))
    if drop_time_freqs:  # only when set, so that earlier runs' job keys stay valid for --resume
        problem_cfg["drop_time_freqs"] = int(drop_time_freqs)
    tag = run_tag(model, device, drop_time_freqs)
    out_dir = Path(out) if out is not None else outputs_dir("bench")
    out_dir = out_dir / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    run_hash = hashlib.sha1(json.dumps([problem_cfg, order, threads, repeats], sort_keys=True).encode()).hexdigest()[:8]
    job_dir = outputs_dir("bench", "_jobs", f"{tag}_{run_hash}")
    meta = _meta(device, threads)
    meta.update(model=model, quick=quick, isolation=isolate, command=command)

    base = dict(problem=problem_cfg, threads=threads, order=order)
    jobs: list[dict] = []
    for mode in modes:
        if mode == "dopri5":
            jobs += [dict(base, kind="profile", mode=mode, rtol=t, repeats=repeats, name=f"dopri5_tol{t:g}")
                     for t in tols]
        else:
            for n in steps:
                jobs.append(dict(base, kind="profile", mode=mode, steps=n, repeats=repeats, name=f"{mode}_N{n}"))
    if "checkpoint" not in modes:  # the exact discrete gradients are needed for the errors
        jobs += [dict(base, kind="profile", mode="checkpoint", steps=n, repeats=repeats, name=f"checkpoint_N{n}")
                 for n in steps]
    jobs.append(dict(base, kind="reference", steps=ref_steps, name=f"reference_N{ref_steps}"))
    for mode in ["adjoint"] + ([] if quick or "adjoint-cont" not in modes else ["adjoint-cont"]):
        jobs.append(dict(base, kind="sweep-adjoint", mode=mode, values=sweep_steps, target=TARGET_ERROR,
                         name=f"sweep_{mode}"))
    if "dopri5" in modes:
        jobs.append(dict(base, kind="sweep-dopri5", values=sweep_tols, target=TARGET_ERROR,
                         nfe_cap=d["nfe_cap"], name="sweep_dopri5"))

    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    ref_path = job_dir / f"reference_N{ref_steps}_order{order}.grads.pt"
    bar = tqdm(jobs, desc=f"bench {tag}", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job["name"])
        job["key"] = _job_key(job)
        job["grads_path"] = str(job_dir / f"{job['name']}.grads.pt") if job["kind"] in ("profile", "reference") else None
        if job["kind"] == "reference":
            job["grads_path"] = str(ref_path)
        if job["kind"].startswith("sweep"):
            job["ref_path"] = str(ref_path)
        cached = job_dir / f"{job['name']}.result.json"
        if resume:
            r = read_json(cached, what="bench cache entry")
            if isinstance(r, dict) and r.get("key") == job["key"] and r.get("status") == "ok" and \
                    (job["grads_path"] is None or _readable_grads(job["grads_path"])):
                results[job["name"]] = r
                continue
        t0 = time.perf_counter()
        r = _run_isolated(job, job_dir) if isolate == "process" else run_job(job)
        r.update(key=job["key"], job_seconds=round(time.perf_counter() - t0, 2))
        write_json(cached, r, indent=None)
        results[job["name"]] = r
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_seconds"] = round(time.perf_counter() - t_start, 1)
    res = _assemble(results, jobs, job_dir, meta, dict(
        steps=steps, modes=modes, tols=tols, order=order, repeats=repeats, ref_steps=ref_steps,
        sweep_steps=sweep_steps, sweep_tols=sweep_tols, target_error=TARGET_ERROR, seed=seed,
        dtype=dtype, batch=batch, loss="|x_0 - target|^2 / B", nfe_cap=d["nfe_cap"]))
    write_json(out_dir / "results.json", res)
    if plots:
        plot_results(res, out_dir)
    return res


def _load_grads(path: str | None) -> dict[str, Tensor] | None:
    return torch.load(path) if path and Path(path).exists() else None


def nfe_to_reach(points: Sequence[tuple[float, float]], target: float = TARGET_ERROR) -> dict | None:
    """Eps evaluations needed to reach error ``target`` from ``(nfe, error)`` points sorted by
    nfe: the first point at or below the target, and a log-log interpolation between it and
    the point before. ``None`` if never reached."""
    pts = sorted((n, e) for n, e in points if e is not None and e == e and n > 0)
    for i, (n, e) in enumerate(pts):
        if e <= target:
            interp = float(n)
            if i > 0 and pts[i - 1][1] > target and e > 0:
                (n0, e0), (n1, e1) = pts[i - 1], (n, e)
                s = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
                interp = math.exp(math.log(n0) + s * (math.log(n1) - math.log(n0)))
            return dict(nfe_first=int(n), nfe_interp=round(interp, 1), error_at_first=e)
    return None


def _assemble(results: dict, jobs: list[dict], job_dir: Path, meta: dict, config: dict) -> dict:
    ref_job = next(j for j in jobs if j["kind"] == "reference")
    ref = _load_grads(ref_job["grads_path"])
    reference = dict(results.get(ref_job["name"], {}))
    reference.pop("problem_info", None)
    profiles = []
    info = {}
    for job in jobs:
        if job["kind"] != "profile":
            continue
        r = dict(results[job["name"]])
        info = r.pop("problem_info", info)
        r.update(label=MODES[job["mode"]]["label"], mode=job["mode"], steps=job.get("steps"), rtol=job.get("rtol"))
        errs: dict[str, Any] = {}
        if r["status"] == "ok":
            g = _load_grads(job["grads_path"])
            if job["mode"] != "dopri5":
                disc = next((j for j in jobs if j["kind"] == "profile" and j["mode"] == "checkpoint"
                             and j["steps"] == job["steps"]), None)
                gd = _load_grads(disc["grads_path"]) if disc else None
                if gd is not None:
                    errs["vs_discrete"] = grad_errors(g, gd)
            if ref is not None:
                errs["vs_reference"] = grad_errors(g, ref)
        r["errors"] = errs
        profiles.append(r)
    sweeps = {}
    for job in jobs:
        if job["kind"].startswith("sweep") and results.get(job["name"], {}).get("status") == "ok":
            name = "dopri5" if job["kind"] == "sweep-dopri5" else f"{job['mode']}_order{config['order']}"
            sweeps[name] = results[job["name"]]["points"]
    res = dict(meta=meta, config=config, problem=info, reference=reference, profiles=profiles,
               sweeps=sweeps)
    res["nfe_to_accuracy"] = _nfe_summary(sweeps, config)
    res["checks"] = _checks(res)
    return res


def _nfe_summary(sweeps: dict, config: dict) -> dict:
    out: dict[str, Any] = dict(target=config["target_error"])
    for metric in ("max_rel", "x_T", "cond", "weights"):
        row = {}
        for name, pts in sweeps.items():
            xy = [(p["nfe"], p["errors"][metric] if metric == "max_rel" else p["errors"][metric]["rel"])
                  for p in pts if "errors" in p]
            row[name] = nfe_to_reach(xy, config["target_error"])
        for name in sweeps:
            if name != "dopri5" and row.get("dopri5") and row[name]:
                key = "ratio_dopri5_over_" + name.split("_order")[0].replace("-", "_")
                row[key] = round(row["dopri5"]["nfe_interp"] / row[name]["nfe_interp"], 2)
        out[metric] = row
    return out


def _profile(res: dict, mode: str, steps: int) -> dict | None:
    return next((p for p in res["profiles"] if p["mode"] == mode and p["steps"] == steps
                 and p.get("status") == "ok"), None)


def _checks(res: dict) -> dict:
    """The issue's acceptance numbers, where the grid contains them."""
    checks: dict[str, Any] = {}
    a10, a100 = _profile(res, "adjoint", 10), _profile(res, "adjoint", 100)
    if a10 and a100:
        r = a100["peak_bytes"] / max(a10["peak_bytes"], 1)
        checks["adjoint_peak_memory_N100_over_N10"] = dict(
            value=round(r, 3), saved_tensor_ratio=round(a100["saved_peak_bytes"] / max(a10["saved_peak_bytes"], 1), 3),
            criterion="within 15% (0.85 .. 1.15)", passed=abs(r - 1) <= 0.15)
    b10, b100 = _profile(res, "backprop", 10), _profile(res, "backprop", 100)
    if b10 and b100:
        r = b100["peak_bytes"] / max(b10["peak_bytes"], 1)
        checks["backprop_peak_memory_N100_over_N10"] = dict(
            value=round(r, 2), saved_tensor_ratio=round(b100["saved_peak_bytes"] / max(b10["saved_peak_bytes"], 1), 2),
            criterion=">= 5", passed=r >= 5)
    a20, b20 = _profile(res, "adjoint", 20), _profile(res, "backprop", 20)
    if a20 and b20:
        r = a20["time_s"] / b20["time_s"]
        checks["adjoint_time_over_backprop_N20"] = dict(value=round(r, 2), criterion="<= 2.5", passed=r <= 2.5,
                                                        metric="median wall time")
        if a20.get("cpu_time_s") and b20.get("cpu_time_s"):
            checks["adjoint_time_over_backprop_N20"]["cpu_time_ratio"] = round(a20["cpu_time_s"] / b20["cpu_time_s"], 2)
    if a20 and "vs_discrete" in a20["errors"]:
        c = a20["errors"]["vs_discrete"]["x_T"]["cos"]
        order = res.get("config", {}).get("order", 2)
        checks[f"adjoint_order{order}_N20_cosine_x_T_vs_discrete"] = dict(
            value=round(c, 6), cond=round(a20["errors"]["vs_discrete"]["cond"]["cos"], 6),
            weights=round(a20["errors"]["vs_discrete"]["weights"]["cos"], 6), criterion=">= 0.999", passed=c >= 0.999)
    nfe = res.get("nfe_to_accuracy", {}).get("max_rel", {})
    if "ratio_dopri5_over_adjoint" in nfe:
        r = nfe["ratio_dopri5_over_adjoint"]
        checks["nfe_to_1e-2_dopri5_over_adjoint"] = dict(value=r, criterion=">= 5", passed=r >= 5,
                                                        metric="largest relative error of x_T, cond, weights")
    return checks


# =========================================================================== reporting
def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_table(res: dict) -> str:
    """The results as a text table (one row per mode and N / tolerance) plus the checks."""
    m = res["meta"]
    lines = [f"# {m['model']} on {m['device_name']} | torch {m['torch_version']} | {m['date']} | "
             f"load avg {m['loadavg_start']} -> {m.get('loadavg_end')} | {res['problem'].get('description', '')}",
             f"# weights: {res['problem'].get('weights')} | memory: {res['profiles'][0].get('memory_method', '?') if res['profiles'] else '?'}",
             f"{'mode':<14}{'N/tol':>7}{'NFE f/b':>11}{'peak MB':>9}{'saved MB':>9}{'time s':>8}{'cpu s':>8}"
             f"{'rel xT':>9}{'cos xT':>10}{'ref xT':>9}{'ref c':>9}{'ref W':>9}"]
    for p in res["profiles"]:
        n = f"{p['steps']}" if p["steps"] is not None else f"{p['rtol']:g}"
        if p.get("status") != "ok":
            lines.append(f"{p['mode']:<14}{n:>7}  {p.get('status')}: {str(p.get('error', ''))[:60]}")
            continue
        e = p["errors"]
        dsc, ref = e.get("vs_discrete"), e.get("vs_reference")
        f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        cos_xt = "-" if dsc is None else "%.6f" % dsc["x_T"]["cos"]
        lines.append(f"{p['mode']:<14}{n:>7}{p['nfe_forward']:>6}/{p['nfe_backward']:<4}"
                     f"{_mb(p['peak_bytes']):>9}{_mb(p['saved_peak_bytes']):>9}{p['time_s']:>8.3f}"
                     f"{p.get('cpu_time_s', float('nan')):>8.3f}"
                     f"{f(dsc['x_T']['rel'] if dsc else None):>9}{cos_xt:>10}"
                     f"{f(ref['x_T']['rel'] if ref else None):>9}{f(ref['cond']['rel'] if ref else None):>9}"
                     f"{f(ref['weights']['rel'] if ref else None):>9}")
    nfe = res.get("nfe_to_accuracy", {})
    for metric in ("max_rel", "x_T"):
        row = nfe.get(metric, {})
        parts = [f"{k}: {v['nfe_interp'] if v else 'not reached'}" for k, v in row.items() if not k.startswith("ratio")]
        lines.append(f"NFE to rel. error {nfe.get('target')} ({metric}): " + ", ".join(parts)
                     + (f", ratio {row['ratio_dopri5_over_adjoint']}x" if "ratio_dopri5_over_adjoint" in row else ""))
    for k, v in res.get("checks", {}).items():
        lines.append(f"check {k}: {v['value']} ({v['criterion']}) {'PASS' if v['passed'] else 'FAIL'}")
    return "\n".join(lines)


_COLORS = {"adjoint": "C0", "adjoint-cache": "C1", "checkpoint": "C2", "backprop": "C3", "dopri5": "C4",
           "adjoint-cont": "C5"}


def _series(res: dict, mode: str, fn: Callable[[dict], float | None]) -> tuple[list, list]:
    xs, ys = [], []
    for p in res["profiles"]:
        if p["mode"] == mode and p.get("status") == "ok":
            y = fn(p)
            if y is not None and y == y:
                xs.append(p["steps"] if p["steps"] is not None else p["nfe_forward"])
                ys.append(y)
    return xs, ys


PLOTS = ("memory", "time", "grad_error", "nfe_accuracy")


def plot_results(res: dict, out_dir: str | Path | None = None, dpi: int = 80,
                 which: Sequence[str] = PLOTS) -> dict:
    """Figures from a results dict: ``memory`` (peak memory and saved tensors vs N), ``time``,
    ``grad_error`` (relative error vs N per gradient) and ``nfe_accuracy`` (error vs eps
    evaluations, adjoint vs dopri5), or the subset ``which``. Saved as ``<out_dir>/<name>.png``
    when ``out_dir`` is given. Returns ``{name: Figure}``."""
    bad = [w for w in which if w not in PLOTS]
    if bad:
        raise ValueError(f"unknown plots {bad}; choose from {PLOTS}")
    import matplotlib
    if out_dir is not None and matplotlib.get_backend().lower().startswith("qt"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def _ticks(ax):  # plain-text tick labels (mathtext layout is slow); 1-2-5 on short ranges
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            span = math.log10(max(lim) / max(min(lim), 1e-300))
            subs = (1.0, 2.0, 5.0) if span < 2.5 else (1.0,)
            axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())

    m = res["meta"]
    where = f"{m['model']}, {m['device_name']}"
    modes = [mo for mo in MODES if any(p["mode"] == mo for p in res["profiles"])]
    xlabel = "sampling steps N (dopri5: forward eps evaluations)"
    figs = {}

    if "memory" in which:
        figs["memory"] = _plot_memory(plt, res, modes, xlabel, where, _ticks)
    if "time" in which:
        figs["time"] = _plot_time(plt, res, modes, xlabel, where, _ticks)
    if "grad_error" in which:
        figs["grad_error"] = _plot_grad_error(plt, res, modes, xlabel, where, _ticks)
    if "nfe_accuracy" in which:
        figs["nfe_accuracy"] = _plot_nfe(plt, res, where, _ticks)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, f in figs.items():
            with atomic_path(out_dir / f"{name}.png", suffix=".png") as tmp:
                f.savefig(tmp, dpi=dpi, format="png")
    return figs


def _plot_memory(plt, res, modes, xlabel, where, _ticks):
    m = res["meta"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mo in modes:
        for ax, key in zip(axes, ("peak_bytes", "saved_peak_bytes")):
            xs, ys = _series(res, mo, lambda p: p[key] / 2**20)
            ax.plot(xs, ys, "o-", color=_COLORS[mo], label=MODES[mo]["label"])
    mem_kind = "peak GPU memory" if m["device"].startswith("cuda") else "peak RSS"
    axes[0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"{mem_kind} above baseline (MiB)",
                title=f"Memory of one gradient ({mem_kind})")
    axes[1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="saved-for-backward peak (MiB)",
                title="Autograd saved tensors (deterministic)")
    axes[0].legend(fontsize=7)
    for ax in axes:
        _ticks(ax)
    fig.suptitle(where, fontsize=9)
    fig.tight_layout()
    return fig


def _plot_time(plt, res, modes, xlabel, where, _ticks):
    m = res["meta"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mo in modes:
        xs, ys = _series(res, mo, lambda p: p["time_s"])
        ax.plot(xs, ys, "o-", color=_COLORS[mo], label=MODES[mo]["label"])
        if not m["device"].startswith("cuda"):
            xs, ys = _series(res, mo, lambda p: p.get("cpu_time_s"))
            ax.plot(xs, ys, ":", color=_COLORS[mo], alpha=0.7)
    if not m["device"].startswith("cuda"):
        ax.plot([], [], "k:", label="dotted: CPU time of the process")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="time per gradient (s, median)",
           title=f"Time of one gradient\n{where}, load {m['loadavg_start'][0]}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    _ticks(ax)
    fig.tight_layout()
    return fig


def _plot_grad_error(plt, res, modes, xlabel, where, _ticks):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, comp in zip(axes, COMPONENTS):
        for mo in modes:
            if mo == "checkpoint":
                xs, ys = _series(res, mo, lambda p: p["errors"].get("vs_reference", {}).get(comp, {}).get("rel"))
                ax.plot(xs, ys, "o-", color=_COLORS[mo], label=f"{MODES[mo]['label']} vs reference")
                continue
            xs, ys = _series(res, mo, lambda p: p["errors"].get("vs_reference", {}).get(comp, {}).get("rel"))
            ax.plot(xs, ys, "x:" if mo == "backprop" else "o-", color=_COLORS[mo], label=f"{mo} vs reference")
            xs, ys = _series(res, mo, lambda p: p["errors"].get("vs_discrete", {}).get(comp, {}).get("rel"))
            xs, ys = [x for x, y in zip(xs, ys) if y > 1e-7], [y for y in ys if y > 1e-7]
            if ys:  # (backprop equals the exact discrete gradient to rounding: not drawn)
                ax.plot(xs, ys, "s--", color=_COLORS[mo], alpha=0.6, label=f"{mo} vs exact discrete")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, title=f"gradient w.r.t. {comp}")
        _ticks(ax)
    axes[0].set_ylabel("relative error")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Gradient error (reference: checkpoint, {res['config']['ref_steps']} steps) - {where}", fontsize=9)
    fig.tight_layout()
    return fig


def _plot_nfe(plt, res, where, _ticks):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in res.get("sweeps", {}).items():
        ok = [p for p in pts if "errors" in p]
        mode = name.split("_order")[0]
        lbl = (f"{MODES[mode]['label']}, order 2 (N = " if mode in MODES and mode != "dopri5"
               else "torchdiffeq dopri5 (rtol = ")
        ax.plot([p["nfe"] for p in ok], [p["errors"]["max_rel"] for p in ok], "o-", color=_COLORS.get(mode, "C7"),
                label=lbl + ", ".join(f"{p['value']:g}" for p in ok[:1]) + " .. "
                + ", ".join(f"{p['value']:g}" for p in ok[-1:]) + ")")
    target = res["config"]["target_error"]
    ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:g}")
    ax.set(xscale="log", yscale="log", xlabel="eps evaluations per gradient (forward + backward)",
           ylabel="gradient error (max rel. of x_T, c, W)", title=f"Accuracy vs cost\n{where}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    _ticks(ax)
    fig.tight_layout()
    return fig


def load_results(path: str | Path | None = None, model: str = "toy2d", device: str = "cpu") -> dict:
    """Read a results JSON (default: the shipped ``data/bench/<model>_<device>/results.json``)."""
    path = Path(path) if path is not None else data_dir("bench", f"{model}_{device}", "results.json")
    return json.loads(Path(path).read_text())


# =========================================================================== CLI
def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        job = json.loads(Path(argv[1]).read_text())
        res = run_job(job)
        write_json(job["result_path"], dict(res, key=_job_key(job)), indent=None)
        return None
    ap = argparse.ArgumentParser(prog="python -m adjoint_lib.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="toy2d")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:0, ...)")
    ap.add_argument("--quick", action="store_true", help="reduced grid, in-process: a smoke test (< 2 minutes on CPU for each model)")
    ap.add_argument("--steps", type=positive_int, nargs="+", help="sampling steps N (default 5 10 20 50 100)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), help="gradient modes (default: all)")
    ap.add_argument("--tols", type=positive_float, nargs="+", help="dopri5 tolerances profiled (rtol = atol)")
    ap.add_argument("--order", type=int, choices=(1, 2, 3), default=2,
                    help="solver order of the library modes (default 2)")
    ap.add_argument("--batch", type=positive_int, help="batch size (default per model)")
    ap.add_argument("--guidance", type=nonnegative_float, help="classifier-free guidance scale (default per model)")
    ap.add_argument("--size", choices=("full", "reduced", "tiny"),
                    help="sd-arch size (default: tiny with --quick, else full on cuda, reduced on cpu)")
    ap.add_argument("--repeats", type=int_at_least(3), default=3, help="timed gradients per configuration (median; >= 3)")
    ap.add_argument("--ref-steps", type=int_at_least(2),
                    help="steps of the converged checkpoint reference (default 500; checked against half)")
    ap.add_argument("--sweep-steps", type=positive_int, nargs="+", help="N of the order-2 adjoint accuracy sweep")
    ap.add_argument("--sweep-tols", type=positive_float, nargs="+", help="dopri5 tolerances of the accuracy sweep")
    ap.add_argument("--threads", type=positive_int, help="torch threads (default 1 on CPU: oversubscribed "
                    "OpenMP pools on a loaded machine are 10x slower)")
    ap.add_argument("--isolate", choices=("process", "none"),
                    help="fresh subprocess per configuration (default) or in-process (default with --quick)")
    add_output_arguments(ap, "outputs/bench", "output folder; results go to <out>/<model>_<device>/")
    ap.add_argument("--resume", action="store_true", help="reuse finished configurations of an identical earlier run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--weights", help="mini: MiniSD folder to load (default data/mini)")
    ap.add_argument("--drop-time-freqs", type=nonnegative_int, default=0, metavar="K",
                    help="mini/sd-arch: zero the time-embedding input of the K fastest timestep "
                         "frequencies (a diagnostic model whose eps is smooth in t)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    tag = run_tag(a.model, a.device, a.drop_time_freqs)
    out = output_path(a, lambda: outputs_dir("bench"))
    res = run_benchmark(model=a.model, device=a.device, quick=a.quick, steps=a.steps, modes=a.modes,
                        tols=a.tols, order=a.order, batch=a.batch, guidance=a.guidance, size=a.size,
                        repeats=a.repeats, ref_steps=a.ref_steps, sweep_steps=a.sweep_steps,
                        sweep_tols=a.sweep_tols, threads=a.threads, isolate=a.isolate, out=out,
                        resume=a.resume, seed=a.seed, dtype=a.dtype, plots=not a.no_plots,
                        command="python -m adjoint_lib.bench " + " ".join(argv), weights=a.weights,
                        drop_time_freqs=a.drop_time_freqs)
    print(format_table(res))
    print(f"wrote {out / tag}/results.json" + ("" if a.no_plots else " and PNGs"))
    return res


if __name__ == "__main__":
    main()
