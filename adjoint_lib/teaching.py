"""Exercise checks for the notebooks: ``check(answer, expected)`` tells a student whether an
answer is right without printing the answer itself."""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["check"]


def _close(answer: Any, expected: Any, rtol: float, atol: float) -> bool:
    a = torch.as_tensor(answer, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    return a.shape == e.shape and bool(torch.allclose(a, e, rtol=rtol, atol=atol))


def check(name: str, answer: Any, expected: Any = None, *, rtol: float = 1e-6, atol: float = 0.0,
          test: Callable[[Any], bool] | None = None, hint: str = "") -> bool:
    """Print ``name: correct`` when ``answer`` matches ``expected`` (``|a - e| <= atol + rtol |e|``
    elementwise, or ``test(answer)`` when given), a hint otherwise, and a reminder while the
    answer is still ``None``; return whether it is correct."""
    if answer is None or answer is ...:
        print(f"{name}: not attempted yet - replace the ... / None in the cell above")
        return False
    try:
        ok = bool(test(answer)) if test is not None else _close(answer, expected, rtol, atol)
    except Exception as exc:  # a wrong type or shape is a wrong answer, not a crash
        print(f"{name}: not quite ({type(exc).__name__}: {exc}). {hint}".rstrip())
        return False
    print(f"{name}: correct" if ok else f"{name}: not quite. {hint}".rstrip())
    return ok
