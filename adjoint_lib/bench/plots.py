"""Figures of a results dict: memory, time and gradient error against N, and accuracy against
eps evaluations (adjoint vs dopri5)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..io import atomic_path
from .gradients import COMPONENTS, MODES

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
                 which: Sequence[str] = PLOTS) -> dict[str, Any]:
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
