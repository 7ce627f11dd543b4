"""Where things live: shipped data (``$ADJOINTDPM_DATA``), outputs (``$ADJOINTDPM_OUTPUTS``),
and the active profile (``mini`` / ``sd``, ``$ADJOINTDPM_PROFILE``)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_dir(*parts: str) -> Path:
    """The shipped data (weights and assets): ``$ADJOINTDPM_DATA`` when set, else ``data/`` of
    the repository. Set the variable when the package is installed without its repository
    (a non-editable ``pip install``), pointing at a copy of ``data/``."""
    base = os.environ.get("ADJOINTDPM_DATA")
    return (Path(base).expanduser() if base else ROOT / "data").joinpath(*parts)


def outputs_dir(*parts: str) -> Path:
    """``outputs/`` (or ``$ADJOINTDPM_OUTPUTS``), created on demand: figures, JSON results."""
    base = Path(os.environ.get("ADJOINTDPM_OUTPUTS", ROOT / "outputs"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile(requested: str | None = None) -> str:
    """The profile to run: ``requested``, else ``$ADJOINTDPM_PROFILE``, else ``sd`` when
    CUDA is available and ``mini`` otherwise."""
    import torch

    name = requested or os.environ.get("ADJOINTDPM_PROFILE") or ("sd" if torch.cuda.is_available() else "mini")
    if name not in ("mini", "sd"):
        raise ValueError(f"profile must be 'mini' or 'sd', got {name!r}")
    return name
