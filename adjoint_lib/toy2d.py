"""A 2-D toy diffusion model: data, training, shipped weights, and two small optimizations.

The data is a ring of 8 Gaussians (or scikit-learn's two moons); the model is a
class-conditional :class:`~adjoint_lib.models.ToyEps` trained with the usual
epsilon-prediction loss on the DDPM linear schedule. The conditioning vector is the one-hot
class, replaced by zeros with probability ``p_uncond`` so the same network is also the
unconditional model (``cond = zeros``).

Train the weights (a minute or two on a laptop CPU)::

    python -m adjoint_lib.toy2d            # writes outputs/toy2d/ring.safetensors + ring.json
    python -m adjoint_lib.toy2d --out data/toy2d/ring --force   # replaces the shipped ones

Load the shipped ones (``data/toy2d/``)::

    model, schedule = adjoint_lib.toy2d.load_toy()

The two optimization loops preview the paper's tasks in 2-D: :func:`optimize_noise` moves
initial noises so the samples land where a loss wants them (task 3, adversarial noise),
:func:`finetune` changes the weights so the whole distribution moves (task 2, stylization;
:func:`shift_loss` is a "style + content" loss for it).
Both get their gradients from :func:`adjoint_lib.sample`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .adjoint import sample
from .cli import add_output_arguments, output_path, positive_float, positive_int, probability
from .io import atomic_path, dumps
from .models.toy import ToyEps
from .paths import data_dir, outputs_dir
from .schedule import VPSchedule

Tensor = torch.Tensor

KINDS = {"ring": 8, "moons": 2}  # dataset -> number of classes (= conditioning size)
RING_RADIUS, RING_STD = 1.5, 0.1
MOONS_SCALE = 1.0


# --------------------------------------------------------------------------- data
def ring_centers(k: int = 8, radius: float = RING_RADIUS) -> Tensor:
    """Centres of the ring mixture, ``radius (cos 2 pi j/k, sin 2 pi j/k)``, shape (k, 2)."""
    ang = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)


def make_data(n: int, kind: str = "ring", seed: int | None = 0,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` points of the 2-D data set and their class labels: ``(x (n, 2) float32, labels (n,))``.

    ``kind="ring"``: 8 Gaussians with std ``RING_STD`` on a circle of radius ``RING_RADIUS``
    (class = mixture component). ``kind="moons"``: two interleaved half circles (class = moon),
    centred and scaled to roughly unit spread. Deterministic for a given ``seed`` (or draws
    from ``generator`` when one is given).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if kind == "ring":
        labels = torch.randint(0, KINDS["ring"], (n,), generator=generator)
        x = ring_centers()[labels] + RING_STD * torch.randn(n, 2, dtype=torch.float64, generator=generator)
    else:
        labels = torch.randint(0, 2, (n,), generator=generator)
        ang = math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
        upper = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        lower = torch.stack([1 - torch.cos(ang), 0.5 - torch.sin(ang)], dim=1)
        x = torch.where(labels[:, None] == 0, upper, lower)
        x = x + 0.06 * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        x = MOONS_SCALE * (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 0.75
    return x.float(), labels


def one_hot(labels: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot conditioning vectors (n, k)."""
    return torch.nn.functional.one_hot(torch.as_tensor(labels), k).to(dtype)


def toy_schedule() -> VPSchedule:
    """The DDPM linear schedule (1000 steps, betas 1e-4 .. 0.02) of diffusers' ``DDPMScheduler``."""
    from diffusers import DDPMScheduler

    return VPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))


# --------------------------------------------------------------------------- training
def diffusion_loss(model: ToyEps, x0: Tensor, cond: Tensor, schedule: VPSchedule,
                   generator: torch.Generator | None = None) -> Tensor:
    """``E_t,eps |eps_theta(alpha_t x0 + sigma_t eps, t, c) - eps|^2`` with ``t`` uniform on
    the integer timesteps (the DDPM epsilon-prediction objective)."""
    n = x0.shape[0]
    t = torch.randint(0, schedule.alphas_cumprod.numel(), (n,), generator=generator)
    ac = schedule.alphas_cumprod[t].to(x0.dtype)[:, None]
    noise = torch.randn(x0.shape, dtype=x0.dtype, generator=generator)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    return torch.nn.functional.mse_loss(model(x_t, t.to(x0.dtype), cond), noise)


def fit(model: ToyEps, kind: str, loss_fn: Callable[[ToyEps, Tensor, Tensor, torch.Generator], Tensor], *,
        steps: int, batch: int, lr: float, p_uncond: float, seed: int, log_every: int = 50,
        progress: bool = True, desc: str = "train") -> dict:
    """Minimize ``loss_fn(model, x0, cond, generator)`` over batches of ``kind`` data with Adam and
    a cosine learning-rate decay; ``cond`` is the one-hot class zeroed with probability
    ``p_uncond``. Returns the log (mean loss every ``log_every`` steps, settings, seconds)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be positive")
    k = KINDS[kind]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, running = [], []
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"{desc} {kind}", disable=not progress)
    for step in bar:
        x0, labels = make_data(batch, kind, generator=gen)
        cond = one_hot(labels, k)
        cond[torch.rand(batch, generator=gen) < p_uncond] = 0.0
        loss = loss_fn(model, x0, cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if len(running) == log_every or step == steps - 1:
            losses.append(sum(running) / len(running))
            running = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    config = dict(kind=kind, cond_dim=k, hidden=model.net[0].out_features,
                  depth=sum(isinstance(m, torch.nn.Linear) for m in model.net) - 1, t_dim=model.t_dim)
    return dict(config=config, loss=losses, log_every=log_every, steps=steps, batch=batch, lr=lr,
                p_uncond=p_uncond, seed=seed, seconds=round(time.time() - t0, 1))


def train_toy(kind: str = "ring", steps: int = 12000, batch: int = 512, lr: float = 3e-3,
              hidden: int = 128, depth: int = 3, p_uncond: float = 0.5, seed: int = 0,
              model: ToyEps | None = None, log_every: int = 50, progress: bool = True) -> tuple[ToyEps, dict]:
    """Train a class-conditional :class:`ToyEps` on ``kind`` data with Adam and a cosine
    learning-rate decay. Returns ``(model, log)`` with ``log["loss"]`` the mean loss of
    every ``log_every`` steps and ``log["config"]`` what :func:`load_toy` needs.

    The conditioning is the one-hot class, zeroed with probability ``p_uncond`` (the
    unconditional model is ``cond = zeros``). Pass ``model`` to continue training one.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if model is None:
        torch.manual_seed(seed)
        model = ToyEps(cond_dim=KINDS[kind], hidden=hidden, depth=depth)
    elif model.cond_dim != KINDS[kind]:
        raise ValueError(f"model has cond_dim={model.cond_dim}, {kind!r} needs {KINDS[kind]}")
    schedule = toy_schedule()
    log = fit(model, kind, lambda m, x0, c, g: diffusion_loss(m, x0, c, schedule, generator=g), steps=steps,
              batch=batch, lr=lr, p_uncond=p_uncond, seed=seed, log_every=log_every, progress=progress)
    return model, log


def save_toy(model: ToyEps, log: dict, path: str | Path | None = None) -> Path:
    """Write ``<path>.safetensors`` (weights, config in the metadata) and ``<path>.json`` (the
    training log), both to temporary files first and moved into place together, so an
    interruption leaves the previous pair. Default path: ``outputs/toy2d/<kind>``
    (:func:`load_toy` reads the shipped ``data/toy2d/<kind>``)."""
    from safetensors.torch import save_file

    kind = log["config"]["kind"]
    path = Path(path) if path is not None else outputs_dir("toy2d") / kind
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    weights = path.with_suffix(".safetensors")
    with atomic_path(weights, suffix=".safetensors") as tmp_w, atomic_path(path.with_suffix(".json")) as tmp_j:
        save_file(state, str(tmp_w), metadata={"config": json.dumps(log["config"])})
        tmp_j.write_text(dumps(log, indent=1) + "\n")
    return weights


def read_net(path: str | Path) -> ToyEps:
    """The :class:`ToyEps` saved at ``<path>.safetensors`` (its config in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path).with_suffix(".safetensors")
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    with safe_open(str(file), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = ToyEps(cond_dim=config["cond_dim"], hidden=config["hidden"], depth=config["depth"],
                   t_dim=config["t_dim"])
    model.load_state_dict(load_file(str(file)))
    return model


def load_toy(kind: str = "ring", path: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[ToyEps, VPSchedule]:
    """Load the shipped toy model (``data/toy2d/<kind>.safetensors``) in eval mode, as
    ``dtype``, with its schedule: ``model, schedule = load_toy()``."""
    path = Path(path) if path is not None else data_dir("toy2d", kind)
    if not path.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"{path.with_suffix('.safetensors')} not found: train it with "
                                f"`python -m adjoint_lib.toy2d --kind {kind}`")
    return read_net(path).to(dtype).eval(), toy_schedule()


def training_log(kind: str = "ring", path: str | Path | None = None) -> dict:
    """The JSON training log written next to the shipped weights."""
    path = Path(path) if path is not None else data_dir("toy2d", kind)
    return json.loads(path.with_suffix(".json").read_text())


# --------------------------------------------------------------------------- evaluation
def mode_fraction(x: Tensor, radius: float = 3 * RING_STD) -> float:
    """Fraction of points within ``radius`` of a ring centre (sample quality of the ring model)."""
    d = torch.cdist(x.double(), ring_centers().to(x.device))
    return float((d.min(dim=1).values < radius).double().mean())


def nearest_mode(x: Tensor) -> Tensor:
    """Index of the nearest ring centre for each point."""
    return torch.cdist(x.double(), ring_centers().to(x.device)).argmin(dim=1)


# --------------------------------------------------------------------------- optimization
def region_loss(center: Sequence[float], radius: float) -> Callable[[Tensor], Tensor]:
    """``L(x0) = mean(relu(|x0 - center| - radius)^2)``: zero once a sample is inside the disk."""
    c = torch.as_tensor(center, dtype=torch.float64)

    def loss(x0: Tensor) -> Tensor:
        return torch.relu((x0 - c.to(x0)).norm(dim=1) - radius).square().mean()
    return loss


def shift_loss(base_model, schedule: VPSchedule, shift: Sequence[float], cond: Tensor | None = None,
               steps: int = 10, order: int = 2, content_weight: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """A "style + content" loss for :func:`finetune` (the 2-D analogue of the paper's stylization):

        L(x0, x_T) = |mean(x0) - shift|^2 + w * mean_i |(x0_i - mean x0) - (b_i - mean b)|^2

    where ``b = sample(base_model, x_T)`` is what the frozen ``base_model`` generates from the same
    noise. The first term moves the distribution's mean to ``shift`` (the "style"), the second keeps
    every sample where it was relative to the others (the "content"): the optimum is the base
    distribution translated by ``shift - mean(b)``.
    """
    target = torch.as_tensor(shift, dtype=torch.float64)

    def loss(x0: Tensor, x_T: Tensor) -> Tensor:
        with torch.no_grad():
            b = sample(base_model, x_T, cond, schedule=schedule, steps=steps, order=order)
        m = x0.mean(dim=0)
        content = ((x0 - m) - (b - b.mean(dim=0))).square().sum(dim=1).mean()
        return (m - target.to(x0)).square().sum() + content_weight * content
    return loss


def optimize_noise(model, schedule: VPSchedule, x_T: Tensor, cond: Tensor | None,
                   loss_fn: Callable[[Tensor], Tensor], iters: int = 40, lr: float = 0.1,
                   steps: int = 10, order: int = 2, grad: str = "adjoint",
                   progress: bool = True) -> tuple[Tensor, list[float]]:
    """Move the initial noises ``x_T`` by Adam on ``loss_fn(sample(x_T))``.

    The gradient w.r.t. ``x_T`` comes from :func:`adjoint_lib.sample` with ``grad`` (the
    model's weights are not touched). Returns ``(x_T_optimized, losses)``; ``losses[i]`` is
    the loss before update ``i`` and ``losses[-1]`` the loss after the last one.
    """
    x = x_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    losses = []
    for _ in tqdm(range(iters), desc="optimize noise", disable=not progress):
        x0 = sample(model, x, cond, schedule=schedule, steps=steps, order=order, grad=grad)
        loss = loss_fn(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn(sample(model, x, cond, schedule=schedule, steps=steps, order=order)).item())
    return x.detach(), losses


def finetune(model: torch.nn.Module, schedule: VPSchedule, loss_fn: Callable[[Tensor, Tensor], Tensor],
             iters: int = 60, batch: int = 256, lr: float = 1e-3, steps: int = 10, order: int = 2,
             grad: str = "adjoint", cond: Tensor | None = None, params: Sequence[Tensor] | None = None,
             seed: int = 0, progress: bool = True) -> list[float]:
    """Fine-tune ``params`` (default: all of ``model``'s) by Adam on ``loss_fn(x0, x_T)`` with
    ``x0 = sample(model, x_T)`` and fresh noise ``x_T`` every iteration (e.g. :func:`shift_loss`);
    the gradient w.r.t. the weights comes from :func:`adjoint_lib.sample` with ``grad``.
    Returns the loss of every iteration."""
    params = [p for p in (model.parameters() if params is None else params)]
    for p in params:
        p.requires_grad_(True)
    dtype = params[0].dtype
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in tqdm(range(iters), desc="fine-tune", disable=not progress):
        x_T = torch.randn(batch, 2, dtype=dtype, generator=gen)
        x0 = sample(model, x_T, cond, schedule=schedule, steps=steps, order=order, grad=grad, params=params)
        loss = loss_fn(x0, x_T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- CLI
def training_parser(description: str, steps: int, out_default: str) -> argparse.ArgumentParser:
    """The command line of a 2-D toy's training (shared by :mod:`adjoint_lib.flow2d`): every
    size and rate validated, ``--out``/``--force`` as everywhere."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--kind", default="ring", choices=sorted(KINDS))
    parser.add_argument("--steps", type=positive_int, default=steps)
    parser.add_argument("--batch", type=positive_int, default=512)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--depth", type=positive_int, default=3)
    parser.add_argument("--p-uncond", type=probability, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, out_default, "output location")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train the toy model, save it (``<out>.safetensors`` + ``<out>.json``)."""
    parser = training_parser("Train the 2-D toy diffusion model and save it (default outputs/toy2d/<kind>).",
                             steps=12000, out_default="outputs/toy2d/<kind>")
    args = parser.parse_args(argv)
    out = output_path(args, lambda: outputs_dir("toy2d") / args.kind, suffix=".safetensors")
    torch.set_num_threads(1)  # small MLP: one thread is fastest (and immune to busy cores)
    model, log = train_toy(args.kind, steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden,
                           depth=args.depth, p_uncond=args.p_uncond, seed=args.seed)
    with torch.no_grad():
        x0 = sample(model, torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)),
                    torch.zeros(1, log["config"]["cond_dim"]), schedule=toy_schedule(), steps=20, order=2)
    if args.kind == "ring":
        log["mode_fraction_20steps"] = round(mode_fraction(x0), 4)
    path = save_toy(model, log, out)
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB), final loss {log['loss'][-1]:.4f}, "
          f"{log['seconds']} s" + (f", mode fraction {log['mode_fraction_20steps']}" if args.kind == "ring" else ""))


if __name__ == "__main__":
    main()
