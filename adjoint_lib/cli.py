"""Command-line helpers shared by every ``python -m adjoint_lib...`` command.

* argparse ``type=`` validators that reject a bad number at parse time, so the error names
  the flag (``argument --steps: must be an integer >= 1, got '0'``, exit code 2):
  :func:`positive_int`, :func:`nonnegative_int`, :func:`positive_float`,
  :func:`nonnegative_float`, :func:`finite_float`, :func:`probability`, and the factories
  :func:`int_at_least` / :func:`float_in` for other bounds;
* :func:`add_output_arguments` / :func:`output_path`: ``--out`` (default under
  ``outputs/``) and ``--force`` (needed to write into the shipped ``data/``), checked with
  :func:`adjoint_lib.io.check_out` before any compute.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from .io import check_out

__all__ = ["int_at_least", "float_in", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "finite_float", "probability", "add_output_arguments", "output_path"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"int_at_least_{low}"
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``low_open`` / ``high_open``
    exclude an end). NaN and +-inf are always refused."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    if math.isinf(low) and math.isinf(high):
        what = "a finite number"
    elif math.isinf(high):
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif math.isinf(low):
        what = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        what = f"a finite number in {lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or \
                (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = "float_in"
    return parse


positive_int = int_at_least(1)
positive_int.__doc__ = "An argparse type: an integer >= 1."
nonnegative_int = int_at_least(0)
nonnegative_int.__doc__ = "An argparse type: an integer >= 0."
positive_float = float_in(0.0, low_open=True)
positive_float.__doc__ = "An argparse type: a finite float > 0."
nonnegative_float = float_in(0.0)
nonnegative_float.__doc__ = "An argparse type: a finite float >= 0."
finite_float = float_in()
finite_float.__doc__ = "An argparse type: any finite float (no NaN, no inf)."
probability = float_in(0.0, 1.0)
probability.__doc__ = "An argparse type: a float in [0, 1]."


def add_output_arguments(parser: argparse.ArgumentParser, default: str, what: str = "output folder") -> None:
    """Add ``--out PATH`` (``what``; ``default`` is the text shown in the help) and ``--force``."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"{what} (default {default}); a path inside the shipped data/ needs --force")
    parser.add_argument("--force", action="store_true",
                        help="allow --out inside the shipped data/ folder (overwrites shipped files)")


def output_path(args: argparse.Namespace, default: Callable[[], Path], *, suffix: str = "") -> Path:
    """The checked output location of a command: ``args.out``, else ``default()``.

    Exits with a message naming ``--out`` when it lies in ``data/`` without ``--force`` or
    cannot be written; call it before any compute. ``suffix``: ``--out`` is a file stem and
    the command writes ``<out><suffix>`` (checked as that file)."""
    path = Path(args.out) if args.out is not None else default()
    check_out(path.with_suffix(suffix) if suffix else path, force=getattr(args, "force", False))
    return path
