"""Small matplotlib helpers the task notebooks share: image grids with labels."""
from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def to_numpy_image(image: Tensor):
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1] for ``imshow``."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[Tensor], row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
               title: str | None = None, cell: float = 0.9, fontsize: int = 7,
               cell_titles: Sequence[Sequence[str]] | None = None):
    """A figure with one row per tensor of images (N, 3, H, W) in [-1, 1].

    ``row_labels`` go on the left, ``col_labels`` above the first row, ``cell_titles[r][c]``
    (optional) above each image; rows with no images show an empty frame (e.g. when an attack
    fooled no pair). Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    n_rows, n_cols = len(rows), max(1, max(int(r.shape[0]) for r in rows))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 0.9, cell * n_rows + 0.5), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < images.shape[0]:
                ax.imshow(to_numpy_image(images[c]), interpolation="nearest")
            elif images.shape[0] == 0 and c == 0:
                ax.text(0.5, 0.5, "(none)", ha="center", va="center", fontsize=fontsize, transform=ax.transAxes)
            else:
                ax.axis("off")
            if cell_titles is not None and c < len(cell_titles[r]):
                ax.set_title(cell_titles[r][c], fontsize=fontsize - 1, pad=2)
            elif r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=fontsize, pad=2)
        if r < len(row_labels):
            axes[r][0].set_ylabel(row_labels[r], fontsize=fontsize, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=fontsize + 2)
    fig.tight_layout(pad=0.3)
    return fig


def make_room_for_title(fig, inches: float = 0.35, per_row: float = 0.2):
    """Lay ``fig`` out again with ``inches`` free at the top for its suptitle (``tight_layout`` does
    not account for it) and ``per_row`` inches more height per row of axes, so that per-image titles
    clear the row above; returns ``fig``."""
    if inches < 0 or per_row < 0:
        raise ValueError(f"inches and per_row must be >= 0, got {inches}, {per_row}")
    rows = len({round(ax.get_position().y0, 3) for ax in fig.axes}) if fig.axes else 0
    fig.set_figheight(fig.get_figheight() + per_row * rows)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, max(0.5, 1 - inches / fig.get_figheight())))
    if rows > 1:  # tight_layout leaves no gap for titles above square image axes
        fig.subplots_adjust(hspace=max(fig.subplotpars.hspace, 0.3))
    return fig
