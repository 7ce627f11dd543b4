"""The MiniSD dataset: scikit-learn's bundled 8x8 digits, colored, styled and captioned.

Every image is a digit drawn in a named foreground color on a named background color, in
one of two stroke styles, with a caption whose words name those attributes one-to-one::

    "a bold red seven on black"   ->   digit 7, color red, background black, style bold

**Resolution: 16x16 RGB.** The source digits have 8x8 pixels, so more pixels would add no
shape information, only cost: the paper tasks backpropagate through 10-20 UNet calls
hundreds of times on a CPU. Fewer would leave no room to draw the two stroke widths
apart. 16x16 is the smallest size that keeps a 2-pixel pure-background frame (which
also lets the color read-out estimate the background) around a 12x12 digit whose bold
strokes are visibly one pixel wider than its normal strokes.

**Rendering.** The 8x8 gray levels (0..16) are upsampled bilinearly to 24x24, given a
contrast stretch (so strokes have a solid core and a soft edge), padded to 32x32, dilated
by a 3x3 max filter for ``bold``, and area-downsampled to 16x16: an anti-aliased ink
coverage ``m`` in [0, 1]. The image is ``bg * (1 - m) + fg * m``, scaled to [-1, 1].

**Colors.** Eight foreground colors (the corners of the RGB cube) and three backgrounds.
A (foreground, background) pair is used only if the colors differ and their WCAG
contrast ratio is at least :data:`MIN_CONTRAST` (this drops e.g. yellow on white, red on
gray): :data:`PAIRS` lists the 17 pairs that remain.

Everything is deterministic: the masks are computed once (cached, well under a second)
and batches are drawn with a caller-supplied ``torch.Generator``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four",
                           "five", "six", "seven", "eight", "nine")
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5),
}
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")
STYLES: tuple[str, ...] = ("normal", "bold")
FILLER_WORDS: tuple[str, ...] = ("a", "on")
VOCABULARY: tuple[str, ...] = FILLER_WORDS + STYLES + COLORS + ("gray",) + DIGITS
MIN_CONTRAST = 2.0
RESOLUTION = 16
TEST_EVERY = 5  # source digit i is in the test split iff i % TEST_EVERY == 0


def relative_luminance(rgb: tuple[float, float, float]) -> float:
    """WCAG relative luminance of an sRGB color with channels in [0, 1]."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(a: str, b: str) -> float:
    """WCAG contrast ratio ``(L_hi + 0.05) / (L_lo + 0.05)`` of two named colors (1..21)."""
    la, lb = relative_luminance(COLOR_RGB[a]), relative_luminance(COLOR_RGB[b])
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


PAIRS: tuple[tuple[str, str], ...] = tuple(
    (fg, bg) for bg in BACKGROUNDS for fg in COLORS
    if fg != bg and contrast_ratio(fg, bg) >= MIN_CONTRAST)


def caption(digit: int | str, color: str, background: str, style: str = "normal") -> str:
    """The prompt for one set of attributes, e.g. ``caption(7, "red", "black", "bold")``
    -> ``"a bold red seven on black"``. ``digit`` is 0..9 or its word."""
    word = DIGITS[digit] if isinstance(digit, (int, np.integer)) else digit
    for value, allowed, name in ((word, DIGITS, "digit"), (color, COLORS, "color"),
                                 (background, BACKGROUNDS, "background"), (style, STYLES, "style")):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    return f"a {style} {color} {word} on {background}"


class Labels(NamedTuple):
    """Attribute indices of a batch, each a (B,) long tensor: ``digit`` 0..9, ``color``
    into :data:`COLORS`, ``background`` into :data:`BACKGROUNDS`, ``style`` into
    :data:`STYLES`."""
    digit: Tensor
    color: Tensor
    background: Tensor
    style: Tensor

    def captions(self) -> list[str]:
        """The caption of every item."""
        return [caption(int(d), COLORS[c], BACKGROUNDS[b], STYLES[s])
                for d, c, b, s in zip(self.digit.tolist(), self.color.tolist(),
                                      self.background.tolist(), self.style.tolist())]


@functools.lru_cache(maxsize=1)
def _source() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def ink_masks() -> Tensor:
    """Ink coverage of every source digit in every style: (len(STYLES), 1797, 1, 16, 16) in [0, 1]."""
    images, _ = _source()
    m = F.interpolate(images[:, None], size=24, mode="bilinear", align_corners=False)
    m = F.pad(((m - 0.25) / 0.5).clamp(0, 1), (4, 4, 4, 4))
    styles = {"normal": m, "bold": F.max_pool2d(m, 3, stride=1, padding=1)}
    return torch.stack([F.avg_pool2d(styles[s], 2) for s in STYLES])


def split_indices(split: str) -> Tensor:
    """Indices of the source digits in ``"train"`` (80%) or ``"test"`` (every 5th digit)."""
    n = _source()[1].numel()
    idx = torch.arange(n)
    if split == "train":
        return idx[idx % TEST_EVERY != 0]
    if split == "test":
        return idx[idx % TEST_EVERY == 0]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def palette(names: tuple[str, ...]) -> Tensor:
    """RGB of named colors in [0, 1]: (len(names), 3)."""
    return torch.tensor([COLOR_RGB[n] for n in names])


def render(mask: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """Paint ink masks (B, 1, H, W) with colors fg, bg (B, 3) in [0, 1]; returns [-1, 1]."""
    img = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    return img * 2 - 1


def random_labels(n: int, generator: torch.Generator) -> Labels:
    """``n`` random attribute sets: digit, style uniform; (color, background) uniform over :data:`PAIRS`."""
    pair = torch.randint(len(PAIRS), (n,), generator=generator)
    fg = torch.tensor([COLORS.index(PAIRS[p][0]) for p in pair.tolist()], dtype=torch.long)
    bg = torch.tensor([BACKGROUNDS.index(PAIRS[p][1]) for p in pair.tolist()], dtype=torch.long)
    return Labels(torch.randint(10, (n,), generator=generator), fg, bg,
                  torch.randint(len(STYLES), (n,), generator=generator))


def sample_batch(n: int, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Labels]:
    """A random batch: images (n, 3, 16, 16) in [-1, 1] and their :class:`Labels`.

    Source digits are drawn from ``split``; color pair and style independently of them.
    """
    _, targets = _source()
    pool = split_indices(split)
    src = pool[torch.randint(pool.numel(), (n,), generator=generator)]
    labels = random_labels(n, generator)
    labels = labels._replace(digit=targets[src])
    mask = ink_masks()[labels.style, src]
    images = render(mask, palette(COLORS)[labels.color], palette(BACKGROUNDS)[labels.background])
    return images, labels


def fixed_set(n: int, seed: int = 0, split: str = "test") -> tuple[Tensor, Labels]:
    """A reproducible set of ``n`` images and labels (for tests and evaluation)."""
    return sample_batch(n, torch.Generator().manual_seed(seed), split)
