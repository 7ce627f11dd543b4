"""Judges of MiniSD images: who reads digit, color and stroke style off a 16x16 image.

* :class:`AuditeeCNN` - the digit classifier under audit (paper task 3 attacks it): a small
  CNN on the raw RGB image in [-1, 1], differentiable end to end.
* :class:`DigitJudgeMLP` - an independent digit judge of a different kind: an MLP on the
  color-normalized *ink map* (:func:`ink_map`), trained with other augmentations (small
  rotations/scalings, blur) and another seed. An attack crafted against the CNN's
  gradients has no reason to transfer to it, so it checks that content is preserved.
* :class:`StyleCNN` - normal vs bold strokes, a small CNN on the ink map (color-invariant).
* :func:`read_colors` - a deterministic color read-out: background = per-channel median of
  the 2-pixel border, foreground = mean of the pixels farthest from it, each snapped to
  the nearest named color.

All three networks see every color pair during training plus color jitter, pixel
shifts and noise, so they also read generated images. ``python -m
adjoint_lib.models.mini.judges`` trains them (about two minutes on one core) and saves
them to ``outputs/mini/judges/`` (the shipped ones are in ``data/mini/judges/``; replacing
them needs ``--out data/mini/judges --force``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import BACKGROUNDS, COLORS, STYLES, Labels, fixed_set, palette, sample_batch
from ...cli import add_output_arguments, output_path, positive_int
from ...io import atomic_path, write_json
from ...paths import outputs_dir

Tensor = torch.Tensor
BORDER = 2  # the data keeps a pure-background frame this wide around the digit


def _border_pixels(images: Tensor) -> Tensor:
    """(B, 3, n) pixels of the frame of width :data:`BORDER`."""
    mask = torch.ones(images.shape[-2:], dtype=torch.bool, device=images.device)
    mask[BORDER:-BORDER, BORDER:-BORDER] = False
    return images[:, :, mask]


def _foreground_stats(images01: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(background (B,3), foreground (B,3), distance-to-background map (B,1,H,W)), all [0,1]."""
    bg = _border_pixels(images01).median(dim=-1).values
    dist = (images01 - bg[:, :, None, None]).norm(dim=1, keepdim=True)
    far = (dist >= 0.7 * dist.amax(dim=(2, 3), keepdim=True)).float()
    fg = (images01 * far).sum(dim=(2, 3)) / far.sum(dim=(2, 3)).clamp(min=1)
    return bg, fg, dist


def read_colors(images: Tensor) -> tuple[Tensor, Tensor]:
    """Named (foreground, background) of images in [-1, 1]: indices into COLORS, BACKGROUNDS."""
    bg, fg, _ = _foreground_stats((images.clamp(-1, 1) + 1) / 2)
    return (torch.cdist(fg, palette(COLORS).to(fg)).argmin(dim=1),
            torch.cdist(bg, palette(BACKGROUNDS).to(bg)).argmin(dim=1))


def ink_map(images: Tensor) -> Tensor:
    """Color-invariant ink coverage (B, 1, H, W) in [0, 1] of images in [-1, 1]: distance of
    each pixel to the background color over the foreground's distance (differentiable)."""
    bg, fg, dist = _foreground_stats((images.clamp(-1, 1) + 1) / 2)
    ref = (fg - bg).norm(dim=1).clamp(min=0.2)[:, None, None, None]
    return (dist / ref).clamp(0, 1)


class AuditeeCNN(nn.Module):
    """Digit classifier on RGB images (B, 3, 16, 16) in [-1, 1] -> logits (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class DigitJudgeMLP(nn.Module):
    """Independent digit judge: an MLP on :func:`ink_map` of images in [-1, 1] -> logits (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(ink_map(images) * 2 - 1)


class StyleCNN(nn.Module):
    """Stroke-style classifier on :func:`ink_map` -> logits (B, len(STYLES))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(STYLES)))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(ink_map(images) * 2 - 1)


@dataclass
class Judges:
    """The three judge networks (eval mode, frozen) and the color read-out."""
    auditee: AuditeeCNN
    digit: DigitJudgeMLP
    style: StyleCNN

    @staticmethod
    def colors(images: Tensor) -> tuple[Tensor, Tensor]:
        """See :func:`read_colors`."""
        return read_colors(images)


# ---------------------------------------------------------------- augmentations
def _jitter_colors(images: Tensor, labels: Labels, g: torch.Generator, amount: float) -> Tensor:
    """Re-render with fg/bg colors moved by up to ``amount`` per channel (in [0, 1] units)."""
    x01 = (images + 1) / 2
    fg, bg = palette(COLORS)[labels.color], palette(BACKGROUNDS)[labels.background]
    ink = ((x01 - bg[:, :, None, None]) * (fg - bg)[:, :, None, None]).sum(1, keepdim=True)
    ink = ink / (fg - bg).pow(2).sum(1)[:, None, None, None]
    b = images.shape[0]
    fg2 = (fg + amount * (2 * torch.rand(b, 3, generator=g) - 1)).clamp(0, 1)
    bg2 = (bg + amount * (2 * torch.rand(b, 3, generator=g) - 1)).clamp(0, 1)
    return (bg2[:, :, None, None] * (1 - ink) + fg2[:, :, None, None] * ink) * 2 - 1


def _shift(images: Tensor, g: torch.Generator, max_px: int) -> Tensor:
    """Translate each image by up to ``max_px`` pixels (the frame is background, so roll)."""
    dx, dy = torch.randint(-max_px, max_px + 1, (2, images.shape[0]), generator=g).tolist()
    return torch.stack([im.roll((a, b), dims=(1, 2)) for im, a, b in zip(images, dy, dx)])


def _affine(images: Tensor, g: torch.Generator) -> Tensor:
    """Small random rotation (+-12 deg), scaling (0.9-1.1) and translation (+-1.5 px)."""
    b = images.shape[0]
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(b, generator=g)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1.5 / 8)
    theta = torch.stack([torch.stack([ang.cos() / scale, -ang.sin() / scale, shift[:, 0]], 1),
                         torch.stack([ang.sin() / scale, ang.cos() / scale, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _blur(images: Tensor, g: torch.Generator) -> Tensor:
    """Mix each image with its 3x3 box blur by a random weight in [0, 0.6]."""
    w = 0.6 * torch.rand(images.shape[0], 1, 1, 1, generator=g)
    return (1 - w) * images + w * F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)


def _noise(images: Tensor, g: torch.Generator, max_std: float) -> Tensor:
    std = max_std * torch.rand(images.shape[0], 1, 1, 1, generator=g)
    return images + std * torch.randn(images.shape, generator=g)


def augment_auditee(images: Tensor, labels: Labels, g: torch.Generator) -> Tensor:
    """Color jitter, shifts up to 2 px, Gaussian noise up to 0.2."""
    return _noise(_shift(_jitter_colors(images, labels, g, 0.25), g, 2), g, 0.2)


def augment_digit_judge(images: Tensor, labels: Labels, g: torch.Generator) -> Tensor:
    """Color jitter, small affine warps, blur, Gaussian noise up to 0.15."""
    return _noise(_blur(_affine(_jitter_colors(images, labels, g, 0.25), g), g), g, 0.15)


def augment_style(images: Tensor, labels: Labels, g: torch.Generator) -> Tensor:
    """Color jitter, shifts up to 2 px, Gaussian noise up to 0.15 (no scaling or blur: they
    change the apparent stroke width)."""
    return _noise(_shift(_jitter_colors(images, labels, g, 0.25), g, 2), g, 0.15)


# ---------------------------------------------------------------- training
def train_classifier(model: nn.Module, target: Callable[[Labels], Tensor],
                     augment: Callable[[Tensor, Labels, torch.Generator], Tensor], *,
                     steps: int, seed: int, batch_size: int = 128, lr: float = 2e-3,
                     progress: bool = True, desc: str = "") -> nn.Module:
    """Train ``model`` with cross-entropy on augmented random training batches (AdamW,
    cosine decay); returns it in eval mode with frozen weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        images, labels = sample_batch(batch_size, g, split="train")
        loss = F.cross_entropy(model(augment(images, labels, g)), target(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


def train_judges(steps: int = 3000, seed: int = 0, progress: bool = True) -> Judges:
    """Train the three judge networks on the training split (different seeds and augmentations)."""
    digit = lambda lab: lab.digit  # noqa: E731
    return Judges(
        auditee=train_classifier(AuditeeCNN(), digit, augment_auditee, steps=steps, seed=seed,
                                 progress=progress, desc="auditee CNN"),
        digit=train_classifier(DigitJudgeMLP(), digit, augment_digit_judge, steps=steps,
                               seed=seed + 1, progress=progress, desc="digit judge MLP"),
        style=train_classifier(StyleCNN(), lambda lab: lab.style, augment_style, steps=steps,
                               seed=seed + 2, progress=progress, desc="style CNN"))


JUDGE_NAMES = ("auditee", "digit", "style")


def save_judges(judges: Judges, path: Path) -> None:
    """Write ``auditee/digit/style.safetensors`` under ``path``: all three to temporary files
    first, moved into place together, so an interruption leaves the previous judges."""
    from safetensors.torch import save_file
    path = Path(path)
    with contextlib.ExitStack() as stack:
        for name in JUDGE_NAMES:
            tmp = stack.enter_context(atomic_path(path / f"{name}.safetensors", suffix=".safetensors"))
            save_file(getattr(judges, name).state_dict(), str(tmp))


def load_judges(path: Path) -> Judges:
    """Load judges saved by :func:`save_judges` (eval mode, frozen)."""
    from safetensors.torch import load_file
    nets = dict(zip(JUDGE_NAMES, (AuditeeCNN(), DigitJudgeMLP(), StyleCNN())))
    for name, net in nets.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"judge weights {file} missing: run "
                                    "`python -m adjoint_lib.models.mini.judges`")
        net.load_state_dict(load_file(str(file)))
        net.eval().requires_grad_(False)
    return Judges(**nets)


def judge_metrics(judges: Judges, images: Tensor, labels: Labels) -> dict[str, float]:
    """Fraction of images (B, 3, 16, 16) in [-1, 1] whose attributes each judge reads as ``labels``."""
    with torch.no_grad():
        fg, bg = read_colors(images)
        hits = {
            "digit_judge_acc": judges.digit(images).argmax(1) == labels.digit,
            "digit_auditee_acc": judges.auditee(images).argmax(1) == labels.digit,
            "color_acc": fg == labels.color,
            "background_acc": bg == labels.background,
            "style_acc": judges.style(images).argmax(1) == labels.style,
        }
    return {k: round(float(v.float().mean()), 4) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> None:
    """Command line: train the judges, save them and print their test-split accuracies."""
    p = argparse.ArgumentParser(description="Train the MiniSD judges.")
    p.add_argument("--steps", type=positive_int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    add_output_arguments(p, "outputs/mini/judges", "folder of the judge weights")
    a = p.parse_args(argv)
    out = output_path(a, lambda: outputs_dir("mini", "judges"))
    torch.set_num_threads(1)
    judges = train_judges(a.steps, a.seed)
    images, labels = fixed_set(2000, seed=0, split="test")
    clean = judge_metrics(judges, images, labels)
    noisy = judge_metrics(judges, images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)), labels)
    report = {"test_clean": clean, "test_noise_0.1": noisy, "steps": a.steps, "seed": a.seed}
    save_judges(judges, out)
    write_json(out / "judges_metrics.json", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
