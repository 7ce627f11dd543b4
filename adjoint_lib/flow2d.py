"""A 2-D flow-matching toy: the ring of :mod:`adjoint_lib.toy2d`, learned as a rectified flow.

The network is the toy MLP (:class:`~adjoint_lib.models.ToyEps`'s architecture) trained to
predict the velocity ``v = eps - x_0`` on the path ``x_s = (1 - s) x_0 + s eps`` (timestep
``t = 1000 s``, diffusers' flow-matching convention), class-conditional with the one-hot class
zeroed with probability ``p_uncond`` (``cond = zeros`` is the unconditional model). Wrapped in
:class:`~adjoint_lib.models.FlowEps` it is an ``eps_fn`` like any other.

Train (seconds on a CPU; writes ``outputs/flow2d/ring.safetensors`` + ``ring.json``)::

    python -m adjoint_lib.flow2d
    python -m adjoint_lib.flow2d --out data/flow2d --force     # re-ship the weights

Load the shipped ones::

    eps_fn, schedule = adjoint_lib.flow2d.load_flow()          # FlowEps, FlowSchedule
    x0 = adjoint_lib.models.sample_flow(eps_fn, x_T, cond, schedule=schedule, steps=20, order=2)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .cli import output_path
from .models.flow import FlowEps, sample_flow
from .models.toy import ToyEps
from .paths import data_dir, outputs_dir
from .schedule import FlowSchedule
from .toy2d import KINDS, fit, mode_fraction, read_net, save_toy, training_parser

Tensor = torch.Tensor


def flow_schedule(shift: float = 1.0) -> FlowSchedule:
    """The path of diffusers' ``FlowMatchEulerDiscreteScheduler`` (1000 train timesteps, ``shift``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))


def flow_matching_loss(net: ToyEps, x0: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``E_{s, eps} |v_theta((1 - s) x0 + s eps, 1000 s, c) - (eps - x0)|^2`` with ``s ~ U(0, 1)``
    (the conditional flow-matching objective of rectified flow)."""
    s = torch.rand(x0.shape[0], 1, dtype=x0.dtype, generator=generator)
    noise = torch.randn(x0.shape, dtype=x0.dtype, generator=generator)
    x_s = (1 - s) * x0 + s * noise
    return torch.nn.functional.mse_loss(net(x_s, 1000.0 * s[:, 0], cond), noise - x0)


def train_flow(kind: str = "ring", steps: int = 8000, batch: int = 512, lr: float = 3e-3, hidden: int = 128,
               depth: int = 3, p_uncond: float = 0.5, seed: int = 0, log_every: int = 50,
               progress: bool = True) -> tuple[ToyEps, dict]:
    """Train the velocity MLP on ``kind`` data with Adam and a cosine learning-rate decay.
    Returns ``(net, log)``; ``log["loss"]`` is the mean loss of every ``log_every`` steps and
    ``log["config"]`` what :func:`load_flow` needs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    torch.manual_seed(seed)
    net = ToyEps(cond_dim=KINDS[kind], hidden=hidden, depth=depth)
    log = fit(net, kind, lambda m, x0, c, g: flow_matching_loss(m, x0, c, generator=g), steps=steps, batch=batch,
              lr=lr, p_uncond=p_uncond, seed=seed, log_every=log_every, progress=progress, desc="train flow")
    log["config"]["prediction"] = "velocity"
    return net, log


def save_flow(net: ToyEps, log: dict, folder: str | Path) -> Path:
    """Write ``<folder>/<kind>.safetensors`` (weights, config in the metadata) and ``<kind>.json``
    (the training log), moved into place together. Returns the weights' path."""
    return save_toy(net, log, Path(folder) / log["config"]["kind"])


def load_flow(kind: str = "ring", folder: str | Path | None = None, dtype: torch.dtype = torch.float32,
              guidance_scale: float = 1.0) -> tuple[FlowEps, FlowSchedule]:
    """The shipped velocity MLP (``data/flow2d/<kind>.safetensors``) in eval mode as ``dtype``,
    wrapped in :class:`FlowEps`, and its schedule: ``eps_fn, schedule = load_flow()``;
    the network is ``eps_fn.model``."""
    path = (Path(folder) if folder is not None else data_dir("flow2d")) / kind
    if not path.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"{path.with_suffix('.safetensors')} not found: train it with "
                                f"`python -m adjoint_lib.flow2d --kind {kind}`")
    schedule = flow_schedule()
    return FlowEps(read_net(path).to(dtype).eval(), schedule, guidance_scale=guidance_scale), schedule


def training_log(kind: str = "ring", folder: str | Path | None = None) -> dict:
    """The JSON training log written next to the shipped weights."""
    folder = Path(folder) if folder is not None else data_dir("flow2d")
    return json.loads((folder / f"{kind}.json").read_text())


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train the 2-D flow toy and save it (``outputs/flow2d`` unless ``--out``)."""
    parser = training_parser("Train the 2-D flow-matching toy (velocity MLP on the ring).", steps=8000,
                             out_default="outputs/flow2d")
    args = parser.parse_args(argv)
    out = output_path(args, lambda: outputs_dir("flow2d"))
    torch.set_num_threads(1)  # a small MLP: one thread is fastest (and immune to busy cores)
    net, log = train_flow(args.kind, steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden,
                          depth=args.depth, p_uncond=args.p_uncond, seed=args.seed)
    if args.kind == "ring":
        with torch.no_grad():
            x0 = sample_flow(FlowEps(net, flow_schedule()), torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)),
                             torch.zeros(1, log["config"]["cond_dim"]), schedule=flow_schedule(), steps=20, order=2)
        log["mode_fraction_20steps"] = round(mode_fraction(x0), 4)
    path = save_flow(net, log, out)
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB), final loss {log['loss'][-1]:.4f}, {log['seconds']} s"
          + (f", mode fraction {log['mode_fraction_20steps']}" if "mode_fraction_20steps" in log else ""))


if __name__ == "__main__":
    main()
