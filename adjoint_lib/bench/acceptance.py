"""Acceptance checks of a benchmark run: ratios measured from a results dict, compared with the
thresholds of a JSON file next to the shipped results (``data/bench/acceptance.json``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..io import read_json
from ..paths import data_dir


def acceptance_path() -> Path:
    """The default thresholds file: ``data/bench/acceptance.json`` (under ``$ADJOINTDPM_DATA`` when set)."""
    return data_dir("bench", "acceptance.json")


def load_thresholds(path: str | Path | None = None) -> dict[str, dict]:
    """The ``"checks"`` of a thresholds file (default :func:`acceptance_path`); ``{}`` with a
    warning when it is missing or unreadable."""
    path = Path(path) if path is not None else acceptance_path()
    spec = read_json(path, what="benchmark acceptance thresholds")
    if not isinstance(spec, dict) or not isinstance(spec.get("checks"), dict):
        warnings.warn(f"no benchmark acceptance thresholds in {path}: the results carry no checks "
                      "(pass acceptance= a JSON file with a 'checks' object)", RuntimeWarning, stacklevel=2)
        return {}
    return spec["checks"]


def judge(value: float, bound: dict) -> tuple[str, bool]:
    """The criterion text and whether ``value`` meets ``bound``: ``{"min": a}`` (value >= a),
    ``{"max": b}`` (value <= b) or ``{"target": t, "tolerance": d}`` (``|value - t| <= d``)."""
    if "target" in bound and "tolerance" in bound:
        t, d = float(bound["target"]), float(bound["tolerance"])
        rel = f"{d / t * 100:g}%" if t else f"{d:g}"
        return f"within {rel} ({t - d:g} .. {t + d:g})", abs(value - t) <= d
    if "min" in bound:
        return f">= {bound['min']:g}", value >= bound["min"]
    if "max" in bound:
        return f"<= {bound['max']:g}", value <= bound["max"]
    raise ValueError(f"a threshold needs 'min', 'max' or 'target' and 'tolerance', got {bound!r}")


def _profile(res: dict, mode: str, steps: int) -> dict | None:
    return next((p for p in res["profiles"] if p["mode"] == mode and p["steps"] == steps
                 and p.get("status") == "ok"), None)


def _ratio(num: float, den: float) -> float:
    return num / max(den, 1)


def measurements(res: dict) -> dict[str, dict[str, Any]]:
    """The measured quantities the checks compare, where the grid contains them: ``{name: {"raw":
    the number judged, "digits": its rounding in the report (None: as is), other numbers shown
    with it}}``."""
    out: dict[str, dict[str, Any]] = {}
    a10, a100 = _profile(res, "adjoint", 10), _profile(res, "adjoint", 100)
    if a10 and a100:
        out["adjoint_peak_memory_N100_over_N10"] = dict(
            raw=_ratio(a100["peak_bytes"], a10["peak_bytes"]), digits=3,
            saved_tensor_ratio=round(_ratio(a100["saved_peak_bytes"], a10["saved_peak_bytes"]), 3))
    b10, b100 = _profile(res, "backprop", 10), _profile(res, "backprop", 100)
    if b10 and b100:
        out["backprop_peak_memory_N100_over_N10"] = dict(
            raw=_ratio(b100["peak_bytes"], b10["peak_bytes"]), digits=2,
            saved_tensor_ratio=round(_ratio(b100["saved_peak_bytes"], b10["saved_peak_bytes"]), 2))
    a20, b20 = _profile(res, "adjoint", 20), _profile(res, "backprop", 20)
    if a20 and b20:
        m = out["adjoint_time_over_backprop_N20"] = dict(raw=a20["time_s"] / b20["time_s"], digits=2,
                                                         metric="median wall time")
        if a20.get("cpu_time_s") and b20.get("cpu_time_s"):
            m["cpu_time_ratio"] = round(a20["cpu_time_s"] / b20["cpu_time_s"], 2)
    if a20 and "vs_discrete" in a20["errors"]:
        cos = {k: round(a20["errors"]["vs_discrete"][k]["cos"], 6) for k in ("cond", "weights")}
        out["adjoint_N20_cosine_x_T_vs_discrete"] = dict(raw=a20["errors"]["vs_discrete"]["x_T"]["cos"], digits=6,
                                                         cond=cos["cond"], weights=cos["weights"])
    nfe = res.get("nfe_to_accuracy", {}).get("max_rel", {})
    if "ratio_dopri5_over_adjoint" in nfe:
        out["nfe_to_1e-2_dopri5_over_adjoint"] = dict(raw=nfe["ratio_dopri5_over_adjoint"], digits=None,
                                                      metric="largest relative error of x_T, cond, weights")
    return out


def evaluate_checks(res: dict, acceptance: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The checks of a results dict: each measurement with a threshold in ``acceptance`` (default
    :func:`acceptance_path`) as ``{"value", "criterion", "passed", ...}``; measurements without a
    threshold are left out."""
    thresholds = load_thresholds(acceptance)
    order = res.get("config", {}).get("order", 2)
    checks: dict[str, dict[str, Any]] = {}
    for name, m in measurements(res).items():
        if name not in thresholds:
            continue
        m = dict(m)
        raw, digits = m.pop("raw"), m.pop("digits")
        criterion, passed = judge(raw, thresholds[name])
        key = name.replace("adjoint_N20", f"adjoint_order{order}_N20")
        checks[key] = dict(value=raw if digits is None else round(raw, digits), **m, criterion=criterion,
                           passed=passed)
    return checks
